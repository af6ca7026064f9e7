"""`compress report`: a grid of real compress runs, resumable, whose numbers are those of separate runs."""

import json
import sys

import pytest
import yaml
from click.testing import CliRunner

import llmcompress
from llmcompress.cli import main
from llmcompress.errors import ConfigError
from llmcompress.reports import load_grid
from llmcompress.reports.document import layer_errors, pareto_front

pytest.importorskip("matplotlib")

PROTOCOL = {"calibration": {"source": "austen:train", "nsamples": 4, "seqlen": 64},
            "evaluation": {"text": "austen:test", "seqlen": 64, "windows": 3}}
SEPARATE_RUN_PROTOCOL = ["--calib", "austen:train", "--nsamples", "4", "--seqlen", "64", "--eval-seqlen", "64", "--eval-windows", "3"]
RTN = "--bits 4 --group-size 32"
GPTQ_LORC = "--method gptq --bits 3 --group-size 32 --lowrank 4 --lowrank-method lorc"


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _write_grid(path, model, configurations, **extra):
    path.write_text(yaml.safe_dump({"model": str(model), **PROTOCOL, "configurations": configurations, **extra}))
    return path


def test_report_numbers_equal_separate_runs_and_an_interrupted_grid_resumes(tiny_model_dir, tmp_path):
    grid = _write_grid(tmp_path / "grid.yaml", tiny_model_dir, [
        {"name": "float", "float": True}, {"name": "rtn-w4", "args": RTN}, {"name": "gptq-w3-lorc4", "args": GPTQ_LORC}],
        heatmaps=["rtn-w4", "gptq-w3-lorc4"])
    out = tmp_path / "report"
    result = _run("report", "--grid", grid, "--out", out)
    assert result.exit_code == 0, result.output
    assert "[1/3] float" in result.output and "[3/3] gptq-w3-lorc4" in result.output and "to run, about" in result.output
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}

    # The same configurations run separately, as a user would type them, evaluated in the same run.
    for name, args in (("rtn-w4", RTN), ("gptq-w3-lorc4", GPTQ_LORC)):
        separate = tmp_path / f"separate-{name}"
        result = _run(tiny_model_dir, "--out", separate, *args.split(), *SEPARATE_RUN_PROTOCOL)
        assert result.exit_code == 0, result.output
        numbers = json.loads((separate / "compression_report.json").read_text())
        assert rows[name]["perplexity"] == numbers["perplexity_after"]["perplexity"]
        assert rows["float"]["perplexity"] == numbers["perplexity_before"]["perplexity"]
        bits = rows[name]["bits_per_weight"]
        assert bits["layers"] == numbers["size_after"]["layer_bits_per_weight"]
        assert bits["lowrank"] == numbers["size_after"]["branch_bits_per_weight"]
        assert bits["base"] + bits["lowrank"] + bits["metadata"] == pytest.approx(bits["layers"])
        assert rows[name]["weights_on_disk_bytes"] == sum(f.stat().st_size for f in separate.glob("*.safetensors"))
    assert rows["rtn-w4"]["bits_per_weight"]["base"] == 4.0 and rows["gptq-w3-lorc4"]["bits_per_weight"]["lowrank"] > 0
    assert rows["gptq-w3-lorc4"]["rank"] == 4 and rows["gptq-w3-lorc4"]["lowrank_method"] == "lorc"
    assert rows["rtn-w4"]["compress_peak_rss_mb"] > 100 and rows["rtn-w4"]["compression_seconds"] >= 0
    assert report["protocol"]["tokens_scored"] == 3 * 63 and report["environment"]["torch"] and len(report["run_commits"]) == 1
    assert set(report["heatmaps"]) == {"rtn-w4", "gptq-w3-lorc4"}
    assert len(report["heatmaps"]["rtn-w4"]["output_error"]) == 7 and report["heatmaps"]["rtn-w4"]["blocks"] == 3
    markdown = (out / "report.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| rtn-w4"))
    assert "| rtn | INT4 g32 asym |  |  | " + f"{rows['rtn-w4']['perplexity']:.3f} |" in line
    assert "![Perplexity against bits per weight](pareto.png)" in markdown and "## Protocol" in markdown
    for plot in ("pareto.png", "rank.png", "layer_error.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoints" / "rtn-w4").exists()  # not kept unless asked; the per-layer statistics are
    assert (out / "runs" / "rtn-w4" / "compression_report.json").is_file()

    # Rerun: nothing is redone. Then one configuration "interrupted" (no result) and one changed: only those run.
    finished = {name: (out / "runs" / name / "result.json").stat().st_mtime_ns for name in rows}
    result = _run("report", "--grid", grid, "--out", out)
    assert result.exit_code == 0 and "3 of 3 configurations finished earlier" in result.output and "[1/3]" not in result.output
    assert {name: (out / "runs" / name / "result.json").stat().st_mtime_ns for name in rows} == finished
    (out / "runs" / "rtn-w4" / "result.json").unlink()
    _write_grid(grid, tiny_model_dir, [{"name": "float", "float": True}, {"name": "rtn-w4", "args": RTN},
                                       {"name": "gptq-w3-lorc4", "args": GPTQ_LORC.replace("lowrank 4", "lowrank 8")}])
    result = _run("report", "--grid", grid, "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 of 3 configurations finished earlier" in result.output and "[1/3]" not in result.output
    assert "[2/3] rtn-w4" in result.output and "[3/3] gptq-w3-lorc4" in result.output
    again = {row["name"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert again["rtn-w4"]["perplexity"] == rows["rtn-w4"]["perplexity"] and again["gptq-w3-lorc4"]["rank"] == 8


def test_a_failing_configuration_is_reported_and_the_rest_still_run(tiny_model_dir, tmp_path):
    grid = _write_grid(tmp_path / "grid.yaml", tiny_model_dir, [{"name": "float", "float": True}, {"name": "rtn-w4", "args": RTN}])
    data = yaml.safe_load(grid.read_text())
    data["calibration"]["nsamples"] = 100_000  # more calibration text than the bundled split has
    grid.write_text(yaml.safe_dump(data))
    out = tmp_path / "report"
    result = _run("report", "--grid", grid, "--out", out, "--keep-checkpoints")
    assert result.exit_code == 1 and "1 configuration(s) failed: rtn-w4" in result.output
    report = json.loads((out / "report.json").read_text())
    assert [row["status"] for row in report["rows"]] == ["ok", "failed"]
    assert "compress exited with 1" in report["rows"][1]["error"] and "calibration" in report["rows"][1]["log_tail"]
    assert "## Failed configurations" in (out / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"configurations": [{"name": "a", "args": "--bits 4 --calib none"}]}, "sets --calib, which the grid sets"),
    ({"configurations": [{"name": "a", "args": "--bits 4"}, {"name": "a", "args": "--bits 3"}]}, "repeated: a"),
    ({"configurations": [{"name": "a/b", "args": "--bits 4"}]}, "'a/b': use letters, digits"),
    ({"configurations": [{"name": "a"}]}, "has no args"),
    ({"configurations": [{"name": "a", "args": "--bits 4", "rank": 3}]}, "unknown key(s) rank"),
    ({"heatmaps": ["nope"]}, "heatmaps name configurations that are not in the grid: nope"),
    ({"evaluation": {"seqlen": 0}}, "seqlen=0 must be a positive integer"),
    ({"device": "tpu"}, "grid device 'tpu'"),
])
def test_bad_grids_are_refused_naming_the_entry(tmp_path, change, message):
    data = {**PROTOCOL, "configurations": [{"name": "a", "args": "--bits 4"}], **change}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="grid file .*grid.yaml: ") as caught:
        load_grid(tmp_path / "grid.yaml")
    assert message in str(caught.value)


def test_every_configuration_is_checked_against_the_model_before_any_runs(tiny_model_dir, tmp_path):
    for args, message in (("--bits 5 --format nvfp4", "nvfp4 is a 4-bit format"), ("--lowrank 500", "rank"),
                          ("--bits 4 --frobnicate", "No such option '--frobnicate'")):
        grid = _write_grid(tmp_path / "grid.yaml", tiny_model_dir, [{"name": "ok", "args": RTN}, {"name": "bad", "args": args}])
        result = _run("report", "--grid", grid, "--out", tmp_path / "report")
        assert result.exit_code == 1 and "grid configuration 'bad'" in result.output and message in result.output, result.output
        assert not (tmp_path / "report").exists()
    result = _run("report", "--grid", tmp_path / "missing.yaml", "--out", tmp_path / "report")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_a_missing_matplotlib_is_named_before_the_grid_runs(tiny_model_dir, tmp_path, monkeypatch):
    grid = _write_grid(tmp_path / "grid.yaml", tiny_model_dir, [{"name": "rtn-w4", "args": RTN}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra sees
    result = _run("report", "--grid", grid, "--out", tmp_path / "report")
    assert result.exit_code == 1 and "pip install 'llmcompress[report]'" in result.output
    assert not (tmp_path / "report").exists()


def test_pareto_front_keeps_the_points_nothing_beats():
    points = {"float": (16.0, 30.0), "a": (4.2, 40.0), "b": (4.2, 38.0), "c": (5.6, 39.0), "d": (3.2, 100.0), "e": (5.6, 33.0)}
    assert pareto_front(points) == ["d", "b", "e", "float"]


def test_point_labels_stay_inside_the_axes_and_off_each_other_and_the_points():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmcompress.reports.plots import _place_labels

    # A cluster at the same bits per weight (as GPTQ / AWQ / RTN at 4.19), one point far right
    # whose label would run off the axes, and one in the top-left corner under the legend.
    points = [(f"method-{i}-w4g128", 4.19, 34 + 3 * i) for i in range(5)]
    points += [("magnitude-50-unstructured", 16.0, 320.0), ("float16", 16.0, 31.5), ("rtn-w3g128", 3.19, 300.0)]
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.scatter([p[1] for p in points], [p[2] for p in points], label="configurations")
    axes.set_yscale("log")
    axes.legend(loc="upper left")
    figure.tight_layout()
    _place_labels(figure, axes, points)
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in axes.texts]
    frame = axes.get_window_extent(renderer)
    plt.close(figure)
    assert len(boxes) == len(points)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_layer_errors_are_laid_out_by_block_and_layer_type():
    layers = [{"name": f"model.layers.{b}.{kind}", "output_error": b + i / 10}
              for b in range(2) for i, kind in enumerate(["mlp.down_proj", "self_attn.q_proj", "mlp.fc9"])]
    heatmap = layer_errors({"num_blocks": 3, "layers": layers})
    assert heatmap["layer_types"] == ["q_proj", "down_proj", "fc9"]
    assert heatmap["output_error"] == [[0.1, 1.1, None], [0.0, 1.0, None], [0.2, 1.2, None]]


def test_the_bundled_default_grid_is_valid():
    grid = load_grid(llmcompress.reports.DEFAULT_GRID)
    assert grid.model is None and grid.float_configuration is not None and len(grid.configurations) >= 15
