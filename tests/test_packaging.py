"""A non-editable install carries the CUDA kernel sources. A wheel of the checkout is built (offline,
without build isolation, from a copy so that the checkout gets no build/ or egg-info), it must
hold every kernels/*.cu and *.cuh, and installed into a scratch prefix, its loader must find them
there with no checkout beside it (pyproject.toml's data-files, launch.installed_kernels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from llmcompress.cuda import launch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(path.name for path in (ROOT / "kernels").iterdir() if path.suffix in (".cu", ".cuh"))
# What setuptools reads to build the wheel (pyproject.toml names README.md as the readme).
BUILD_INPUTS = ("pyproject.toml", "README.md", "llmcompress", "kernels")


def _run(*command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    tree = work / "tree"
    tree.mkdir()
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, tree / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(work / "dist"),
         str(tree), cwd=work)
    (built,) = (work / "dist").glob("llmcompress-*.whl")
    return built


def test_the_wheel_carries_every_kernel_source(wheel: Path) -> None:
    assert {source.filename for source in launch.SOURCES.values()} <= set(KERNEL_FILES)
    with zipfile.ZipFile(wheel) as archive:
        shipped = {Path(name).name: name for name in archive.namelist() if f"/data/{launch.INSTALLED_KERNELS}/" in name}
        assert sorted(shipped) == KERNEL_FILES
        for name, member in shipped.items():
            assert archive.read(member) == (ROOT / "kernels" / name).read_bytes(), name


def test_the_installed_loader_finds_its_sources_without_a_checkout(wheel: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    # --ignore-installed: with --prefix alone, pip would first uninstall the llmcompress this
    # environment runs the tests from (an editable install of the checkout).
    ours = sorted(Path(sysconfig.get_paths()["purelib"]).glob("*llmcompress*"))
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--ignore-installed", "-q",
         "--prefix", str(prefix), str(wheel), cwd=tmp_path)
    assert sorted(Path(sysconfig.get_paths()["purelib"]).glob("*llmcompress*")) == ours, "the install touched this environment"
    site = next(prefix.rglob("llmcompress/__init__.py")).parents[1]
    assert not (site / "kernels").exists()  # nothing at the checkout's place: the sources must come from the data directory
    # The installed package ahead of the checkout's editable install; run from tmp_path, not the checkout.
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop(launch.KERNEL_ENV, None)
    report = json.loads(_run(sys.executable, "-c", """import json
from llmcompress.cuda import launch
print(json.dumps({"module": launch.__file__, "installed": str(launch.installed_kernels()),
                  "paths": {name: str(source.path) for name, source in launch.SOURCES.items()},
                  "texts": {name: launch.kernel_text(source) for name, source in launch.SOURCES.items()}}))""",
                             cwd=tmp_path, env=env))
    assert Path(report["module"]).is_relative_to(site)
    installed = Path(report["installed"])
    assert installed.is_relative_to(prefix.resolve()) and sorted(path.name for path in installed.iterdir()) == KERNEL_FILES
    for name, source in launch.SOURCES.items():
        assert Path(report["paths"][name]) == installed / source.filename
        assert report["texts"][name] == launch.kernel_text(source)  # the header found beside it, as in the checkout
