"""The package's modules import each other without cycles (every import statement counts, also
those inside functions), so each can be read and tested from its dependencies up."""

from import_graph import cycles, import_graph


def test_llmcompress_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


def test_the_checker_finds_a_cycle(tmp_path):
    package = tmp_path / "llmcompress"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def late():\n    from ..a import name\n")
    (package / "c.py").write_text("import llmcompress.a\n")
    assert cycles(import_graph(package)) == [["llmcompress.a", "llmcompress.sub.b"]]


def test_the_checker_counts_the_package_init_an_import_runs(tmp_path):
    """checkpoint importing export.gptq runs export/__init__, which imported checkpoint: a cycle
    although gptq.py itself imports nothing of ours."""
    package = tmp_path / "llmcompress"
    (package / "export").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "checkpoint.py").write_text("def read():\n    from .export import gptq\n")
    (package / "export" / "__init__.py").write_text("from .. import checkpoint\nfrom . import gptq\n")
    (package / "export" / "gptq.py").write_text("")
    assert cycles(import_graph(package)) == [["llmcompress.checkpoint", "llmcompress.export"]]
