"""Exports: compressed-tensors and PEFT adapters, checked by the ecosystem's own readers.

The compressed-tensors package's compressors decompress our tensors, and the SmolLM2 test loads
an export with transformers and peft in a separate process that never imports llmcompress.
"""

import json
import re

import pytest
import torch
from conftest import tiny_model

import llmcompress
from llmcompress import checkpoint
from llmcompress.config import CompressConfig, GPTQConfig, LowRankConfig, ModuleOverride, PruneConfig, QuantFormat
from llmcompress.export import ADAPTER_DIR, ExportError, export, padded_branches
from llmcompress.export.peft import VLLM_RANKS, served_rank
from llmcompress.export.verify import their_perplexity
from llmcompress.methods.rtn import rtn
from llmcompress.nn import CompressedLinear

CT_FORMATS = [QuantFormat(bits=4, group_size=32), QuantFormat(bits=4, group_size=32, symmetric=True),
              QuantFormat(bits=8, group_size=-1, symmetric=True), QuantFormat(bits=3, group_size=32), QuantFormat(kind="nvfp4")]


def _compressed(fmt, rank=0, family="llama", **config):
    model = tiny_model(family)
    lowrank = LowRankConfig(rank=rank, method="lorc") if rank else LowRankConfig()
    return llmcompress.compress(model, CompressConfig(quant=fmt, method="rtn", lowrank=lowrank, **config), calibration="none", progress=False)


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("fmt", CT_FORMATS, ids=lambda f: f.describe())
def test_compressed_tensors_export_decompresses_to_our_weights_in_their_code(fmt, tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from llmcompress.export import compressed_tensors as ours

    model = _compressed(fmt)
    out = export(model, tmp_path / "ct", format="compressed-tensors", engine="transformers")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    scheme = QuantizationScheme.model_validate({key: group[key] for key in ("targets", "weights")})
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    tensors = checkpoint._read_tensors(out)
    for name, layer in model.named_modules():
        if not isinstance(layer, CompressedLinear):
            continue
        local = {key.rpartition(".")[2]: value for key, value in tensors.items() if key.rpartition(".")[0] == name}
        theirs = compressor.decompress(local, scheme)["weight"]
        expected = layer.dequantized_weight(torch.float32).to(theirs.dtype)
        if fmt.is_fp4:
            # Their NVFP4 path multiplies in 16 bits, rounding once more than ours: one unit in the last place.
            torch.testing.assert_close(theirs.float(), expected.float(), rtol=2**-7, atol=0)
        else:
            assert torch.equal(theirs, expected), name
        assert ours.format_from_scheme(group["weights"]) == fmt
    assert ct.__version__


@pytest.mark.parametrize("fmt", CT_FORMATS, ids=lambda f: f.describe())
def test_compressed_tensors_export_loads_back_with_identical_logits(fmt, tmp_path, tokenizer):
    model = _compressed(fmt)
    out = export(model, tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer, engine="transformers")
    loaded, loaded_tokenizer = llmcompress.load(out)
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))
    assert loaded.llmcompress_config is None and loaded_tokenizer is not None
    assert not any(p.name.startswith(".ct") for p in tmp_path.iterdir())  # no staging left behind


def test_a_group_that_does_not_divide_the_inputs_is_fitted_per_layer_and_exports(tmp_path):
    # The tiny Llama's down_proj has 96 inputs: g64 leaves a ragged group, so that layer gets g32.
    model = _compressed(QuantFormat(bits=4, group_size=64, symmetric=True))
    groups = {name: m.fmt.group_size for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert {g for n, g in groups.items() if n.endswith("down_proj")} == {32}
    assert {g for n, g in groups.items() if not n.endswith("down_proj")} == {64}
    notes = {r.name: r.notes for r in model.compression_report.layers}
    assert notes["model.layers.0.mlp.down_proj"] == "group_size 64 does not divide 96 inputs: group_size 32"
    assert notes["model.layers.0.mlp.up_proj"] == ""
    tokens = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(3))
    for format in ("compressed-tensors", "gptq"):
        out = export(model, tmp_path / format, format=format)
        loaded, _ = llmcompress.load(out)
        assert {n: m.fmt.group_size for n, m in loaded.named_modules() if isinstance(m, CompressedLinear)} == groups, format
        assert torch.equal(_logits(loaded, tokens), _logits(model, tokens)), format
    dynamic = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["dynamic"]
    assert list(dynamic.values()) == [{"bits": 4, "group_size": 32, "sym": True, "desc_act": False}]


def test_mixed_formats_name_their_modules(tmp_path):
    model = _compressed(QuantFormat(bits=4, group_size=32), overrides=(ModuleOverride(pattern=r"down_proj", bits=8, symmetric=True),))
    out = export(model, tmp_path / "ct", format="compressed-tensors")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2 and all("Linear" not in g["targets"] for g in groups.values())
    eight = next(g for g in groups.values() if g["weights"]["num_bits"] == 8)
    assert eight["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    loaded, _ = llmcompress.load(out)
    tokens = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))


def test_adapter_carries_the_branch_padded_to_a_rank_vllm_serves(tmp_path):
    peft_module = pytest.importorskip("peft")
    model = _compressed(QuantFormat(bits=4, group_size=32, symmetric=True), rank=12)
    assert set(padded_branches(model).values()) == {(12, 16)}
    out = export(model, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    # The base alone (their decompressed weights) plus the adapter through peft gives our model.
    base, _ = llmcompress.load(out)
    dense = tiny_model("llama")
    dense.load_state_dict({**dense.state_dict(), **{f"{n}.weight": m.dequantized_weight() for n, m in base.named_modules()
                                                    if isinstance(m, CompressedLinear)}})
    with_adapter = peft_module.PeftModel.from_pretrained(dense, out / ADAPTER_DIR)
    tokens = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(with_adapter, tokens), _logits(model, tokens), rtol=1e-4, atol=1e-4)


def test_served_ranks():
    assert [served_rank(r) for r in (1, 8, 9, 300, 321, 512)] == [8, 8, 16, 320, 512, 512]
    with pytest.raises(ValueError, match="largest LoRA rank"):
        served_rank(513)
    assert VLLM_RANKS[0] == 8


def _with_ragged_down_proj(fmt):
    """A model as checkpoints written before dividing groups hold it: a last group of 32 of 64."""
    model = _compressed(QuantFormat(bits=4, group_size=32))
    mlp = model.model.layers[0].mlp
    weight = tiny_model("llama").model.layers[0].mlp.down_proj.weight.detach().float()
    mlp.down_proj = CompressedLinear.from_quantized(rtn(weight, fmt), fmt, bias=None)
    return model


@pytest.mark.parametrize(("build", "message"), [
    (lambda: _compressed(QuantFormat(bits=4, group_size=32), rank=8), "low-rank branch"),
    (lambda: _with_ragged_down_proj(QuantFormat(bits=4, group_size=64)), "down_proj: its 96 inputs are not a whole number of groups of 64"),
    (lambda: _compressed(QuantFormat(kind="mxfp4")), "MXFP4 export is not implemented"),
    (lambda: _compressed(QuantFormat(bits=4, group_size=32), prune=PruneConfig(method="magnitude", pattern="2:4")), "2:4 sparse"),
], ids=["branch-without-adapter", "ragged-group", "mxfp4", "n-m-sparse"])
def test_what_compressed_tensors_cannot_hold_is_refused_before_writing(build, message, tmp_path):
    model = build()
    with pytest.raises(ExportError, match=message):
        export(model, tmp_path / "ct", format="compressed-tensors", adapter=False)
    assert not (tmp_path / "ct").exists()


def test_act_order_g_idx_is_refused(tmp_path, tokenizer):
    model = tiny_model("llama")
    config = CompressConfig(quant=QuantFormat(bits=4, group_size=32), method="gptq", gptq=GPTQConfig(act_order=True, static_groups=False),
                            calib=llmcompress.CalibConfig(nsamples=2, seqlen=32))
    llmcompress.compress(model, config, tokenizer=tokenizer, progress=False)
    with pytest.raises(ExportError, match="g_idx"):
        export(model, tmp_path / "ct", format="compressed-tensors")


def test_native_export_needs_our_config_and_unknown_formats_are_named(tmp_path):
    with pytest.raises(ExportError, match="choose one of native, compressed-tensors, gptq"):
        export(tiny_model("llama"), tmp_path / "x", format="gguf")
    with pytest.raises(ExportError, match="not compressed by llmcompress"):
        export(tiny_model("llama"), tmp_path / "x", format="native")


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model = _compressed(QuantFormat(bits=4, group_size=32))
    monkeypatch.setattr(checkpoint, "write_shards", lambda *a: (_ for _ in ()).throw(OSError("No space left on device")))
    with pytest.raises(OSError, match="No space"):
        export(model, tmp_path / "ct", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


# compressed-tensors decompresses NVFP4 weights to bfloat16 whatever the model's dtype, so that
# row compares both models in bfloat16 (then their weights and ours are the same numbers). The
# symmetric INT4 export is checked through the adapter row: its perplexity needs both right.
@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "rank", "dtype"), [(QuantFormat(bits=4, group_size=64), 0, "float16"),
                                                    (QuantFormat(kind="nvfp4"), 0, "bfloat16"),
                                                    (QuantFormat(bits=4, group_size=64, symmetric=True), 32, "float16")],
                         ids=["w4g64-asym", "nvfp4", "w4g64-sym-lorc32-adapter"])
def test_smollm2_export_loads_in_transformers_and_peft_with_our_perplexity(fmt, rank, dtype, smollm2_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("peft")
    from llmcompress.calib import read_text, tokenize
    from llmcompress.evaluate import perplexity
    from llmcompress.models import cast_model, load_model

    model, tokenizer = load_model(smollm2_dir)
    lowrank = LowRankConfig(rank=rank, method="lorc") if rank else LowRankConfig()
    llmcompress.compress(model, CompressConfig(quant=fmt, lowrank=lowrank), calibration="none", progress=False)
    out = export(model, tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer)
    windows = tokenize(read_text("austen:test"), tokenizer)[: 2 * 256].reshape(2, 256)
    ours = perplexity(cast_model(model, getattr(torch, dtype)), tokenizer, windows.reshape(-1), seqlen=256, progress=False,
                      dtype=dtype).perplexity
    theirs = their_perplexity(out, windows, getattr(torch, dtype), adapter=bool(rank))
    assert theirs == pytest.approx(ours, rel=1e-3)


def _gptq_reference_weight(tensors, prefix, bits, in_features):
    """Dequantize one GPTQ v1 layer by the published rules, written apart from our packing code."""
    qweight, qzeros, scales, g_idx = (tensors[f"{prefix}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx"))
    per_word, mask = 32 // bits, (1 << bits) - 1
    k = torch.arange(in_features)
    n = torch.arange(scales.shape[1])
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = (words[k // per_word] >> (bits * (k % per_word)).unsqueeze(1)) & mask  # [K, N]
    zero_words = qzeros.to(torch.int64) & 0xFFFFFFFF
    zeros = ((zero_words[:, n // per_word] >> (bits * (n % per_word))) & mask) + 1  # [G, N]
    groups = g_idx.long()
    return ((codes - zeros[groups]).float() * scales[groups].float()).T  # [N, K]


@pytest.mark.parametrize("fmt", [QuantFormat(bits=4, group_size=32), QuantFormat(bits=4, group_size=32, symmetric=True),
                                 QuantFormat(bits=8, group_size=-1, symmetric=True), QuantFormat(bits=2, group_size=32, symmetric=True)],
                         ids=lambda f: f.describe())
def test_gptq_export_matches_the_published_packing_and_loads_back(fmt, tmp_path):
    model = _compressed(fmt)
    out = export(model, tmp_path / "gptq", format="gptq", engine="transformers")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {**config, "quant_method": "gptq", "bits": fmt.bits, "sym": fmt.symmetric, "desc_act": False, "checkpoint_format": "gptq",
                      "group_size": fmt.group_size}
    tensors = checkpoint._read_tensors(out)
    for name, layer in model.named_modules():
        if isinstance(layer, CompressedLinear):
            assert tensors[f"{name}.qweight"].dtype == torch.int32 and tensors[f"{name}.scales"].dtype == torch.float16
            reference = _gptq_reference_weight(tensors, name, fmt.bits, layer.in_features)
            assert torch.equal(reference, layer.dequantized_weight()), name
    loaded, _ = llmcompress.load(out)
    tokens = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))


def test_gptq_export_keeps_act_order(tmp_path, tokenizer):
    model = tiny_model("llama")
    config = CompressConfig(quant=QuantFormat(bits=4, group_size=32, symmetric=True), method="gptq",
                            gptq=GPTQConfig(act_order=True, static_groups=False), calib=llmcompress.CalibConfig(nsamples=2, seqlen=32))
    llmcompress.compress(model, config, tokenizer=tokenizer, progress=False)
    out = export(model, tmp_path / "gptq", format="gptq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    tensors = checkpoint._read_tensors(out)
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(_gptq_reference_weight(tensors, "model.layers.0.self_attn.q_proj", 4, 64), layer.dequantized_weight())
    loaded, _ = llmcompress.load(out)
    assert loaded.model.layers[0].self_attn.q_proj.has_g_idx
    tokens = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))


def test_gptq_export_writes_other_formats_as_dynamic_overrides_vllm_matches(tmp_path):
    model = _compressed(QuantFormat(bits=4, group_size=32, symmetric=True), overrides=(ModuleOverride(pattern=r"(up|gate)_proj", bits=8),))
    config = json.loads((export(model, tmp_path / "gptq", format="gptq") / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 32, True)
    ((pattern, keys),) = config["dynamic"].items()
    assert keys == {"bits": 8, "group_size": 32, "sym": True, "desc_act": False}
    # vLLM's rule (vllm/model_executor/layers/quantization/utils/gptq_utils.py): re.match on the
    # layer's prefix, where vLLM fuses gate and up into gate_up_proj.
    matched = [name for name in ("model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.gate_up_proj",
                                 "model.layers.2.mlp.down_proj", "model.layers.2.self_attn.qkv_proj")
               if re.match(pattern.removeprefix("+:"), name)]
    assert matched == ["model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.gate_up_proj"]
    loaded, _ = llmcompress.load(tmp_path / "gptq")
    tokens = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))


def test_gptq_export_names_the_16_bit_layers_so_vllm_builds_them_unquantized(tmp_path):
    """vLLM builds every Linear of a GPTQ checkpoint as a GPTQ layer unless a ``"-:"`` dynamic
    override matches it (re.match on its prefix, fused names included)."""
    model = llmcompress.compress(tiny_model("llama"), {"passes": [{"quantize": {"bits": 4, "group_size": 32, "symmetric": True}}],
                                                       "ignore": [r"layers\.1\.mlp\.(gate|up)_proj", r"layers\.2\.mlp\.up_proj"]},
                                 calibration="none", progress=False)
    config = json.loads((export(model, tmp_path / "gptq", format="gptq") / "config.json").read_text())["quantization_config"]
    (pattern,) = [key for key in config["dynamic"] if key.startswith("-:")]
    names = [f"model.layers.{block}.mlp.{name}" for block in (0, 1, 2) for name in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")]
    assert [name for name in names if re.match(pattern.removeprefix("-:"), name)] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_up_proj", "model.layers.2.mlp.up_proj"]
    loaded, _ = llmcompress.load(tmp_path / "gptq")
    tokens = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))


@pytest.mark.parametrize(("format", "fmt", "message"), [
    ("gptq", QuantFormat(bits=4, group_size=32), "GPTQ path takes symmetric 4- and 8-bit weights only.*export compressed-tensors"),
    ("gptq", QuantFormat(bits=8, group_size=32), "GPTQ path takes symmetric 4- and 8-bit weights only"),
    ("gptq", QuantFormat(bits=2, group_size=32, symmetric=True), "no kernel for INT2 weights.*--engine transformers"),
    ("compressed-tensors", QuantFormat(bits=3, group_size=32, symmetric=True), "no kernel for INT3 weights"),
    ("compressed-tensors", QuantFormat(bits=8, group_size=32), "INT8 weights symmetric only: compress with --sym"),
    ("compressed-tensors", QuantFormat(bits=4, group_size=32), None),
    ("compressed-tensors", QuantFormat(bits=8, group_size=32, symmetric=True), None),
    ("gptq", QuantFormat(bits=4, group_size=32, symmetric=True), None),
    ("gptq", QuantFormat(bits=8, group_size=-1, symmetric=True), None),
], ids=lambda v: v.describe() if isinstance(v, QuantFormat) else None)
def test_exports_for_vllm_refuse_what_vllm_refuses_and_transformers_takes_it(format, fmt, message, tmp_path):
    model = _compressed(fmt)
    if message is None:
        assert (export(model, tmp_path / "vllm", format=format) / "config.json").exists()
        return
    with pytest.raises(ExportError, match=f"^{format} for vllm cannot hold 21 layer\\(s\\): model.layers.0.self_attn.q_proj and 20 more: .*{message}"):
        export(model, tmp_path / "vllm", format=format)
    assert not (tmp_path / "vllm").exists()
    assert (export(model, tmp_path / "transformers", format=format, engine="transformers") / "config.json").exists()


def test_what_gptq_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ExportError, match="GPTQ stores integer codes only"):
        export(_compressed(QuantFormat(kind="nvfp4")), tmp_path / "a", format="gptq")
    with pytest.raises(ExportError, match="3-bit needs compressed-tensors"):
        export(_compressed(QuantFormat(bits=3, group_size=32)), tmp_path / "b", format="gptq", engine="transformers")
    model = _compressed(QuantFormat(bits=4, group_size=32))
    layer = model.model.layers[1].mlp.up_proj
    layer.weight_zero_point[0, 0] &= ~0xF  # the first group of row 0 now has zero point 0
    with pytest.raises(ExportError, match="1 of its zero points are 0.*--sym"):
        export(model, tmp_path / "d", format="gptq", engine="transformers")
    assert list(tmp_path.iterdir()) == []
