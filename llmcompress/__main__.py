"""``python -m llmcompress``: the ``compress`` command, for when the console script is not on PATH."""

from .cli import main

main(prog_name="compress")
