"""The compute dtype: forwards of 16-bit models on a CPU run in bfloat16 or float32, while what
the model stores is never rounded through it."""

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model

import llmcompress
from llmcompress.config import CalibConfig, CompressConfig, QuantFormat
from llmcompress.errors import ConfigError
from llmcompress.evaluate import perplexity
from llmcompress.nn import CompressedLinear
from llmcompress.precision import compute_dtype, computing_in, native_bfloat16
from llmcompress.throughput import forward_flops, linear_weights, matmul_peak


def _windows(count=6, length=48, seed=1):
    return torch.randint(0, TINY_VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def test_auto_computes_16_bit_models_on_a_cpu_in_a_fast_dtype_and_keeps_float32():
    fast = torch.bfloat16 if native_bfloat16() else torch.float32
    assert compute_dtype(torch.float16, "cpu") == fast
    assert compute_dtype(torch.bfloat16, "cpu") == fast
    assert compute_dtype(torch.float32, "cpu") == torch.float32
    assert compute_dtype(torch.float16, "cuda") == torch.float16  # GPUs multiply float16 natively
    assert compute_dtype(torch.float16, "cpu", "float32") == torch.float32
    with pytest.raises(ValueError, match="compute dtype 'half' is not one of auto, float32"):
        compute_dtype(torch.float16, "cpu", "half")


def test_computing_in_gives_back_the_very_tensors_and_keeps_ties():
    model = tiny_model("llama", dtype=torch.float16)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    before = {name: parameter for name, parameter in model.named_parameters(remove_duplicate=False)}
    stored = {name: parameter.detach().clone() for name, parameter in before.items()}
    with computing_in(model, torch.float32):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    for name, parameter in model.named_parameters(remove_duplicate=False):
        assert parameter is before[name] and torch.equal(parameter, stored[name])


def test_a_float16_model_calibrates_in_the_compute_dtype_and_stores_float16():
    """GPTQ on a float16 model is as good whichever dtype the forwards ran in (its codes are not
    the same: GPTQ's rounding choices cascade, and float16 against float32 moves them as much),
    and everything it keeps uncompressed is still float16, bit for bit."""
    errors = {}
    for dtype in ("auto", "float32", "float16"):
        model = tiny_model("llama", dtype=torch.float16)
        norm = model.model.norm.weight.detach().clone()
        config = CompressConfig(quant=QuantFormat(bits=4, group_size=32), method="gptq", calib=CalibConfig(compute_dtype=dtype))
        llmcompress.compress(model, config, calibration=_windows(), progress=False)
        assert model.model.norm.weight.dtype == torch.float16 and torch.equal(model.model.norm.weight, norm)
        assert model.compression_report.compute_dtype == str(compute_dtype(torch.float16, "cpu", dtype)).replace("torch.", "")
        assert isinstance(model.model.layers[0].mlp.down_proj, CompressedLinear)
        layers = model.compression_report.layers
        errors[dtype] = sum(record.output_error for record in layers) / len(layers)
    assert errors["auto"] == pytest.approx(errors["float32"], rel=0.01)
    assert errors["float16"] == pytest.approx(errors["float32"], rel=0.01)


def test_compute_dtype_is_validated():
    with pytest.raises(ConfigError, match="compute_dtype"):
        CalibConfig(compute_dtype="half")


def test_perplexity_of_a_float16_model_is_computed_in_the_compute_dtype(tokenizer):
    model = tiny_model("llama", dtype=torch.float16)
    ids = _windows(1, 8 * 33, seed=3).reshape(-1)
    fast = perplexity(model, tokenizer, ids, seqlen=33, progress=False)
    exact = perplexity(model, tokenizer, ids, seqlen=33, progress=False, dtype="float32")
    assert fast.dtype == str(compute_dtype(torch.float16, "cpu")).replace("torch.", "") and exact.dtype == "float32"
    assert fast.perplexity == pytest.approx(exact.perplexity, rel=0.01)
    assert next(model.parameters()).dtype == torch.float16
    assert fast.gflops > 0


def test_flops_count_every_linear_weight_and_the_peak_is_measured():
    model = tiny_model("llama")
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear_weights(model) == weights
    config = model.config
    assert forward_flops(model, 2, 16) == 2 * 16 * (2 * weights + 2 * 2 * config.hidden_size * 8 * config.num_hidden_layers)
    assert matmul_peak(torch.float32, repeats=1) > 0
