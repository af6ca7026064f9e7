"""The package's modules import each other without cycles (every import statement counts, also
those inside functions), so each can be read and tested from its dependencies up."""

from import_graph import cycles, import_graph


def test_llmcompress_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


def _plant(root, files: dict[str, str]):  # noqa: ANN001, ANN202 - a package llmcompress/ of these files under root
    package = root / "llmcompress"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_the_checker_finds_a_cycle(tmp_path):
    package = _plant(tmp_path, {"__init__.py": "", "a.py": "from .sub import b\n", "sub/__init__.py": "",
                                "sub/b.py": "def late():\n    from ..a import name\n", "c.py": "import llmcompress.a\n"})
    assert cycles(import_graph(package)) == [["llmcompress.a", "llmcompress.sub.b"]]


def test_the_checker_counts_the_package_init_an_import_runs(tmp_path):
    """checkpoint importing export.gptq runs export/__init__, which imported checkpoint: a cycle
    although gptq.py itself imports nothing of ours."""
    package = _plant(tmp_path, {"__init__.py": "", "checkpoint.py": "def read():\n    from .export import gptq\n",
                                "export/__init__.py": "from .. import checkpoint\nfrom . import gptq\n", "export/gptq.py": ""})
    assert cycles(import_graph(package)) == [["llmcompress.checkpoint", "llmcompress.export"]]
