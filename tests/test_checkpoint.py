import errno
import json
import os

import pytest
import torch
from conftest import TINY_VOCAB, tiny_model

import llmcompress
from llmcompress import checkpoint
from llmcompress.config import CompressConfig, ModuleOverride, QuantFormat
from llmcompress.recipe import Recipe, load_recipe
from llmcompress.errors import CheckpointError, ConfigError
from llmcompress.nn import CompressedLinear

IDS = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def _compressed(fmt=QuantFormat(bits=4, group_size=32), family="llama", dtype=torch.float32, **config):
    model = tiny_model(family, dtype=dtype)
    return llmcompress.compress(model, CompressConfig(quant=fmt, **config), progress=False)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("fmt", [QuantFormat(bits=4, group_size=32), QuantFormat(bits=3, group_size=-1, symmetric=True),
                                 QuantFormat(bits=8, group_size=64), QuantFormat(kind="nvfp4"), QuantFormat(kind="mxfp4")])
def test_reload_gives_identical_logits(tmp_path, tokenizer, fmt):
    model = _compressed(fmt)
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config, tokenizer=tokenizer)
    loaded, loaded_tokenizer = llmcompress.load(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.llmcompress_config == model.llmcompress_config
    assert loaded_tokenizer("Emma")["input_ids"] == tokenizer("Emma")["input_ids"]
    assert all(isinstance(loaded.get_submodule(r.name), CompressedLinear) for r in model.compression_report.layers)


@pytest.mark.parametrize("family", ["opt", "gemma", "qwen2"])
def test_reload_of_other_families_and_float16_storage(tmp_path, family):
    model = _compressed(family=family, dtype=torch.float16)
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    loaded, tokenizer = llmcompress.load(tmp_path / "ckpt")
    assert tokenizer is None
    assert loaded.get_input_embeddings().weight.dtype == torch.float16
    assert torch.equal(_logits(loaded), _logits(model))


def test_tied_embeddings_stay_tied_and_are_stored_once(tmp_path):
    model = _compressed()
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded, _ = llmcompress.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_config_records_everything_needed_to_load(tmp_path):
    config = CompressConfig(quant=QuantFormat(bits=4, group_size=32), overrides=(ModuleOverride(pattern="down_proj", bits=8, group_size=-1),))
    model = llmcompress.compress(tiny_model("llama"), config, progress=False)
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    quantization = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "llmcompress" and quantization["format_version"] == 2
    assert quantization["modules"]["model.layers.0.mlp.down_proj"]["format"] == {"kind": "int", "bits": 8, "group_size": -1, "symmetric": False}
    assert Recipe.from_dict(quantization["recipe"]) == model.llmcompress_config
    assert load_recipe(tmp_path / "ckpt" / "recipe.yaml") == model.llmcompress_config


def test_sharded_checkpoint_round_trips(tmp_path):
    model = _compressed()
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config, max_shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    loaded, _ = llmcompress.load(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded), _logits(model))


def test_compress_with_output_dir_saves_the_same_model(tmp_path):
    model = llmcompress.compress(tiny_model("llama"), CompressConfig(quant=QuantFormat(group_size=32)), output_dir=tmp_path / "out", progress=False)
    loaded, _ = llmcompress.load(tmp_path / "out")
    assert torch.equal(_logits(loaded), _logits(model))
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert len(report["layers"]) == 21


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model = _compressed()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        checkpoint.save(model, out, model.llmcompress_config)
    with pytest.raises(CheckpointError, match="replaces only what llmcompress wrote, and .*ckpt also holds keep.txt"):
        checkpoint.save(model, out, model.llmcompress_config, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    checkpoint.save(model, out, model.llmcompress_config)
    checkpoint.save(model, out, model.llmcompress_config, overwrite=True)  # over a checkpoint of ours
    assert (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_full_disk_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model = _compressed()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_does_not_look_complete(tmp_path, monkeypatch):
    model = _compressed()
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    monkeypatch.setattr(checkpoint, "write_shards", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config, overwrite=True)
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_staging_directory_is_reported_as_unfinished(tmp_path):
    partial = tmp_path / ".ckpt.incomplete-abc"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unfinished"):
        llmcompress.load(partial)


def test_missing_and_corrupt_inputs_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        llmcompress.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        llmcompress.load(tmp_path / "empty")
    model = _compressed()
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    for verify in (True, False):  # named by its checksum, and without it by the safetensors reader
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            llmcompress.load(tmp_path / "ckpt", verify=verify)
    os.remove(weights)
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="incomplete"):
            llmcompress.load(tmp_path / "ckpt", verify=verify)
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        llmcompress.load(tmp_path / "ckpt")


def test_tensor_that_does_not_match_the_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _compressed()
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = tensors["model.layers.0.mlp.up_proj.weight_scale"][:, :1].contiguous()
    save_file(tensors, weights)
    # Past the checksums (which refuse the rewritten file first), as a checkpoint without them is checked.
    with pytest.raises(CheckpointError, match="up_proj.weight_scale is .* expected"):
        llmcompress.load(tmp_path / "ckpt", verify=False)
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="missing model.layers.0.mlp.up_proj.weight_scale"):
        llmcompress.load(tmp_path / "ckpt", verify=False)


def test_format_1_checkpoints_still_load(tmp_path):
    """Checkpoints written before recipes stored the flag-shaped config; it is read as the recipe it stands for."""
    model = _compressed()
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    quantization = config["quantization_config"]
    quantization["format_version"] = 1
    quantization["config"] = CompressConfig(quant=QuantFormat(bits=4, group_size=32)).to_dict()
    del quantization["recipe"]
    config_file.write_text(json.dumps(config))
    loaded, _ = llmcompress.load(tmp_path / "ckpt")
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.llmcompress_config.passes == model.llmcompress_config.passes


def test_plain_model_directory_loads_as_float(tiny_model_dir):
    model, tokenizer = llmcompress.load(tiny_model_dir)
    assert not any(isinstance(m, CompressedLinear) for m in model.modules()) and tokenizer is not None


def test_damaged_quantization_config_is_refused(tmp_path):
    model = _compressed()
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["recipe"]["passes"][0]["quantize"]["bits"] = 11
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"passes\[0\] \(quantize\): QuantFormat.bits=11.*corrupt"):
        llmcompress.load(tmp_path / "ckpt")
    del config["quantization_config"]["modules"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks modules"):
        llmcompress.load(tmp_path / "ckpt")


def test_transformers_loads_a_native_checkpoint_with_trust_remote_code(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = _compressed(family="qwen2", dtype=torch.float16)
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True, dtype=torch.float32, device_map="cpu")
    assert type(loaded) is type(model) and isinstance(loaded.get_submodule("model.layers.0.mlp.up_proj"), CompressedLinear)
    assert torch.equal(_logits(loaded), _logits(llmcompress.load(tmp_path / "ckpt", dtype=torch.float32)[0]))
    assert loaded.get_input_embeddings().weight.dtype == torch.float32
    config = AutoConfig.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    assert type(config) is type(model.config) and config.quantization_config["quant_method"] == "llmcompress"
    with pytest.raises(ConfigError, match="drop load_in_8bit"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True, load_in_8bit=True)
    # Without trust_remote_code transformers reads the family's config as always (our own load does that).
    assert type(AutoConfig.from_pretrained(tmp_path / "ckpt")) is type(model.config)
    assert not isinstance(model.config, LlamaConfig)
