"""Evaluation reports: run a grid of configurations on one model and write report.md, report.json and plots."""

from pathlib import Path

from .document import build_report, markdown
from .grid import Configuration, Grid, Protocol, load_grid
from .plots import check_available as check_plotting
from .plots import draw_all
from .runner import command_line, eval_command_line, run_grid

DEFAULT_GRID = Path(__file__).with_name("default_grid.yaml")

__all__ = ["DEFAULT_GRID", "Configuration", "Grid", "Protocol", "build_report", "check_plotting", "command_line", "draw_all", "eval_command_line",
           "load_grid", "markdown", "run_grid"]
