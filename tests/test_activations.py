"""Quantized activations through the pipeline: W8A8 INT8 and FP8 per token, static per-tensor
scales calibrated offline, power-of-two scales, FP8 activations on FP4 weights; what the
checkpoint records is what a load computes with."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from llmcompress import api
from llmcompress.actformat import ActFormat, fake_quantize_activations
from llmcompress.checkpoint import load
from llmcompress.errors import ConfigError
from llmcompress.export import ExportError, export
from llmcompress.nn import CompressedLinear
from llmcompress.passes import QuantizePassConfig
from llmcompress.recipe import Recipe

TOKENS = torch.arange(40).reshape(2, 20) * 7 % 384
WINDOWS = torch.randint(0, 384, (8, 64), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _compress(quantize: dict, tmp_path, rotate: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    model = tiny_model("llama")
    expected = _logits(model)
    passes = ([{"rotate": {}}] if rotate else []) + [{"quantize": quantize}]
    compressed = api.compress(model, Recipe.from_dict({"passes": passes}), calibration=WINDOWS, output_dir=tmp_path / "out", progress=False)
    return compressed, expected


@pytest.mark.parametrize("quantize, act", [
    ({"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8}, ActFormat(kind="int", bits=8)),
    ({"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8, "act_kind": "fp8_e4m3"}, ActFormat(kind="fp8_e4m3", bits=8)),
    ({"bits": 4, "group_size": 32, "act_bits": 8, "act_kind": "fp8_e4m3", "act_pow2": True},
     ActFormat(kind="fp8_e4m3", bits=8, pow2_scales=True)),
    ({"kind": "nvfp4", "act_bits": 8, "act_kind": "fp8_e4m3"}, ActFormat(kind="fp8_e4m3", bits=8)),
    ({"bits": 4, "group_size": 32, "act_bits": 4}, ActFormat(kind="int", bits=4, group_size=64)),
])
def test_activation_formats_are_recorded_and_loaded(quantize, act, tmp_path):
    compressed, expected = _compress(quantize, tmp_path)
    layer = compressed.model.layers[1].mlp.up_proj
    assert isinstance(layer, CompressedLinear) and layer.layout.act_format == act
    logits = _logits(compressed)
    # W8A8 stays close to the float model (FP8-E4M3 rounds to 3 mantissa bits); 4-bit weights on a random tiny model lose more.
    assert (logits - expected).norm() / expected.norm() < (0.1 if quantize.get("bits") == 8 else 0.4)
    loaded, _ = load(tmp_path / "out")
    assert loaded.model.layers[1].mlp.up_proj.layout.act_format == act
    assert torch.equal(_logits(loaded), logits)


def test_a_static_scale_is_calibrated_stored_and_used(tmp_path):
    compressed, expected = _compress({"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8, "act_kind": "fp8_e4m3",
                                      "act_static": True}, tmp_path)
    layer = compressed.model.layers[0].self_attn.q_proj
    scale = layer.input_scale
    assert scale.shape == (1,) and float(scale) > 0
    # The scale maps the largest calibration input onto FP8's largest value.
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    _logits(compressed)
    handle.remove()
    x = seen[0].float()
    assert torch.equal(layer(x) - (layer.bias if layer.bias is not None else 0),
                       torch.nn.functional.linear(fake_quantize_activations(x, layer.layout.act_format, scale), layer.dequantized_weight()))
    loaded, _ = load(tmp_path / "out")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.input_scale, scale)
    assert torch.equal(_logits(loaded), _logits(compressed))


def test_rotation_before_activation_quantization(tmp_path):
    errors = {}
    for rotate in (False, True):
        compressed, expected = _compress({"bits": 4, "group_size": 32, "act_bits": 4}, tmp_path / str(rotate), rotate=rotate)
        errors[rotate] = float((_logits(compressed) - expected).norm() / expected.norm())
    assert errors[True] < 0.5 and errors[False] < 0.5


def test_bad_activation_options_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="give act_bits"):
        QuantizePassConfig(act_kind="fp8_e4m3")
    with pytest.raises(ConfigError, match="act_kind"):
        QuantizePassConfig(act_bits=8, act_kind="fp16")
    with pytest.raises(ConfigError, match="fp8_e4m3 takes bits=8"):
        QuantizePassConfig(act_bits=4, act_kind="fp8_e4m3")
    with pytest.raises(ConfigError, match="static"):
        QuantizePassConfig(act_bits=8, act_static=True, act_group_size=64)
    assert QuantizePassConfig(act_bits=8, act_static=True).needs_calibration


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_int8_exports_as_compressed_tensors(static, tmp_path):
    quantize = {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8, "act_static": static}
    compressed, _ = _compress(quantize, tmp_path)
    out = export(compressed, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert config["format"] == group["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == ("tensor" if static else "token")
    assert group["input_activations"]["dynamic"] is not static and group["weights"]["strategy"] == "channel"
    tensors = load_file(out / "model.safetensors")
    layer = compressed.model.layers[0].self_attn.q_proj
    weight, scale = tensors["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    assert weight.dtype == torch.int8 and scale.shape == (layer.out_features, 1)
    # vLLM's W8A8 computes with int8 codes times one float scale per output channel: the weight we computed with.
    assert torch.equal(weight.float() * scale, layer.dequantized_weight())
    assert ("model.layers.0.self_attn.q_proj.input_scale" in tensors) is static


def test_activation_formats_a_serving_export_cannot_hold_are_refused(tmp_path):
    compressed, _ = _compress({"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8, "act_kind": "fp8_e4m3"}, tmp_path)
    with pytest.raises(ExportError, match="FP8 activations need FP8 weights"):
        export(compressed, tmp_path / "fp8", format="compressed-tensors")
    compressed, _ = _compress({"bits": 4, "group_size": 32, "symmetric": True, "act_bits": 8}, tmp_path / "w4a8")
    with pytest.raises(ExportError, match="symmetric INT8 per-channel weights"):
        export(compressed, tmp_path / "w4a8-ct", format="compressed-tensors")
    with pytest.raises(ExportError, match="activations are quantized"):
        export(compressed, tmp_path / "w4a8-gptq", format="gptq")


def test_smoothquant_moves_activation_outliers_into_the_weights(tmp_path):
    """With outlier channels in the residual stream, SmoothQuant's scale (folded into the norms)
    makes W8A8 INT8 closer to the float model than W8A8 alone."""
    errors = {}
    for smooth in (False, True):
        model = tiny_model("llama")
        with torch.no_grad():
            model.model.embed_tokens.weight[:, :3] *= 30
        expected = _logits(model)
        passes = ([{"smooth": {"method": "smoothquant"}}] if smooth else []) + [
            {"quantize": {"bits": 8, "group_size": -1, "symmetric": True, "act_bits": 8}}]
        compressed = api.compress(model, {"passes": passes}, calibration=WINDOWS, progress=False)
        errors[smooth] = float((_logits(compressed) - expected).norm() / expected.norm())
        if smooth:
            assert "smoothquant" in compressed.compression_report.layers[0].method
    assert errors[True] < 0.8 * errors[False]


def test_smoothquant_needs_quantized_activations():
    with pytest.raises(ConfigError, match="act_bits"):
        api.compress(tiny_model("llama"), {"passes": [{"smooth": {"method": "smoothquant"}}, {"quantize": {"bits": 8, "group_size": -1}}]},
                     calibration=WINDOWS, progress=False)


def test_zeroquant_fp_recipe_fp4_weights_fp8_activations_pow2_scales_and_lorc(tmp_path):
    recipe = {"passes": [{"quantize": {"kind": "mxfp4", "act_bits": 8, "act_kind": "fp8_e4m3", "act_pow2": True}},
                         {"lowrank": {"method": "lorc", "rank": 8}}]}
    model = tiny_model("llama")
    expected = _logits(model)
    compressed = api.compress(model, recipe, calibration="none", output_dir=tmp_path / "out", progress=False)
    layer = compressed.model.layers[0].mlp.gate_proj
    assert layer.layout.act_format == ActFormat(kind="fp8_e4m3", bits=8, pow2_scales=True) and layer.layout.rank == 8
    assert float((_logits(compressed) - expected).norm() / expected.norm()) < 0.4
    loaded, _ = load(tmp_path / "out")
    assert torch.equal(_logits(loaded), _logits(compressed))
