"""lm-evaluation-harness on our checkpoints: the registered ``llmcompress`` model class, ``compress eval
--tasks``, and ``python -m llmcompress.lmeval``, on the bundled offline task tests/data/lmeval (a
24-item multiple-choice cloze over Jane Austen's novels) and a tiny random Llama compressed to 4 bits.

The numbers must be the compressed model's: each choice's log-likelihood as lm-eval logs it equals
the one computed here from ``llmcompress.load``'s model, and differs from the float model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lmeval]'")

import llmcompress  # noqa: E402
from llmcompress import lmeval  # noqa: E402
from llmcompress.cli import main  # noqa: E402
from llmcompress.config import CompressConfig, QuantFormat  # noqa: E402
from llmcompress.precision import compute_dtype, forward_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tests" / "data" / "lmeval"
TASK = "austen_cloze"
ITEMS = 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's matmuls are far smaller than the cost of waking a second thread: on a busy
    2-core machine each one waited milliseconds for it, and the lm-eval runs here took 10x as long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    """A 4-bit RTN checkpoint of a tiny Llama (with its tokenizer), and the float model it came from."""
    out = tmp_path_factory.mktemp("lmeval") / "w4"
    float_model = tiny_model("llama")
    model = tiny_model("llama")
    llmcompress.compress(model, CompressConfig(quant=QuantFormat(bits=4, group_size=32)), calibration="none",
                         output_dir=out, tokenizer=tokenizer, progress=False)
    return out, float_model


def _loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str, dtype: torch.dtype) -> float:  # noqa: ANN001
    """log p(continuation | context), split into tokens as lm-eval splits it (the whole string, then the context's prefix)."""
    whole = tokenizer.encode(context + continuation)
    prefix = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad(), forward_weights(model, dtype):
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return float(sum(logprobs[position - 1, whole[position]] for position in range(prefix, len(whole))))


def test_compress_eval_tasks_and_the_registered_class_give_the_compressed_models_numbers(checkpoints, tokenizer, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    checkpoint, float_model = checkpoints
    record_file = tmp_path / "tasks.json"
    result = CliRunner().invoke(main, ["eval", str(checkpoint), "--tasks", TASK, "--tasks-path", str(TASKS_DIR), "--batch-size", "4",
                                       "--json", str(record_file)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert TASK in result.output and "acc_norm" in result.output and "computed in float32" in result.output
    cli = json.loads(record_file.read_text())["lm_eval"]["results"][TASK]
    assert 0.0 <= cli["acc,none"] <= 1.0 and 0.0 <= cli["acc_norm,none"] <= 1.0

    # The class as lm-eval's registry resolves it from its name, loading the checkpoint from its path.
    results = lm_eval.simple_evaluate(model="llmcompress", model_args={"pretrained": str(checkpoint)}, tasks=[TASK], device="cpu",
                                      batch_size=4, task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                                      log_samples=True)
    assert results["n-samples"][TASK]["effective"] == ITEMS
    assert results["results"][TASK]["acc,none"] == cli["acc,none"]
    assert results["results"][TASK]["acc_norm,none"] == cli["acc_norm,none"]

    compressed, _ = llmcompress.load(checkpoint)
    samples = results["samples"][TASK]
    theirs, ours, float_ones = [], [], []
    for sample in samples[:6]:
        for (context, continuation), (loglikelihood, _) in zip(sample["arguments"], sample["filtered_resps"]):
            theirs.append(loglikelihood)
            ours.append(_loglikelihood(compressed, tokenizer, context, continuation, torch.float32))
            float_ones.append(_loglikelihood(float_model, tokenizer, context, continuation, torch.float32))
    assert theirs == pytest.approx(ours, abs=1e-3)
    assert max(abs(a - b) for a, b in zip(theirs, float_ones)) > 0.05, "lm-eval scored the float model, not the compressed one"
    # acc is the share of documents whose true ending is the likeliest choice, from those same numbers.
    right = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) == s["target"] for s in samples]
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(right) / len(right))


def test_a_16_bit_checkpoint_is_scored_in_the_compute_dtype_and_keeps_its_weights(tmp_path, tokenizer):
    from lm_eval.api.instance import Instance

    checkpoint = tmp_path / "w4-fp16"
    llmcompress.compress(tiny_model("llama", dtype=torch.float16), CompressConfig(quant=QuantFormat(bits=4, group_size=32)),
                         calibration="none", output_dir=checkpoint, tokenizer=tokenizer, progress=False)
    lm = lmeval.LLMCompressLM(str(checkpoint), device="cpu")
    wanted = compute_dtype(torch.float16, "cpu")
    assert lm.compute_dtype == wanted
    pair = ("Anne's good-will, however, was not to be lessened", " by what she heard.")
    (loglikelihood, _), = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0)], disable_tqdm=True)
    assert loglikelihood == pytest.approx(_loglikelihood(lm.model, tokenizer, *pair, wanted), abs=1e-3)
    assert {p.dtype for p in lm.model.parameters() if p.is_floating_point()} == {torch.float16}


def test_bad_task_options_are_refused_before_the_model_loads(tmp_path):
    # (An unknown task name is refused there too, but only after lm-eval has indexed its own tasks: 10 s.)
    missing_model = tmp_path / "no-such-checkpoint"
    for options, message in ((["--tasks-path", str(tmp_path / "nowhere")], "is not a directory"),
                             (["--baseline"], "--baseline scores perplexity"), (["--tasks", " , "], "names no task")):
        result = CliRunner().invoke(main, ["eval", str(missing_model), "--tasks", TASK, *options])
        assert result.exit_code != 0 and message in result.output and "loading" not in result.output, result.output


def test_python_m_llmcompress_lmeval_is_lm_eval_with_the_class_registered(checkpoints):
    checkpoint, _ = checkpoints
    run = subprocess.run([sys.executable, "-m", "llmcompress.lmeval", "--model", "llmcompress", "--model_args", f"pretrained={checkpoint}",
                          "--tasks", TASK, "--include_path", str(TASKS_DIR), "--device", "cpu", "--limit", "2"],
                         capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert TASK in run.stdout and "acc" in run.stdout


def test_the_entry_point_names_the_registered_class():
    """lm-eval releases that read the ``lm_eval.models`` entry-point group find the class by it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    module, _, name = entry_points[lmeval.MODEL_NAME].partition(":")
    assert getattr(import_module(module), name) is lmeval.LLMCompressLM


def test_plain_lm_eval_hf_with_trust_remote_code_scores_a_native_checkpoint(checkpoints, tokenizer, tmp_path):
    """The route with no llmcompress on lm-eval's side: the checkpoint's ``auto_map`` leads transformers
    (and so lm-eval's ``hf`` model) to ``llmcompress.load``."""
    checkpoint, float_model = checkpoints
    run = subprocess.run(["lm_eval", "--model", "hf", "--model_args", f"pretrained={checkpoint},trust_remote_code=True,dtype=float32",
                          "--tasks", TASK, "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "4", "--limit", "6",
                          "--log_samples", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, check=False, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                              "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()]
    assert len(samples) == 6
    compressed, _ = llmcompress.load(checkpoint)
    theirs, ours, float_ones = [], [], []
    for sample in samples:
        # Written to the file as {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}.
        pairs = [(arguments["arg_0"], arguments["arg_1"]) for arguments in sample["arguments"].values()]
        for (context, continuation), (loglikelihood, _) in zip(pairs, sample["filtered_resps"], strict=True):
            theirs.append(float(loglikelihood))
            ours.append(_loglikelihood(compressed, tokenizer, context, continuation, torch.float32))
            float_ones.append(_loglikelihood(float_model, tokenizer, context, continuation, torch.float32))
    assert theirs == pytest.approx(ours, abs=1e-3)
    assert max(abs(a - b) for a, b in zip(theirs, float_ones)) > 0.05, "lm-eval scored the float model, not the compressed one"
