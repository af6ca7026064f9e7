"""Which serving engine loads which of our number formats from which export format.

An export is written for an engine, and refuses before writing what that engine would refuse
at load time. ``vllm`` (the default) follows vLLM 0.32: its compressed-tensors W*A16 path has
kernels for INT4 with or without zero points and symmetric INT8 (Marlin, Machete, ExLlama on
GPUs; INT4 alone on CPUs), and NVFP4 on GPUs; its GPTQ path takes symmetric 4- and 8-bit codes
only (``Unsupported quantization config: bits=4, sym=False`` on every device). ``transformers``
loads every integer width compressed-tensors packs (it dequantizes them) and what GPTQModel
reads.
"""

from __future__ import annotations

from ..config import QuantFormat

ENGINES = ("vllm", "transformers")
DEFAULT_ENGINE = "vllm"
# (bits, symmetric) of the INT weights vLLM has a kernel for, per export format.
VLLM_INT = {"compressed-tensors": frozenset({(4, True), (4, False), (8, True)}), "gptq": frozenset({(4, True), (8, True)})}
# vLLM's CPU build runs W4A16 only (CPUWNA16: uint4 and uint4b8); the rest needs a GPU.
VLLM_CPU_INT = frozenset({(4, True), (4, False)})


def refusal(engine: str, format: str, fmt: QuantFormat) -> str | None:
    """Why ``engine`` would refuse a layer stored as ``fmt`` in ``format``, with the way out; None if it loads it."""
    if engine == "transformers" or fmt.is_fp4 or (fmt.bits, fmt.symmetric) in VLLM_INT[format]:
        return None
    if format == "gptq" and fmt.bits in (4, 8):
        return ("vLLM's GPTQ path takes symmetric 4- and 8-bit weights only, on every device: export compressed-tensors "
                "(vLLM serves asymmetric INT4 from it), or compress with --sym")
    if fmt.bits == 8:
        return "vLLM serves INT8 weights symmetric only: compress with --sym"
    return (f"vLLM has no kernel for INT{fmt.bits} weights: compress with --bits 4 or 8, or export with --engine transformers "
            f"(transformers loads it), or native")


def cpu_note(fmt: QuantFormat) -> str | None:
    """What vLLM's CPU build cannot run, though its GPU builds serve it."""
    if fmt.is_fp4:
        return f"vllm: {fmt.describe()} needs a GPU (vLLM's CPU build has no FP4 kernel)"
    if (fmt.bits, fmt.symmetric) not in VLLM_CPU_INT:
        return f"vllm: {fmt.describe()} needs a GPU (vLLM's CPU build runs INT4 weights only)"
    return None
