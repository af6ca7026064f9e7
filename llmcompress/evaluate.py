"""Perplexity with a stated protocol.

Protocol: the text is tokenised once without special tokens and cut into non-overlapping
windows of ``seqlen`` tokens (the remainder is dropped); each window is scored on its own, so
token i is predicted from the tokens before it in its window only. Without BOS the first token
of each window has no prediction and is not scored (``seqlen - 1`` tokens per window, as in the
GPTQ/AWQ papers' WikiText protocol); with ``bos=True`` each window is the BOS token plus
``seqlen - 1`` text tokens, all of them scored. Perplexity is exp(mean token NLL).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .calib import DEFAULT_EVALUATION, read_text, tokenize
from .errors import CalibrationError
from .precision import compute_dtype, forward_weights
from .throughput import forward_flops


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    source: str
    seqlen: int
    bos: bool
    dtype: str
    seconds: float
    gflops: float = 0.0  # achieved, as ``throughput.forward_flops`` counts the work

    @property
    def protocol(self) -> str:
        bos = "BOS prepended" if self.bos else "no BOS, first token of each window unscored"
        return (f"{self.source}, {self.windows} non-overlapping windows of {self.seqlen} tokens, "
                f"{self.tokens_scored} tokens scored, {bos}, {self.dtype}")

    def to_dict(self) -> dict:
        return {**asdict(self), "protocol": self.protocol}

    def __str__(self) -> str:
        return f"perplexity {self.perplexity:.3f} ({self.protocol})"


def _is_source(text: str) -> bool:
    return text.startswith(("austen:", "hf:")) or ("\n" not in text and len(text) < 4096 and Path(text).expanduser().is_file())


def perplexity(model: nn.Module, tokenizer, text_or_source: str | Tensor = DEFAULT_EVALUATION, seqlen: int = 1024,  # noqa: ANN001
               max_windows: int | None = None, bos: bool = False, progress: bool = True, dtype: str = "auto") -> PerplexityResult:
    """Perplexity of ``model`` on a text source name, a raw text, or a 1-D tensor of token ids,
    computed in ``dtype`` (``auto``: see ``precision.compute_dtype``; the model is left as stored)."""
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen} is too short: a window needs at least 2 tokens")
    if isinstance(text_or_source, Tensor):
        source, tokens = "token ids", text_or_source.reshape(-1).long()
    else:
        is_source = _is_source(text_or_source)
        source = text_or_source if is_source else "given text"
        tokens = tokenize(read_text(text_or_source) if is_source else text_or_source, tokenizer)
    window_tokens = seqlen - 1 if bos else seqlen
    available = tokens.numel() // window_tokens
    if available == 0:
        raise CalibrationError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {window_tokens}: use more text or a smaller seqlen")
    count = available if max_windows is None else min(available, max_windows)
    windows = tokens[: count * window_tokens].reshape(count, window_tokens)
    if bos:
        if tokenizer is None or tokenizer.bos_token_id is None:
            raise ValueError("bos=True needs a tokenizer with a BOS token")
        windows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id), windows], dim=1)
    parameter = next(model.parameters())
    computed_in = compute_dtype(parameter.dtype, parameter.device, dtype)
    started = time.perf_counter()
    total_nll, scored = 0.0, 0
    with torch.no_grad(), forward_weights(model, computed_in):
        for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            ids = window.unsqueeze(0).to(parameter.device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            targets = ids[0, 1:]
            total_nll += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
            scored += targets.numel()
    mean_nll = total_nll / scored
    seconds = time.perf_counter() - started
    return PerplexityResult(
        perplexity=math.exp(mean_nll), mean_nll=mean_nll, tokens_scored=scored, windows=count, source=source,
        seqlen=seqlen, bos=bos, dtype=str(computed_in).replace("torch.", ""), seconds=seconds,
        gflops=forward_flops(model, count, windows.shape[1]) / seconds / 1e9,
    )
