"""What a native checkpoint tells transformers about itself: the ``auto_map`` that leads
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` to
``autoload``, the file it names, and our ``quantization_config`` registered with transformers,
whose ``AutoQuantizationConfig`` (called by lm-eval's ``hf`` model on every config) otherwise
refuses a method it does not know. Registered on import; ``autoload`` imports this module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from .outdir import REMOTE_CODE_FILE

QUANT_METHOD = "llmcompress"
AUTO_MAP = {"AutoConfig": f"{Path(REMOTE_CODE_FILE).stem}.LLMCompressConfig",
            "AutoModelForCausalLM": f"{Path(REMOTE_CODE_FILE).stem}.LLMCompressForCausalLM"}


class LLMCompressQuantizationConfig(QuantizationConfigMixin):
    """Our ``quantization_config`` as transformers holds it: the JSON of checkpoint.py, kept whole."""

    def __init__(self, **config) -> None:  # noqa: ANN003
        self.__dict__.update(config)
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict:
        return dict(self.__dict__)


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(LLMCompressQuantizationConfig)


def write_remote_code(directory: Path) -> None:
    """The file ``AUTO_MAP`` points to, into a checkpoint being written."""
    shutil.copyfile(Path(__file__).with_name("remote_code.py"), directory / REMOTE_CODE_FILE)
