"""The rotate pass: a rotated model computes what the float model did, before any quantization;
rotations compose with the passes after them; the run refuses models a rotation does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from conftest import tiny_model
from llmcompress import api
from llmcompress.checkpoint import load
from llmcompress.cli import main
from llmcompress.errors import ConfigError, ModelError
from llmcompress.export import export
from llmcompress.nn import CompressedLinear
from llmcompress.passes.rotate import RotatePass, RotatePassConfig
from llmcompress.pipeline import find_decoder_blocks
from llmcompress.pipeline.rotation import prepare_rotations
from llmcompress.recipe import Recipe
from llmcompress.surgery import standard_layers
from test_moe import moe_model

TOKENS = torch.arange(40).reshape(2, 20) * 7 % 384


def _random_norms(model: nn.Module) -> nn.Module:
    """Norm weights away from 1, so that folding them is tested too."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and "norm" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model


def _rotate_float(model: nn.Module, config: RotatePassConfig = RotatePassConfig(online=None)) -> nn.Module:
    standard_layers(model)
    blocks_path, blocks = find_decoder_blocks(model)
    (rotation,) = prepare_rotations(model, blocks, [(RotatePass(0), config)], torch.device("cpu"))
    for index, block in enumerate(blocks):
        rotation.block(index, block, f"{blocks_path}.{index}", [])
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_rotated_float_model_computes_the_same_logits(family):
    model = _random_norms(tiny_model(family))
    expected = _logits(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _rotate_float(model)
    assert torch.allclose(_logits(model), expected, atol=2e-4, rtol=1e-4)
    if tied:
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert model.config.tie_word_embeddings is False
    # The residual stream really is rotated: the embeddings changed.
    assert not torch.allclose(model.get_input_embeddings().weight, tiny_model(family).get_input_embeddings().weight)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_rotated_moe_model_computes_the_same_logits(family):
    model = _random_norms(moe_model(family))
    expected = _logits(model)
    _rotate_float(model)
    assert torch.allclose(_logits(model), expected, atol=2e-4, rtol=1e-4)


def test_layernorm_models_are_refused_in_one_line():
    model = tiny_model("opt")
    with pytest.raises(ModelError, match="rotate: .*(LayerNorm|position embeddings)"):
        _rotate_float(model)


def test_online_hadamard_keeps_the_function_and_survives_a_checkpoint(tmp_path):
    model = _random_norms(tiny_model("llama"))
    expected = _logits(model)
    recipe = Recipe.from_dict({"passes": [{"rotate": {"seed": 3}}, {"quantize": {"bits": 8, "group_size": 32, "symmetric": True}}]})
    compressed = api.compress(model, recipe, output_dir=tmp_path / "out", progress=False)
    down = compressed.model.layers[0].mlp.down_proj
    assert isinstance(down, CompressedLinear) and down.layout.input_hadamard == 96
    assert compressed.model.layers[0].self_attn.o_proj.layout.input_hadamard == 0
    logits = _logits(compressed)
    assert (logits - expected).norm() / expected.norm() < 0.02
    loaded, _ = load(tmp_path / "out")
    assert torch.equal(_logits(loaded), logits)
    with pytest.raises(Exception, match="rotated online"):
        export(loaded, tmp_path / "ct", format="compressed-tensors")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotation_composes_with_quantization(method):
    """With outlier channels in the residual stream (the embeddings' first three), rotating first
    makes 3-bit RTN closer to the float model; GPTQ runs on the rotated statistics as well."""
    windows = torch.randint(0, 384, (8, 64), generator=torch.Generator().manual_seed(0))
    errors = {}
    for rotate in (False, True):
        model = _random_norms(tiny_model("llama"))
        with torch.no_grad():
            model.model.embed_tokens.weight[:, :3] *= 20
        expected = _logits(model)
        passes = ([{"rotate": {}}] if rotate else []) + [{"quantize": {"method": method, "bits": 3, "group_size": 32}}]
        compressed = api.compress(model, {"passes": passes}, calibration=windows, progress=False)
        errors[rotate] = float((_logits(compressed) - expected).norm() / expected.norm())
    assert errors[True] < 0.1 if method == "gptq" else errors[True] < 0.8 * errors[False]


def test_from_disk_rotation_matches_in_memory(tmp_path, tiny_model_dir):
    recipe = {"passes": [{"rotate": {"seed": 1}}, {"quantize": {"bits": 4, "group_size": 32}}]}
    disk, _ = api.compress_to_disk(str(tiny_model_dir), recipe, tmp_path / "disk", calibration="none", progress=False)
    memory = api.compress(str(tiny_model_dir), recipe, calibration="none", progress=False)
    assert torch.equal(_logits(load(disk)[0]), _logits(memory))


def test_recipe_rules():
    with pytest.raises(ConfigError, match="must come before every other kind"):
        Recipe.from_dict({"passes": [{"quantize": {}}, {"rotate": {}}]})
    with pytest.raises(ConfigError, match="takes no targets"):
        Recipe.from_dict({"passes": [{"rotate": {"targets": ["mlp"]}}, {"quantize": {}}]})
    with pytest.raises(ConfigError, match="block_size"):
        RotatePassConfig(block_size=48)
    with pytest.raises(ConfigError, match="online"):
        RotatePassConfig(online="(")


@pytest.mark.parametrize("passes", [
    [{"smooth": {"method": "awq"}}, {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
    [{"prune": {"method": "wanda", "pattern": "2:4"}}, {"quantize": {"bits": 4, "group_size": 32}}],
    [{"quantize": {"bits": 3, "group_size": 32}}, {"lowrank": {"method": "eora", "rank": 8}}],
    [{"smooth": {"method": "svdquant"}}, {"quantize": {"bits": 4, "group_size": 32, "act_bits": 4}}, {"lowrank": {"method": "svdquant", "rank": 8}}],
])
def test_rotation_composes_with_every_later_pass(passes):
    """Each later pass runs on the rotated model and loses about what it loses without rotation."""
    windows = torch.randint(0, 384, (8, 64), generator=torch.Generator().manual_seed(0))
    errors = {}
    for rotate in (False, True):
        model = _random_norms(tiny_model("llama"))
        expected = _logits(model)
        compressed = api.compress(model, {"passes": [{"rotate": {}}] * rotate + passes}, calibration=windows, progress=False)
        errors[rotate] = float((_logits(compressed) - expected).norm() / expected.norm())
    assert compressed.model.layers[0].mlp.down_proj.layout.input_hadamard == 96
    assert errors[True] < 1.5 * errors[False], errors


def test_rotation_composes_with_experts():
    model = _random_norms(moe_model("qwen3_moe"))
    expected = _logits(model)
    windows = torch.randint(0, 384, (8, 64), generator=torch.Generator().manual_seed(0))
    recipe = {"passes": [{"rotate": {}}, {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]}
    compressed = api.compress(model, recipe, calibration=windows, progress=False)
    experts = compressed.model.layers[0].mlp.experts
    assert all(isinstance(e.down_proj, CompressedLinear) and e.down_proj.layout.input_hadamard for e in experts)
    assert float((_logits(compressed) - expected).norm() / expected.norm()) < 0.5


def test_the_command_line_rotates_and_quantizes_activations(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(tiny_model_dir), "--rotate", "--bits", "8", "--group-size", "-1", "--sym", "--act-bits", "8",
                                       "--act-format", "fp8_e4m3", "--calib", "none", "--no-eval", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "compressing: Hadamard rotation (seed 0, online down_proj) + rtn INT8 per-channel sym, activations FP8-E4M3 per-token" in result.output
    model, _ = load(out)
    down = model.model.layers[0].mlp.down_proj
    assert down.layout.input_hadamard == 96 and down.layout.act_format.kind == "fp8_e4m3"
    assert [next(iter(p)) for p in Recipe.from_dict(json.loads((out / "config.json").read_text())["quantization_config"]["recipe"]).to_dict()["passes"]] == ["rotate", "quantize"]
