import json

import pytest
import torch

from llmcompress.calib import AUSTEN_SPLITS, calibration_windows, read_text, sample_windows, tokenize
from llmcompress.errors import CalibrationError


def test_bundled_splits_are_disjoint_novels():
    train, test = read_text("austen:train"), read_text("austen:test")
    assert "Emma Woodhouse" in train and "Emma Woodhouse" not in test
    assert "Anne Elliot" in test and "Anne Elliot" not in train
    assert set(AUSTEN_SPLITS["train"]).isdisjoint(AUSTEN_SPLITS["test"])
    assert len(train) > 2_000_000 and len(test) > 900_000
    assert read_text("austen:persuasion") in test
    with pytest.raises(CalibrationError, match="austen:train"):
        read_text("austen:ulysses")


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\nsecond line\n")
    assert read_text(str(tmp_path / "a.txt")) == "plain text\nsecond line\n"
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert read_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(CalibrationError, match="c.jsonl, line 2: expected an object with a string field 'text'"):
        read_text(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.jsonl").write_text("{oops\n")
    with pytest.raises(CalibrationError, match="line 1: not valid JSON"):
        read_text(str(tmp_path / "d.jsonl"))
    (tmp_path / "e.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationError, match="not UTF-8"):
        read_text(str(tmp_path / "e.txt"))


def test_missing_sources_are_explained(tmp_path):
    with pytest.raises(CalibrationError, match="neither a bundled name"):
        read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(CalibrationError, match="directory"):
        read_text(str(tmp_path))
    with pytest.raises(CalibrationError, match="hf:NAME"):
        read_text("hf:")


def test_hf_source_without_datasets_or_network_is_a_clear_error():
    with pytest.raises(CalibrationError, match="datasets|could not load dataset"):
        read_text("hf:wikitext:wikitext-2-raw-v1:train")


def test_chunked_tokenisation_matches_whole_text(tokenizer):
    text = read_text("austen:northangerabbey")[:450_000]
    assert torch.equal(tokenize(text, tokenizer), torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]))


def test_windows_are_seeded_disjoint_and_reproducible():
    tokens = torch.arange(1000)
    first = sample_windows(tokens, 5, 100, seed=0)
    assert first.shape == (5, 100)
    assert torch.equal(first, sample_windows(tokens, 5, 100, seed=0))
    assert not torch.equal(first, sample_windows(tokens, 5, 100, seed=1))
    starts = first[:, 0]
    assert len(set(starts.tolist())) == 5 and all(s % 100 == 0 for s in starts.tolist())
    assert torch.equal(first - first[:, :1], torch.arange(100).expand(5, 100))


def test_too_short_text_says_how_many_tokens(tmp_path, tokenizer):
    (tmp_path / "short.txt").write_text("It is a truth universally acknowledged. " * 20)
    with pytest.raises(CalibrationError, match=r"short.txt has \d+ tokens, which gives \d+ windows? of 16; 128 x 16 = 2048"):
        calibration_windows(str(tmp_path / "short.txt"), tokenizer, nsamples=128, seqlen=16, seed=0)
