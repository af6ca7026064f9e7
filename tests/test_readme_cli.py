"""The README's synopsis names every option of every command, and nothing that is not one."""

import re
from pathlib import Path

import click
from click.testing import CliRunner

from llmcompress.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _synopsis() -> dict[str, str]:
    """The synopsis block of the README's "Command line" section, as text per command."""
    section = README.read_text().split("## Command line", 1)[1]
    block = re.search(r"```\n(compress .*?)```", section, re.S).group(1)
    commands: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if line.startswith("compress"):
            words = line.split()
            current = words[1] if len(words) > 1 and words[1] in main.commands else "run"
            commands[current] = ""
        commands[current] += " " + line
    return commands


def test_the_readme_synopsis_matches_each_commands_options():
    synopsis = _synopsis()
    assert set(synopsis) == set(main.commands)
    for name, command in main.commands.items():
        options = [p for p in command.params if isinstance(p, click.Option) and "--help" not in p.opts]
        written = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", synopsis[name]))
        known = {opt for p in options for opt in (*p.opts, *p.secondary_opts)}
        assert written <= known, f"compress {name}: the README names {sorted(written - known)}, which --help does not have"
        missing = [p.opts[0] for p in options if not set(p.opts) & written]
        assert not missing, f"compress {name}: the README's synopsis lacks {missing}"


def test_help_lists_the_commands_and_groups_run_options_by_pass():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"]).output
    assert all(re.search(rf"^  {name}\s+\S", top, re.M) for name in main.commands)
    grouped = runner.invoke(main, ["run", "--help"]).output
    headings = [h for h in re.findall(r"^(\S[^:]*):$", grouped, re.M) if h != "Model"]  # click >= 8.2 lists arguments too
    assert headings[:3] == ["Recipe", "Quantize", "Low-rank branch"], headings
    assert {"Prune", "Calibration", "Evaluation", "Output"} <= set(headings) and "Other options" not in headings
