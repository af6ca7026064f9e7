"""Nothing changes by accident: the golden runs (``golden_runs.py``) write the same bytes as they
did before the pass/recipe refactor, and a recipe file gives the same bytes as the flags."""

import json

import pytest
from click.testing import CliRunner
from golden_runs import RECORD, RUNS, STREAMED, all_hashes, machine_key, run_in_memory

from llmcompress.cli import main
from llmcompress.flags import recipe_from_config
from llmcompress.recipe import Recipe, load_recipe


def test_every_golden_run_writes_the_recorded_bytes(tmp_path):
    recorded = json.loads(RECORD.read_text())
    if recorded["machine"] != machine_key():
        pytest.skip(f"the record was made on {recorded['machine']}; this is {machine_key()}, whose floating point may differ")
    hashes = all_hashes(tmp_path)
    assert set(hashes) == set(recorded["runs"]) == {*RUNS, STREAMED}
    changed = {name: sorted(k for k in {*hashes[name], *recorded["runs"][name]} if hashes[name].get(k) != recorded["runs"][name].get(k))
               for name in hashes}
    assert not any(changed.values()), {name: keys[:5] for name, keys in changed.items() if keys}


@pytest.mark.parametrize("name", ["gptq-eora", "svdquant-w4a4", "sparsegpt-gptq", "overrides"])
def test_a_recipe_written_as_yaml_gives_the_bytes_of_its_config(name, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe_from_config(RUNS[name]).to_yaml())
    assert run_in_memory("from-yaml", load_recipe(recipe_file), tmp_path) == run_in_memory("from-config", RUNS[name], tmp_path)


def test_print_recipe_then_recipe_file_gives_the_bytes_of_the_flags(tiny_model_dir, tmp_path):
    flags = ["--bits", "3", "--group-size", "32", "--method", "gptq", "--lowrank", "4", "--prune", "wanda", "--pattern", "2:4",
             "--override", "down_proj:bits=8", "--calib", "austen:train", "--nsamples", "4", "--seqlen", "48", "--no-eval"]
    runner = CliRunner()
    printed = runner.invoke(main, [str(tiny_model_dir), *flags, "--print-recipe"], catch_exceptions=False)
    assert printed.exit_code == 0 and "- quantize:" in printed.output
    (tmp_path / "r.yaml").write_text(printed.output)
    by_flags = runner.invoke(main, [str(tiny_model_dir), *flags, "--out", str(tmp_path / "flags")], catch_exceptions=False)
    by_recipe = runner.invoke(main, [str(tiny_model_dir), "--recipe", str(tmp_path / "r.yaml"), "--no-eval", "--out", str(tmp_path / "recipe")],
                              catch_exceptions=False)
    assert by_flags.exit_code == 0 and by_recipe.exit_code == 0, by_flags.output + by_recipe.output
    files = sorted(p.name for p in (tmp_path / "flags").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "recipe").glob("*.safetensors"))
    for file in files:
        assert (tmp_path / "flags" / file).read_bytes() == (tmp_path / "recipe" / file).read_bytes()
    # The checkpoint's own recipe file reproduces it too.
    again = runner.invoke(main, [str(tiny_model_dir), "--recipe", str(tmp_path / "flags" / "recipe.yaml"), "--no-eval",
                                 "--out", str(tmp_path / "again")], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    for file in files:
        assert (tmp_path / "flags" / file).read_bytes() == (tmp_path / "again" / file).read_bytes()
    assert Recipe.from_dict(json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["recipe"]) == \
        load_recipe(tmp_path / "flags" / "recipe.yaml")
