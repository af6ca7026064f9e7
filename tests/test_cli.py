import json

import pytest
import torch
from click.testing import CliRunner

import llmcompress
from llmcompress.cli import main
from llmcompress.nn import CompressedLinear


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compress_tiny_model_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = _run(tiny_model_dir, "--out", out, "--bits", 4, "--group-size", 32, "--sym", "--calib", "austen:train",
                  "--nsamples", 4, "--seqlen", 64, "--eval-seqlen", 64, "--eval-windows", 3, "--override", "down_proj:bits=8")
    assert result.exit_code == 0, result.output
    for text in ("compressing: rtn INT4 g32 sym, calibration austen:train", "quantized layers: bits/weight", "perplexity", f"wrote: {out}"):
        assert text in result.output
    report = json.loads((out / "compression_report.json").read_text())
    assert report["calibration_tokens"] == 256 and report["perplexity_after"]["windows"] == 3
    assert report["size_after"]["layer_bits_per_weight"] < report["size_before"]["layer_bits_per_weight"]
    model, tokenizer = llmcompress.load(out)
    assert model.model.layers[0].mlp.down_proj.fmt.bits == 8 and model.model.layers[0].mlp.up_proj.fmt.bits == 4
    assert tokenizer is not None


def test_bad_inputs_fail_with_a_message_and_no_traceback(tiny_model_dir, tmp_path):
    result = _run(tiny_model_dir, "--out", tmp_path / "o", "--bits", 5, "--format", "nvfp4")
    assert result.exit_code == 1 and "QuantFormat.bits=5 is not allowed: nvfp4 is a 4-bit format" in result.output
    result = _run(tmp_path / "missing", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "does not exist" in result.output
    result = _run(tiny_model_dir, "--out", tmp_path / "o", "--no-eval")
    assert result.exit_code == 1 and "group_size=128 is larger than" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    result = _run(tiny_model_dir, "--out", tmp_path / "taken", "--group-size", 32)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert not list(tmp_path.glob(".o.incomplete*")) and not (tmp_path / "o").exists()


def test_lowrank_options_reach_the_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "lorc"
    result = _run(tiny_model_dir, "--out", out, "--bits", 3, "--group-size", 32, "--lowrank", 4, "--calib", "none", "--no-eval",
                  "--lowrank-dtype", "int8", "--override", "down_proj:rank=2")
    assert result.exit_code == 0, result.output
    assert "compressing: rtn INT3 g32 asym + lorc rank 4, data-free" in result.output and "of which low-rank branch" in result.output
    model, _ = llmcompress.load(out)
    assert model.model.layers[0].mlp.down_proj.layout.rank == 2 and model.model.layers[0].mlp.up_proj.layout.rank == 4
    assert model.model.layers[0].mlp.up_proj.lowrank_a.dtype == torch.int8
    out = tmp_path / "svdquant"
    result = _run(tiny_model_dir, "--out", out, "--bits", 4, "--group-size", 32, "--lowrank", 4, "--lowrank-method", "svdquant",
                  "--act-bits", 4, "--nsamples", 4, "--seqlen", 32, "--no-eval")
    assert result.exit_code == 0, result.output
    assert "compressing: svdquant smoothing + rtn INT4 g32 asym, activations INT4 g64 + svdquant rank 4, calibration austen:train" in result.output
    result = _run(tiny_model_dir, "--out", tmp_path / "big", "--group-size", 32, "--lowrank", 1000, "--calib", "none", "--no-eval")
    assert result.exit_code == 1 and "larger than" in result.output and "smaller --lowrank" in result.output


def test_help_lists_the_options():
    result = _run("run", "--help")
    assert result.exit_code == 0
    for option in ("--bits", "--group-size", "--sym", "--format", "--method", "--calib", "--nsamples", "--seqlen", "--seed", "--eval", "--device", "--out",
                   "--lowrank", "--lowrank-method", "--lowrank-alloc", "--lowrank-dtype", "--act-bits"):
        assert option in result.output


def test_compress_bundled_smollm2(tmp_path, smollm2_dir):
    """Issue 2's acceptance run, shortened: RTN W4 g128 asym on the bundled default, scored on 1024
    tokens before and after (a float16 forward on a CPU without half-precision arithmetic takes
    about 25 s per 1024 tokens of SmolLM2)."""
    out = tmp_path / "smol"
    result = _run("--bits", 4, "--group-size", 128, "--method", "rtn", "--out", out, "--eval-seqlen", 512, "--eval-windows", 2)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compression_report.json").read_text())
    # g128 does not divide the 576-input layers: they get g64 (4.35 bits), down_proj keeps g128.
    assert report["size_after"]["layer_bits_per_weight"] <= 4.32
    assert report["size_after"]["layer_formats"] == {"INT4 g64 asym": 180, "INT4 g128 asym": 30}
    assert "layer formats: INT4 g64 asym x 180, INT4 g128 asym x 30" in result.output
    float_ppl, rtn_ppl = report["perplexity_before"]["perplexity"], report["perplexity_after"]["perplexity"]
    assert 20 < float_ppl < 40 and float_ppl < rtn_ppl < 1.5 * float_ppl
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk < 0.45 * report["size_before"]["bytes"]
    model, tokenizer = llmcompress.load(out)
    assert sum(isinstance(m, CompressedLinear) for m in model.modules()) == 30 * 7
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    fresh = llmcompress.compress(str(smollm2_dir), llmcompress.CompressConfig(), progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_calibrated_methods_from_the_command_line(tiny_model_dir, tmp_path, method):
    out = tmp_path / method
    result = _run(tiny_model_dir, "--out", out, "--bits", 3, "--group-size", 32, "--method", method, "--nsamples", 4,
                  "--seqlen", 64, "--dynamic-groups", "--damp", 0.05, "--awq-grid", 4, "--no-eval")
    assert result.exit_code == 0, result.output
    described = {"gptq": "gptq INT3 g32 asym", "awq+gptq": "awq smoothing + gptq INT3 g32 asym"}[method]
    assert f"compressing: {described}, calibration austen:train" in result.output
    recipe = llmcompress.load(out)[0].llmcompress_config
    quantize = next(entry.config for entry in recipe.passes if entry.kind == "quantize")
    assert not quantize.static_groups and quantize.damp == 0.05 and recipe.calib.nsamples == 4
    assert [entry.config.grid for entry in recipe.passes if entry.kind == "smooth"] == ([4] if method == "awq+gptq" else [])


def test_export_from_the_command_line_and_the_native_fallback(tiny_model_dir, tmp_path):
    out = tmp_path / "ct"
    result = _run(tiny_model_dir, "--out", out, "--group-size", 32, "--lowrank", 12, "--calib", "none", "--no-eval",
                  "--export", "compressed-tensors")
    assert result.exit_code == 0, result.output
    assert "writing" in result.output and "rank 12 padded with zeros to 16, a rank vLLM serves" in result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "compression_report.json").is_file()
    model, _ = llmcompress.load(out)
    assert model.llmcompress_config is None and isinstance(model.model.layers[0].mlp.up_proj, CompressedLinear)

    native = tmp_path / "native"
    assert _run(tiny_model_dir, "--out", native, "--group-size", 32, "--calib", "none", "--no-eval").exit_code == 0
    result = _run("export", native, "--format", "compressed-tensors", "--out", tmp_path / "converted")
    assert result.exit_code == 0, result.output
    assert f"wrote: {tmp_path / 'converted'}" in result.output

    # Without --adapter a branch has no place in compressed-tensors: refused, and the work is kept as a native checkpoint.
    kept = tmp_path / "kept"
    result = _run(tiny_model_dir, "--out", kept, "--group-size", 32, "--lowrank", 8, "--calib", "none", "--no-eval",
                  "--export", "compressed-tensors", "--no-adapter")
    assert result.exit_code == 1 and "low-rank branch" in result.output and "as a native checkpoint instead" in result.output
    assert llmcompress.load(kept)[0].llmcompress_config is not None


def test_asymmetric_gptq_is_refused_for_vllm_and_written_for_transformers(tiny_model_dir, tmp_path):
    refused = _run(tiny_model_dir, "--out", tmp_path / "v", "--group-size", 32, "--calib", "none", "--no-eval", "--export", "gptq")
    assert refused.exit_code == 1 and "gptq for vllm cannot hold 21 layer(s)" in refused.output
    assert "export compressed-tensors (vLLM serves asymmetric INT4 from it), or compress with --sym" in refused.output
    result = _run(tiny_model_dir, "--out", tmp_path / "g", "--group-size", 32, "--calib", "none", "--no-eval", "--export", "gptq",
                  "--engine", "transformers")
    assert result.exit_code == 0, result.output
    assert "zero point minus one" in result.output and "vLLM refuses them" in result.output
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"


def test_eval_scores_a_checkpoint_against_its_float_model(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = _run(tiny_model_dir, "--out", out, "--bits", 3, "--group-size", 32, "--calib", "none", "--eval-seqlen", 64, "--eval-windows", 3)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compression_report.json").read_text())
    numbers = tmp_path / "eval.json"
    result = _run("eval", out, "--seqlen", 64, "--windows", 3, "--baseline", "--json", numbers)
    assert result.exit_code == 0, result.output
    record = json.loads(numbers.read_text())
    # The same numbers as the compress run's own evaluation, which used the same protocol.
    assert record["perplexity"]["perplexity"] == report["perplexity_after"]["perplexity"]
    assert record["baseline"]["perplexity"] == report["perplexity_before"]["perplexity"]
    assert record["float_model"] == str(tiny_model_dir.resolve())
    assert f"difference {record['delta']:+.3f}" in result.output and "protocol: austen:test, 3 non-overlapping windows of 64 tokens" in result.output
    result = _run("eval", tiny_model_dir, "--seqlen", 64, "--windows", 2, "--baseline")
    assert result.exit_code == 1 and "does not record the float model it came from: pass --float-model" in result.output
