import math

import pytest
import torch
from conftest import tiny_model

from llmcompress.calib import read_text, tokenize
from llmcompress.errors import CalibrationError
from llmcompress.evaluate import perplexity


def test_perplexity_matches_a_hand_computation(tokenizer):
    model = tiny_model("llama")
    text = read_text("austen:persuasion")[:20_000]
    result = perplexity(model, tokenizer, text, seqlen=64, max_windows=5, progress=False)
    tokens = tokenize(text, tokenizer)[: 5 * 64].reshape(5, 64)
    with torch.no_grad():
        logits = model(tokens).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert result.tokens_scored == 5 * 63 and result.windows == 5
    assert "5 non-overlapping windows of 64 tokens, 315 tokens scored, no BOS" in str(result)
    assert result.source == "given text" and result.to_dict()["protocol"] == result.protocol


def test_sources_token_ids_and_bos(tokenizer):
    model = tiny_model("opt")
    named = perplexity(model, tokenizer, "austen:persuasion", seqlen=32, max_windows=3, progress=False)
    assert named.source == "austen:persuasion"
    ids = tokenize(read_text("austen:persuasion"), tokenizer)
    assert perplexity(model, tokenizer, ids, seqlen=32, max_windows=3, progress=False).perplexity == pytest.approx(named.perplexity)
    with_bos = perplexity(model, tokenizer, ids, seqlen=32, max_windows=3, bos=True, progress=False)
    assert with_bos.tokens_scored == 3 * 31 and with_bos.bos and "BOS prepended" in with_bos.protocol


def test_too_short_text_is_an_error(tokenizer):
    with pytest.raises(CalibrationError, match="fewer than one window of 1024"):
        perplexity(tiny_model("llama"), tokenizer, "far too short", seqlen=1024, progress=False)
