"""What a native checkpoint tells transformers about itself: the ``auto_map`` that leads
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` to
``autoload``, and the file it names. ``autoload`` registers our ``quantization_config`` with
transformers when that file imports it: importing transformers' quantizers takes 1.5 s, which
``import llmcompress`` should not pay.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .outdir import REMOTE_CODE_FILE

QUANT_METHOD = "llmcompress"
AUTO_MAP = {"AutoConfig": f"{Path(REMOTE_CODE_FILE).stem}.LLMCompressConfig",
            "AutoModelForCausalLM": f"{Path(REMOTE_CODE_FILE).stem}.LLMCompressForCausalLM"}


def write_remote_code(directory: Path) -> None:
    """The file ``AUTO_MAP`` points to, into a checkpoint being written."""
    shutil.copyfile(Path(__file__).with_name("remote_code.py"), directory / REMOTE_CODE_FILE)
