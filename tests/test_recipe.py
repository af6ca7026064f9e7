"""Recipes: what they accept, how they round-trip, and the one-line errors for bad ones."""

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_VOCAB, tiny_model

import llmcompress
from llmcompress import ConfigError, Recipe, load_recipe
from llmcompress.cli import main
from llmcompress.config import CalibConfig, CompressConfig, LowRankConfig, ModuleOverride, QuantFormat
from llmcompress.flags import recipe_from_config

CALIB = {"source": "austen:train", "nsamples": 4, "seqlen": 48, "seed": 0, "batch_size": 4}


def _windows():
    return torch.randint(0, TINY_VOCAB, (4, 48), generator=torch.Generator().manual_seed(1))


def _recipe(*passes, **extra):
    return {"calibration": CALIB, "passes": list(passes), **extra}


@pytest.mark.parametrize(("data", "message"), [
    (_recipe({"quantise": {"bits": 4}}), r"passes\[0\].*unknown pass 'quantise': the passes are lowrank, prune, quantize, rotate, smooth"),
    (_recipe({"quantize": {"bitz": 4}}), r"passes\[0\] \(quantize\): unknown option\(s\) bitz; quantize takes .*bits"),
    (_recipe({"quantize": {"bits": 12}}), r"passes\[0\] \(quantize\): QuantFormat.bits=12 .*2 to 8 bits"),
    (_recipe({"quantize": {"method": "rtn", "act_order": True}}), r"act_order is a GPTQ option; use method: gptq"),
    (_recipe({"lowrank": {"rank": 8}}, {"quantize": {"bits": 4}}), r"passes\[0\] \(lowrank\) must come after a quantize pass"),
    (_recipe({"quantize": {"bits": 4}}, {"smooth": {"method": "awq"}}), r"passes\[1\] \(smooth\) .* must come before passes\[0\] \(quantize\)"),
    (_recipe({"quantize": {"bits": 4, "overrides": [{"pattern": "down", "bits": 1}]}}), r"override 'down': QuantFormat.bits=1"),
    (_recipe({"quantize": {"bits": 4, "overrides": [{"pattern": "down", "rank": 1}]}}), r"override 'down': .*unexpected keyword.*rank"),
    (_recipe({"quantize": {"bits": 4, "targets": ["(unclosed"]}}), r"target pattern '\(unclosed' is not a valid regular expression"),
    (_recipe({"prune": {"method": "wanda", "pattern": "5:4"}}), r"passes\[0\] \(prune\): PruneConfig.pattern='5:4'"),
    (_recipe(), r"the recipe has no passes"),
    ({"passes": [{"quantize": {}}], "calibrate": {}}, r"unknown key\(s\) calibrate"),
    (_recipe("quantize"), r"passes\[0\]: each pass is a one-key mapping"),
])
def test_bad_recipes_name_the_entry_and_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


def test_two_quantize_passes_on_one_module_are_refused_before_any_work():
    recipe = _recipe({"quantize": {"bits": 4, "group_size": 32}}, {"quantize": {"bits": 8, "group_size": 32, "targets": ["down_proj"]}})
    with pytest.raises(ConfigError, match=r"passes\[0\] \(quantize\) and passes\[1\] \(quantize\) both apply to model.layers.0.mlp.down_proj"):
        llmcompress.compress(tiny_model(), recipe, calibration=_windows(), progress=False)


def test_a_lowrank_pass_on_a_module_no_quantize_pass_targets_is_refused():
    recipe = _recipe({"quantize": {"bits": 4, "group_size": 32, "targets": ["mlp"]}}, {"lowrank": {"method": "lorc", "rank": 4}})
    with pytest.raises(ConfigError, match=r"passes\[1\] \(lowrank\) applies to model.layers.0.self_attn.q_proj, but no pass sets its fmt"):
        llmcompress.compress(tiny_model(), recipe, calibration=_windows(), progress=False)


def test_the_api_takes_a_recipe_object_a_dict_or_a_path(tmp_path):
    data = _recipe({"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}, {"lowrank": {"method": "eora", "rank": 4, "targets": ["mlp"]}})
    path = tmp_path / "r.yaml"
    path.write_text(Recipe.from_dict(data).to_yaml())
    outputs = []
    for recipe in (Recipe.from_dict(data), data, path, str(path)):
        model = llmcompress.compress(tiny_model(), recipe, calibration=_windows(), progress=False)
        ranks = {r.name.rsplit(".", 2)[-2] + "." + r.name.rsplit(".", 1)[-1]: r.rank for r in model.compression_report.layers[:7]}
        assert ranks["mlp.down_proj"] == 4 and ranks["self_attn.q_proj"] == 0
        outputs.append(model(torch.arange(20).reshape(1, 20)).logits)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_targets_ignore_and_overrides_choose_each_modules_config():
    recipe = Recipe.from_dict(_recipe({"quantize": {"bits": 4, "group_size": 32, "overrides": [{"pattern": "q_proj", "skip": True},
                                                                                                {"pattern": "proj", "bits": 8}]}},
                                      {"lowrank": {"method": "lorc", "rank": 2, "targets": ["mlp"]}}, ignore=[r"layers\.1\."]))
    assert recipe.configs_for("model.layers.1.mlp.up_proj") is None
    assert recipe.configs_for("model.layers.0.self_attn.q_proj") is None
    quantize, lowrank = recipe.configs_for("model.layers.0.mlp.up_proj")
    assert quantize.bits == 8 and lowrank.rank == 2
    quantize, lowrank = recipe.configs_for("model.layers.0.self_attn.o_proj")
    assert quantize.bits == 8 and lowrank is None


def test_yaml_round_trip_and_set():
    recipe = recipe_from_config(CompressConfig(quant=QuantFormat(bits=3, group_size=64), method="awq+gptq", calib=CalibConfig(nsamples=16),
                                               lowrank=LowRankConfig(rank=8), overrides=(ModuleOverride(pattern="lm", skip=True),
                                                                                         ModuleOverride(pattern="down", bits=8, rank=0))))
    again = Recipe.from_dict(__import__("yaml").safe_load(recipe.to_yaml()))
    assert again == recipe
    changed = recipe.with_settings(["quantize.bits=4", "calibration.nsamples=32", "passes.2.rank=16", "quantize.group_size=-1"])
    assert changed.passes[1].config.bits == 4 and changed.passes[1].config.group_size == -1
    assert changed.calib.nsamples == 32 and changed.passes[2].config.rank == 16
    with pytest.raises(ConfigError, match=r"--set 'prune.sparsity=0.5': no such place in the recipe; its passes are smooth, quantize, lowrank"):
        recipe.with_settings(["prune.sparsity=0.5"])
    with pytest.raises(ConfigError, match=r"QuantFormat.bits=9"):
        recipe.with_settings(["quantize.bits=9"])


def test_missing_or_broken_recipe_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="recipe file .*nothing.yaml' does not exist"):
        load_recipe(tmp_path / "nothing.yaml")
    (tmp_path / "bad.yaml").write_text("passes: [quantize: {bits: 4}\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_the_cli_refuses_flags_beside_a_recipe_and_sets_fields(tmp_path):
    (tmp_path / "r.yaml").write_text(Recipe.from_dict(_recipe({"quantize": {"bits": 4}})).to_yaml())
    runner = CliRunner()
    result = runner.invoke(main, ["--recipe", str(tmp_path / "r.yaml"), "--bits", "3", "--print-recipe"])
    assert result.exit_code != 0 and "--bits is part of the recipe, which --recipe" in result.output and "--set" in result.output
    result = runner.invoke(main, ["--recipe", str(tmp_path / "r.yaml"), "--skip", "q_proj", "--override", "k:bits=8", "--print-recipe"])
    assert "--skip, --override are part of the recipe" in result.output
    result = runner.invoke(main, ["--recipe", str(tmp_path / "r.yaml"), "--set", "quantize.bits=3", "--print-recipe"])
    assert result.exit_code == 0 and "bits: 3" in result.output
    result = runner.invoke(main, ["--recipe", str(tmp_path / "r.yaml"), "--set", "quantize.bitz=3", "--print-recipe"])
    assert result.exit_code != 0 and "unknown option(s) bitz" in result.output
