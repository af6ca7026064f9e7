import pytest
import torch

from llmcompress.errors import ModelError
from llmcompress.models import cache_root, cast_model, load_model, resolve_model_dir


def test_bad_model_paths_are_explained(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        resolve_model_dir(tmp_path / "weights.bin")


def test_hub_id_offline_gives_a_clear_error():
    with pytest.raises(ModelError, match="not a local path.*hub"):
        load_model("nobody-here/no-such-model")


def test_local_directory_loads_in_its_stored_dtype(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    assert tokenizer is not None and next(model.parameters()).dtype.is_floating_point


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMCOMPRESS_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("LLMCOMPRESS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "llmcompress"


def test_a_cast_keeps_the_rotary_frequencies_in_float32(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    cast_model(model, torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
