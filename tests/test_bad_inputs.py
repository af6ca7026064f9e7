"""Bad inputs and concurrent runs (issue 35): each is refused in one line that names the problem and
the fix, before any work, and no failed run leaves anything that looks like a result."""

import errno
import fcntl
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmcompress import checkpoint, fileio, rundir
from llmcompress.cli import main
from llmcompress.errors import CheckpointError
from llmcompress.lock import lock_path, output_lock

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_RUN = ("--group-size", 32, "--no-eval")  # RTN on the tiny Llama (max_position_embeddings 512), in a second or two


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _refusal(result) -> str:  # noqa: ANN001 - a click Result
    """The one error line of a refused run (and that it is one line, with no traceback)."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def _left_beside(out: Path) -> list[str]:
    """What a run on ``out`` left in its parent directory, other than the model."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != "tiny-llama")


# ----------------------------------------------------------------------------- window lengths


def test_a_window_beyond_the_models_positions_is_refused_before_any_work(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    line = _refusal(_run(tiny_model_dir, "--out", out, "--method", "gptq", "--seqlen", 100000, "--nsamples", 1, *TINY_RUN))
    assert line == ("Error: --seqlen 100000 is beyond the model's 512 positions (max_position_embeddings in its config.json): "
                    "use --seqlen 512 or less")
    result = _run(tiny_model_dir, "--out", out, "--group-size", 32, "--eval-seqlen", 4096)
    assert "use --eval-seqlen 512 or less" in _refusal(result) and "loading" not in result.output
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("calibration: {seqlen: 2048}\npasses:\n- quantize: {method: gptq, group_size: 32}\n")
    line = _refusal(_run(tiny_model_dir, "--out", out, "--recipe", recipe, "--no-eval"))
    assert "calibration.seqlen 2048 is beyond the model's 512 positions" in line and "--set calibration.seqlen=512 or less" in line
    assert _left_beside(out) == ["gptq.yaml"]
    assert "use --seqlen 512 or less" in _refusal(_run("eval", tiny_model_dir, "--seqlen", 1024))


def test_compress_eval_scores_windows_of_1024_tokens_like_compress():
    defaults = {command: {p.name: p.default for p in main.commands[command].params} for command in ("eval", "run")}
    assert defaults["eval"]["seqlen"] == defaults["run"]["eval_seqlen"] == 1024
    assert defaults["eval"]["windows"] == defaults["run"]["eval_windows"]


def test_the_readme_api_example_says_how_many_windows_it_scores():
    code, comment = re.search(r"max_windows=(\d+)\)\nprint\(result\)\s+# perplexity on (\d+) windows", README.read_text()).groups()
    assert code == comment


# ----------------------------------------------------------------------------- calibration text


def test_an_empty_or_too_short_calibration_text_is_named_with_its_token_count(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = _refusal(_run(tiny_model_dir, "--out", out, "--method", "gptq", "--calib", empty, "--nsamples", 2, "--seqlen", 64, *TINY_RUN))
    assert line == (f"Error: calibration text {empty} has 0 tokens, not enough for one window of 64: give a longer text "
                    "(2 x 64 = 128 tokens are asked for)")
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.")
    line = _refusal(_run(tiny_model_dir, "--out", out, "--method", "gptq", "--calib", short, "--nsamples", 2, "--seqlen", 64, *TINY_RUN))
    tokens = int(re.search(rf"calibration text {re.escape(str(short))} has (\d+) tokens, not enough for one window of 64", line).group(1))
    assert 2 < tokens < 64 and line.endswith(f"or shorter windows (--seqlen {tokens // 2} or less)")
    assert _left_beside(out) == ["empty.txt", "short.txt"]


# ----------------------------------------------------------------------------- options the recipe does not use


def test_options_the_run_does_not_use_are_warned_about(tiny_model_dir, tmp_path):
    result = _run(tiny_model_dir, "--out", tmp_path / "rtn", "--nsamples", 4, "--seqlen", 64, "--damp", 0.05, "--lowrank-alloc", "energy",
                  "--eval-windows", 3, *TINY_RUN)
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if "warning" in line] == [
        "warning: --nsamples, --seqlen have no effect: rtn INT4 g32 asym is data-free, so no calibration text is read; "
        "leave them out, or add --calib SOURCE to measure each layer's error on it",
        "warning: --damp, --lowrank-alloc have no effect on rtn INT4 g32 asym; leave them out, or add what uses them (compress run --help)",
        "warning: --eval-windows has no effect with --no-eval; leave it out, or drop --no-eval",
    ]
    # Used, they draw no warning: the calibration options with --calib (each layer's error is measured) or a
    # method that needs data, --damp with GPTQ, and defaults given explicitly.
    result = _run(tiny_model_dir, "--out", tmp_path / "gptq", "--method", "gptq", "--nsamples", 4, "--seqlen", 64, "--damp", 0.05,
                  "--bits", 4, *TINY_RUN)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    result = _run(tiny_model_dir, "--out", tmp_path / "measured", "--calib", "austen:train", "--nsamples", 4, "--seqlen", 64, *TINY_RUN)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    # The value an option resolves to when left out (the quick start's --group-size 128 for INT4, 16 for NVFP4) is used too.
    result = _run(tiny_model_dir, "--out", tmp_path / "nvfp4", "--format", "nvfp4", "--group-size", 16, "--calib", "none", "--no-eval")
    assert result.exit_code == 0 and "warning" not in result.output, result.output


# ----------------------------------------------------------------------------- the output directory


def test_an_output_in_a_directory_that_cannot_be_written_is_refused_before_work(tiny_model_dir, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory regardless of its mode")
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = _run(tiny_model_dir, "--out", parent / "o", *TINY_RUN)
        assert "(Permission denied): choose an --out in a directory you can write to" in _refusal(result)
        assert "loading" not in result.output and list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_an_unwritable_output_is_refused_before_work_even_for_root(tiny_model_dir, tmp_path, monkeypatch):
    """The probe that the test above meets through permissions, met here through the file system."""
    out = tmp_path / "o"
    real_mkstemp = fileio.tempfile.mkstemp

    def read_only_file_system(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only_file_system)
    line = _refusal(_run(tiny_model_dir, "--out", out, *TINY_RUN))
    assert line == (f"Error: cannot write in {tmp_path} (Read-only file system), where {out} would be made: "
                    "choose an --out in a directory you can write to")
    assert _left_beside(out) == []


def test_a_mount_point_output_is_refused_before_work(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "mounted"
    out.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == out)
    line = _refusal(_run(tiny_model_dir, "--out", out, *TINY_RUN))
    assert line == (f"Error: output directory {out} is a mount point, and a finished result is put in place by renaming it there: "
                    f"choose a directory inside it, e.g. --out {out / 'model'}")
    assert _left_beside(out) == ["mounted"] and list(out.iterdir()) == []


def test_a_result_that_cannot_be_renamed_into_place_leaves_nothing_that_looks_like_one(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"

    def busy(source, target):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(rundir, "replace_directory", busy)
    line = _refusal(_run(tiny_model_dir, "--out", out, *TINY_RUN))
    assert f"could not be renamed from {rundir.partial_path(out)} to {out} (Device or resource busy)" in line
    assert line.endswith("(nothing was kept)")
    assert _left_beside(out) == []


def test_a_failed_rename_puts_the_old_directory_back_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        fileio.replace_directory(tmp_path / "missing", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "config.json").read_text() == "{}"


def test_overwrite_removes_only_what_llmcompress_wrote(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    assert _run(tiny_model_dir, "--out", out, *TINY_RUN).exit_code == 0
    assert _run(tiny_model_dir, "--out", out, "--overwrite", *TINY_RUN).exit_code == 0  # a checkpoint of ours, block by block
    exported = tmp_path / "ct"
    args = ("--export", "compressed-tensors", "--lowrank", 12, "--calib", "none", *TINY_RUN)
    assert _run(tiny_model_dir, "--out", exported, *args).exit_code == 0
    assert {"adapter", "generation_config.json"} <= {p.name for p in exported.iterdir()}
    assert _run(tiny_model_dir, "--out", exported, "--overwrite", *args).exit_code == 0  # an export of ours, with its adapter

    (out / "notes.txt").write_text("mine")
    (out / "more.txt").write_text("mine too")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    line = _refusal(_run(tiny_model_dir, "--out", out, "--overwrite", *TINY_RUN))
    assert line == (f"Error: --overwrite replaces only what llmcompress wrote, and {out} also holds more.txt (and 1 more): "
                    "move it elsewhere, or choose another --out")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    partial = rundir.partial_path(tmp_path / "p")
    partial.mkdir()
    (partial / "thesis.tex").write_text("mine")
    assert "holds thesis.tex" in _refusal(_run(tiny_model_dir, "--out", tmp_path / "p", "--overwrite", *TINY_RUN))
    assert (partial / "thesis.tex").read_text() == "mine"


def test_written_files_follow_the_umask(tiny_model_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        assert fileio.umask() == 0o022
        assert _run(tiny_model_dir, "--out", tmp_path / "o", *TINY_RUN).exit_code == 0
        model, tokenizer = checkpoint.load(tmp_path / "o")
        os.umask(0o027)
        checkpoint.save(model, tmp_path / "saved", model.llmcompress_config, tokenizer=tokenizer)
    finally:
        os.umask(previous)
    for directory, file_mode, dir_mode in ((tmp_path / "o", 0o644, 0o755), (tmp_path / "saved", 0o640, 0o750)):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*")}
        assert any(name.endswith(".safetensors") for name in modes)
        assert set(modes.values()) == {file_mode}, modes
        assert stat.S_IMODE(directory.stat().st_mode) == dir_mode


# ----------------------------------------------------------------------------- concurrent runs


def test_a_second_run_on_the_same_output_refuses_and_leaves_the_first_alone(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    assert _run(tiny_model_dir, "--out", out, *TINY_RUN).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Another process's lock: flock on a description of its own, as a second process would hold it.
    descriptor = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(descriptor, b"4242\n")
        result = _run(tiny_model_dir, "--out", out, "--overwrite", *TINY_RUN)
        assert _refusal(result) == (f"Error: {out} is being written by another run (process 4242, which holds {lock_path(out)}): "
                                    "wait for it to finish, or choose another --out")
        assert "loading" not in result.output
        with pytest.raises(CheckpointError, match="being written by another run"):
            with output_lock(out):
                pass
    finally:
        os.close(descriptor)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _left_beside(out) == ["o", "o.lock"]  # the other process's, which it removes when it finishes


def test_a_killed_runs_lock_does_not_block_the_next_run(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(descriptor, fcntl.LOCK_EX)\n"
        "os.write(descriptor, b'%d' % os.getpid())\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"), str(lock_path(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert f"(process {holder.pid}, which holds" in _refusal(_run(tiny_model_dir, "--out", out, *TINY_RUN))
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).read_text() == str(holder.pid)  # killed, it left its file behind, but no lock
    assert _run(tiny_model_dir, "--out", out, *TINY_RUN).exit_code == 0
    assert _left_beside(out) == ["o"] and json.loads((out / "config.json").read_text())["quantization_config"]
