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
