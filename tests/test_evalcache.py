"""The float model's perplexity is scored once per model files, text and protocol."""

import json
import os

from click.testing import CliRunner

from llmcompress.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


EVAL = ("--calib", "none", "--group-size", 32, "--eval-seqlen", 64, "--eval-windows", 3)


def test_a_second_run_takes_the_float_perplexity_from_the_cache(tiny_model_dir, tmp_path):
    first = _run(tiny_model_dir, "--out", tmp_path / "a", *EVAL)
    assert first.exit_code == 0, first.output
    assert "evaluating the float model" in first.output and "cached" not in first.output
    second = _run(tiny_model_dir, "--out", tmp_path / "b", *EVAL)
    assert second.exit_code == 0, second.output
    assert "evaluating the float model" not in second.output and "cached from an earlier run" in second.output
    before = [json.loads((tmp_path / out / "compression_report.json").read_text())["perplexity_before"] for out in "ab"]
    assert before[0] == before[1]


def test_another_protocol_or_a_changed_model_file_is_scored_again(tiny_model_dir, tmp_path):
    assert _run(tiny_model_dir, "--out", tmp_path / "a", *EVAL).exit_code == 0
    longer = _run(tiny_model_dir, "--out", tmp_path / "b", *EVAL, "--eval-windows", 4)
    assert "evaluating the float model" in longer.output
    weights = tiny_model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = _run(tiny_model_dir, "--out", tmp_path / "c", *EVAL)
    assert "evaluating the float model" in touched.output


def test_a_torn_cache_entry_is_scored_again(tiny_model_dir, tmp_path):
    assert _run(tiny_model_dir, "--out", tmp_path / "a", *EVAL).exit_code == 0
    (entry,) = (tmp_path / "perplexity-cache").iterdir()
    entry.write_text("{not json")
    again = _run(tiny_model_dir, "--out", tmp_path / "b", *EVAL)
    assert again.exit_code == 0 and "evaluating the float model" in again.output
    assert json.loads(entry.read_text())["perplexity"] > 0
