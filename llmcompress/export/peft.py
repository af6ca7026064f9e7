"""A low-rank branch ``B (A x)`` as a PEFT LoRA adapter that ``peft.PeftModel`` and vLLM load.

LoRA computes ``base(x) + lora_B(lora_A(x)) * lora_alpha / r``; with ``lora_alpha = r`` the
scaling is 1 and ``lora_A.weight = A`` [r, K], ``lora_B.weight = B`` [N, r] reproduce our
branch exactly. vLLM serves only some ranks, so a branch of another rank is zero-padded up to
the next one it accepts (the padding adds nothing to the output). Pure functions: tensors and
the adapter_config dict.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def served_rank(rank: int) -> int:
    """The smallest rank vLLM serves that holds ``rank``."""
    for candidate in VLLM_RANKS:
        if candidate >= rank:
            return candidate
    raise ValueError(f"rank {rank} is above the largest LoRA rank vLLM serves ({VLLM_RANKS[-1]})")


def adapter_tensors(module: str, a: Tensor, b: Tensor, rank: int) -> dict[str, Tensor]:
    """PEFT's tensors for one module's branch, zero-padded from ``a.shape[0]`` to ``rank``."""
    pad = rank - a.shape[0]
    if pad < 0:
        raise ValueError(f"{module}: cannot pad a rank-{a.shape[0]} branch down to {rank}")
    lora_a = torch.nn.functional.pad(a, (0, 0, 0, pad))
    lora_b = torch.nn.functional.pad(b, (0, pad))
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": lora_a.contiguous(), f"{prefix}.lora_B.weight": lora_b.contiguous()}


def adapter_config(module_ranks: dict[str, int], base_model: str) -> dict:
    """adapter_config.json: the commonest rank as ``r``, the others in ``rank_pattern``, and
    ``lora_alpha`` equal to each module's rank so that every scaling is 1."""
    common = Counter(module_ranks.values()).most_common(1)[0][0]
    others = {name: rank for name, rank in module_ranks.items() if rank != common}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(module_ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
