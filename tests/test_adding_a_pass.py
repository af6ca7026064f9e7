"""The worked example of docs/adding-a-pass.md, run as written: a new pass registered from
outside the package (no edit anywhere else) and run from a recipe file."""

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model

import llmcompress
from llmcompress import ConfigError, load_recipe
from llmcompress.passes import REGISTRY

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-pass.md"


def _block(language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", DOC.read_text(), re.S).group(1)


@pytest.fixture
def clamp_pass():
    namespace: dict = {}
    exec(compile(_block("python"), str(DOC), "exec"), namespace)  # noqa: S102 - the documented example itself
    yield namespace["ClampConfig"]
    REGISTRY.pop("clamp")


def test_the_documented_pass_is_short():
    assert len(_block("python").strip().splitlines()) < 50


def test_a_new_pass_runs_from_a_recipe_file(clamp_pass, tmp_path):
    recipe_file = tmp_path / "clamp.yaml"
    recipe_file.write_text(_block("yaml"))
    recipe = load_recipe(recipe_file)
    windows = torch.randint(0, TINY_VOCAB, (8, 64), generator=torch.Generator().manual_seed(1))
    model = llmcompress.compress(tiny_model(), recipe_file, calibration=windows, progress=False)
    layers = model.compression_report.layers
    assert {r.method for r in layers} == {"clamp+gptq"}
    assert recipe.configs_for("model.layers.0.mlp.down_proj")[0].sigmas == 4
    # The clamp really reached the quantizer: without it the weights' extremes survive.
    plain = llmcompress.compress(tiny_model(), {**recipe.to_dict(), "passes": recipe.to_dict()["passes"][1:]}, calibration=windows, progress=False)
    clamped_max = model.model.layers[0].self_attn.q_proj.dequantized_weight().abs().max()
    plain_max = plain.model.layers[0].self_attn.q_proj.dequantized_weight().abs().max()
    assert clamped_max < 0.9 * plain_max
    # Its checkpoint stores the recipe, new pass included, and loads back.
    llmcompress.checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    loaded, _ = llmcompress.load(tmp_path / "ckpt")
    assert loaded.llmcompress_config == model.llmcompress_config


def test_a_new_pass_alone_leaves_16_bit_layers(clamp_pass):
    model = llmcompress.compress(tiny_model(), {"passes": [{"clamp": {"sigmas": 1.5}}]}, progress=False)
    original = tiny_model().model.layers[0].mlp.up_proj.weight.detach()
    mean, spread = original.mean(dim=1, keepdim=True), 1.5 * original.std(dim=1, keepdim=True)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, torch.clamp(original, mean - spread, mean + spread))


def test_its_config_is_validated_like_any_other(clamp_pass):
    with pytest.raises(ConfigError, match=r"passes\[0\] \(clamp\): clamp.sigmas=-1 is not allowed"):
        load_recipe({"passes": [{"clamp": {"sigmas": -1}}, {"quantize": {"bits": 4}}]})
