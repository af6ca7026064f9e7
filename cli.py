"""Run the `compress` command from a checkout: `python cli.py [MODEL] --bits 4 --out DIR`.

The installed console script `compress` calls the same `llmcompress.cli:main`; the code lives
in the package so that it is importable and tested wherever llmcompress is installed.
"""

from llmcompress.cli import main

if __name__ == "__main__":
    main()
