"""Mixture-of-experts models: experts compressed one by one with their own tokens, routers kept,
coverage proven, each family read from a transformers-5 default save and written back."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import llmcompress
from llmcompress.cli import main
from llmcompress.config import QuantFormat
from llmcompress.errors import ConfigError, ModelError
from llmcompress.experts import ExpertList, unfuse_experts
from llmcompress.export import ExportError, export
from llmcompress.formats import dequantize
from llmcompress.methods.gptq import gptq
from llmcompress.nn import CompressedLinear
from llmcompress.pipeline import find_decoder_blocks
from llmcompress.pipeline.coverage import COMPRESSED, plan_coverage
from llmcompress.pipeline.structure import plan_layers
from llmcompress.shards import ShardedWeights
from llmcompress.stats import LayerStats

VOCAB = 384  # the shared test tokenizer's
_ATTENTION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=256)
# Each family's smallest config that keeps its structure (shared experts, MLA, dense first layers).
FAMILIES = {
    "qwen3_moe": dict(_ATTENTION, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=2, head_dim=16, num_experts=8,
                      num_experts_per_tok=2),
    "qwen2_moe": dict(_ATTENTION, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(_ATTENTION, intermediate_size=64, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(_ATTENTION, intermediate_size=32, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(_ATTENTION, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4, n_routed_experts=8,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "deepseek_v2": dict(_ATTENTION, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4, n_routed_experts=8,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "gpt_oss": dict(_ATTENTION, intermediate_size=32, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "llama4_text": dict(_ATTENTION, intermediate_size=32, intermediate_size_mlp=128, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=1, head_dim=16),
}
RECIPES = {
    "rtn": {"passes": [{"quantize": {"bits": 4, "group_size": 32, "symmetric": True}}]},
    "gptq+eora": {"passes": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}},
                             {"lowrank": {"method": "eora", "rank": 8}}]},
    "wanda": {"passes": [{"prune": {"method": "wanda", "sparsity": 0.5}}]},
}


def moe_model(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **FAMILIES[family]), dtype=torch.float32)
    return model.eval()


def windows(count: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_expert_layers_compute_what_the_fused_experts_did(family):
    model = moe_model(family)
    ids = windows(2, 24)
    with torch.no_grad():
        fused = model(ids).logits
        replaced = unfuse_experts(model)
        per_expert = model(ids).logits
    assert replaced and all(isinstance(model.get_submodule(name), ExpertList) for name in replaced)
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]
    torch.testing.assert_close(per_expert, fused, atol=2e-6, rtol=0)


def _expert_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Each expert projection's float inputs and router weights, caught while the float model runs."""
    caught: dict[str, tuple[list, list]] = {}
    handles = []
    for name, module in model.named_modules():
        if ".experts." in name and isinstance(module, nn.Linear):
            def hook(m, args, name=name):  # noqa: ANN001, ANN202
                inputs, weights = caught.setdefault(name, ([], []))
                inputs.append(args[0].reshape(-1, args[0].shape[-1]))
                weights.append(m.token_weights)
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for window in ids.split(4):
            model(window)
    for handle in handles:
        handle.remove()
    return caught


def test_each_expert_equals_gptq_of_it_alone_on_its_routed_tokens():
    """GPTQ of every expert, run by the pipeline, gives the codes of GPTQ run on that expert's
    weight alone with the Hessian of the tokens routed to it, weighted by their router weights.
    Only block 0's experts are compressed, so every input they see is the float model's."""
    model = moe_model("qwen3_moe")
    unfuse_experts(model)
    ids = windows()
    caught = {name: value for name, value in _expert_inputs(model, ids).items() if name.startswith("model.layers.0.")}
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules() if name in caught}
    fmt = QuantFormat(bits=4, group_size=32, symmetric=True)
    recipe = {"passes": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "clip": False,
                                       "true_sequential": False, "targets": [r"layers\.0\..*experts"]}}], "calibration": {"batch_size": 4}}
    llmcompress.compress(model, recipe, calibration=ids, progress=False)
    assert len(caught) == 3 * 8  # every expert was reached
    for name, (inputs, weights) in caught.items():
        stats = LayerStats(inputs[0].shape[1])
        for x, w in zip(inputs, weights, strict=True):
            stats.update(x, w)
        expected = dequantize(gptq(originals[name].float(), stats.hessian, fmt, damp=0.01, block_size=128, act_order=True,
                                   static_groups=True).quantized, fmt)
        layer = model.get_submodule(name)
        assert isinstance(layer, CompressedLinear)
        torch.testing.assert_close(layer.dequantized_weight(), expected, atol=1e-6, rtol=0)


def test_router_weights_weight_each_tokens_share_of_h():
    x, w = torch.randn(10, 6), torch.rand(10)
    stats = LayerStats(6)
    stats.update(x[:4], w[:4])
    stats.update(x[4:], w[4:])
    torch.testing.assert_close(stats.hessian, (x * w[:, None]).T @ (x * w[:, None]) / 10)


def test_starved_experts_fall_back_to_data_free_and_are_counted():
    model = moe_model("qwen3_moe")
    recipe = {"passes": RECIPES["gptq+eora"]["passes"], "calibration": {"expert_min_tokens": 1000}}
    report = llmcompress.compress(model, recipe, calibration=windows(), progress=False).compression_report
    experts = [r for r in report.layers if ".experts." in r.name]
    assert experts and all(r.fallback for r in experts)
    assert all("(< expert_min_tokens=1000): data-free" in r.notes and r.method.startswith("rtn") for r in experts)
    assert not any(r.fallback for r in report.layers if ".experts." not in r.name)


def test_every_expert_can_see_every_token_while_outputs_follow_routing():
    ids = windows()
    routed = llmcompress.compress(moe_model("qwen3_moe"), RECIPES["rtn"], calibration=ids, progress=False)
    everything = llmcompress.compress(moe_model("qwen3_moe"), {**RECIPES["rtn"], "calibration": {"experts": "all"}}, calibration=ids,
                                      progress=False)
    tokens = {r.name: r.tokens for r in everything.compression_report.layers if ".experts." in r.name}
    assert set(tokens.values()) == {ids.numel()}
    assert max(r.tokens for r in routed.compression_report.layers if ".experts." in r.name) < ids.numel()
    with torch.no_grad():  # RTN ignores the statistics: the same codes, and the routing decides the outputs
        torch.testing.assert_close(everything(ids[:2]).logits, routed(ids[:2]).logits)


def test_routers_stay_16_bit_unless_named_and_small_layers_fall_back():
    model = llmcompress.compress(moe_model("qwen2_moe"), RECIPES["gptq+eora"], calibration=windows(), progress=False)
    block = model.model.layers[0].mlp
    assert type(block.shared_expert_gate) is nn.Linear and not isinstance(block.gate, CompressedLinear)
    statuses = {w.name: w.status for w in model.compression_report.coverage.weights}
    assert statuses["model.layers.0.mlp.shared_expert_gate.weight"].startswith("router")
    assert statuses["model.layers.0.mlp.gate.weight"].startswith("router")
    named = {"passes": [{"quantize": {"bits": 8, "group_size": -1, "targets": ["shared_expert_gate", "experts"]}}]}
    model = llmcompress.compress(moe_model("qwen2_moe"), named, calibration=windows(), progress=False)
    assert isinstance(model.model.layers[0].mlp.shared_expert_gate, CompressedLinear)
    # rank 48 exceeds the experts' 32 intermediate features, not the attention's 64: a note, not a refusal
    wide = {"passes": [RECIPES["rtn"]["passes"][0], {"lowrank": {"method": "lorc", "rank": 48}}]}
    report = llmcompress.compress(moe_model("qwen3_moe"), wide, progress=False).compression_report
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.self_attn.q_proj"].rank == 48
    expert = by_name["model.layers.0.mlp.experts.0.down_proj"]
    assert expert.rank == 0 and "no lorc branch: rank 48 exceeds" in expert.notes
    with pytest.raises(ConfigError, match="larger than"):  # a group no layer can hold is a mistake, not a fallback
        llmcompress.compress(moe_model("qwen3_moe"), {"passes": [{"quantize": {"bits": 4, "group_size": 4096}}]}, progress=False)


def test_coverage_lists_every_weight_and_strict_refuses_what_no_pass_handles():
    model = moe_model("qwen3_moe")
    unfuse_experts(model)
    path, blocks = find_decoder_blocks(model)
    coverage = plan_coverage(model, path, blocks, *plan_layers(blocks, path, RECIPES["rtn"]))
    assert {w.name for w in coverage.weights} == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert sum(w.status == COMPRESSED for w in coverage.weights) == 2 * (4 + 3 * 8)
    matrices = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 2}
    compressed = sum(size for name, size in matrices.items() if ".experts." in name or ".self_attn." in name)
    assert coverage.share == pytest.approx(compressed / sum(matrices.values()))
    assert [reason.partition(" ")[0] for reason in coverage.left()] == ["embedding", "router", "output"]
    coverage.check_strict()
    blocks[1].self_attn.register_module("extra", nn.Bilinear(4, 4, 4))  # a weight no pass handles
    with pytest.raises(ConfigError, match=r"--strict: 1 weight.*self_attn.extra.weight \(not a Linear layer"):
        llmcompress.compress(model, RECIPES["rtn"], progress=False, strict=True)


# Dense families whose layouts differ from Llama's: GPT-NeoX's head is stored as embed_out, Phi-3
# fuses qkv and gate/up into single Linears, GPT-2's layers are Conv1D (weights stored [in, out]).
OTHER_FAMILIES = {
    "gpt2": dict(_ATTENTION),
    "gpt_neox": dict(_ATTENTION, intermediate_size=128, tie_word_embeddings=False),
    "phi3": dict(_ATTENTION, intermediate_size=128, num_key_value_heads=2, pad_token_id=0),
}


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("moe")
    for family, settings in OTHER_FAMILIES.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings)).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    for family in FAMILIES:
        moe_model(family).save_pretrained(root / family)  # transformers 5's default layout (per expert, or fused)
        tokenizer.save_pretrained(root / family)
    return root


@pytest.mark.parametrize("method", sorted(RECIPES))
@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(OTHER_FAMILIES))
def test_each_family_from_a_default_save_through_the_cli(saved_families, family, method, tmp_path):
    """From disk, block by block, as a user runs it; loaded back, the same logits as compressing in memory."""
    recipe = {**RECIPES[method], "calibration": {"nsamples": 8, "seqlen": 32, "batch_size": 4}}
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps(recipe))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(saved_families / family), "--recipe", str(recipe_file), "--out", str(out), "--no-eval",
                                       "--strict"])
    assert result.exit_code == 0, result.output
    assert "coverage: " in result.output and "of weight parameters compressed" in result.output
    assert not list(tmp_path.glob("*.partial"))
    loaded, tokenizer = llmcompress.load(out)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = tokenizer(text, return_tensors="pt").input_ids
    in_memory = llmcompress.compress(AutoModelForCausalLM.from_pretrained(saved_families / family, dtype=torch.float32), recipe,
                                     calibration="austen:train", tokenizer=tokenizer, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, in_memory(ids).logits, atol=1e-5, rtol=0)
    if family not in ("gpt_oss", "llama4_text"):  # experts stored per expert: under the family's own module names
        def modules(directory):  # noqa: ANN001, ANN202
            return {name.rpartition(".")[0] for name in ShardedWeights(directory).location}

        assert modules(out) == modules(saved_families / family)
    report = json.loads((out / "compression_report.json").read_text())
    assert family in OTHER_FAMILIES or any(".experts.3." in layer["name"] for layer in report["layers"])
    assert all(not w["status"].startswith("not a Linear") for w in report["coverage"]["weights"])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_compressed_tensors_export_of_experts_loads_in_transformers(family, tmp_path):
    ids = windows()
    model = llmcompress.compress(moe_model(family), RECIPES["rtn"], calibration=ids, progress=False)
    export(model, tmp_path / "ct", "compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    expert = "block_sparse_moe.experts.3.w1" if family == "mixtral" else "mlp.experts.3.gate_proj"
    router = "block_sparse_moe.gate" if family == "mixtral" else "mlp.gate"
    assert f"model.layers.1.{router}" in config["ignore"]
    from safetensors import safe_open

    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
    assert f"model.layers.1.{expert}.weight_packed" in names
    ours, _ = llmcompress.load(tmp_path / "ct")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    with torch.no_grad():
        reference = model(ids[:2]).logits
        torch.testing.assert_close(ours(ids[:2]).logits, reference)
        torch.testing.assert_close(served(ids[:2]).logits, reference, atol=2e-4, rtol=0)


def test_exports_refuse_what_the_serving_loaders_cannot_read(tmp_path):
    model = llmcompress.compress(moe_model("gpt_oss"), RECIPES["rtn"], progress=False)
    with pytest.raises(ExportError, match="keeps its experts fused in its checkpoints.*export native"):
        export(model, tmp_path / "ct", "compressed-tensors")
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", **OTHER_FAMILIES["gpt2"]))
    model = llmcompress.compress(gpt2, RECIPES["rtn"], progress=False)
    assert not [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    with pytest.raises(ExportError, match=r"stores its layers as Conv1D \(transformer.h.0.attn.c_attn\).*export native"):
        export(model, tmp_path / "gptq", "gptq")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "gptq").exists()


def test_unknown_expert_layout_is_one_line():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden_size = 8
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 8))
            self.down_proj = nn.Parameter(torch.zeros(2, 8, 8))

    holder = nn.Module()
    holder.experts = Odd()
    with pytest.raises(ModelError, match="cannot tell how Odd lays out its experts"):
        unfuse_experts(holder)


def test_a_router_that_is_more_than_a_linear_cannot_be_targeted():
    recipe = {"passes": [{"quantize": {"bits": 8, "group_size": -1, "targets": ["router", "experts"]}}]}
    with pytest.raises(ConfigError, match=r"feed_forward.router is a Llama4Router, an nn.Linear whose forward does more"):
        llmcompress.compress(moe_model("llama4_text"), recipe, progress=False)


def test_a_branch_on_experts_is_refused_by_the_adapter_export(tmp_path):
    lorc = {"passes": [RECIPES["rtn"]["passes"][0], {"lowrank": {"method": "lorc", "rank": 8}}]}
    model = llmcompress.compress(moe_model("qwen3_moe"), lorc, progress=False)
    with pytest.raises(ExportError, match=r"experts.0.gate_proj and 47 more: a low-rank branch on an expert has no place in a PEFT LoRA adapter"):
        export(model, tmp_path / "ct", "compressed-tensors")
    attention_only = {"passes": [lorc["passes"][0], {"lowrank": {"method": "lorc", "rank": 8, "targets": ["self_attn"]}}]}
    model = llmcompress.compress(moe_model("qwen3_moe"), attention_only, progress=False)
    export(model, tmp_path / "ct", "compressed-tensors")
    adapter = json.loads((tmp_path / "ct" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] and not any("experts" in m for m in adapter["target_modules"])


def _router_logits(model: nn.Module, ids: torch.Tensor, block: int) -> torch.Tensor:
    """What the router of block ``block`` computes from its input (its input times its weight)."""
    router = next(m for name, m in model.named_modules() if re.fullmatch(rf"model\.layers\.{block}\.\w+\.(gate|router)", name))
    caught = []
    handle = router.register_forward_pre_hook(lambda m, args: caught.append(args[0].reshape(-1, args[0].shape[-1]).float() @ m.weight.float().T))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return caught[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_awq_scales_all_experts_input_into_the_norm_and_the_router_keeps_routing(family):
    """One scale for the input of every expert (and shared expert) of a block, folded into the norm
    before them; the router's columns take it too, so it computes the same logits from the scaled
    input. Only block 1's projections are compressed, so its input is the float model's."""
    ids = windows()
    recipe = {"passes": [{"smooth": {"method": "awq", "targets": [r"layers\.1\..*\.(gate|up|down)_proj$"]}},
                         {"quantize": {"bits": 4, "group_size": 32, "symmetric": True, "targets": [r"layers\.1\..*\.(gate|up|down)_proj$"]}}]}
    float_model = moe_model(family)
    model = llmcompress.compress(moe_model(family), recipe, calibration=ids, progress=False)
    notes = {r.name: r.notes for r in model.compression_report.layers}
    first = [name for name in notes if ".experts." in name and name.endswith((".gate_proj", ".up_proj"))]
    assert first and all("into post_attention_layernorm (scale" in notes[name] for name in first), notes[first[0]]
    assert "compensated" in notes[first[0]]
    norm = model.model.layers[1].post_attention_layernorm.weight
    assert not torch.equal(norm, float_model.model.layers[1].post_attention_layernorm.weight)
    torch.testing.assert_close(_router_logits(model, ids[:2], 1), _router_logits(float_model, ids[:2], 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_gptq_export_of_16_bit_experts_names_vllms_fused_experts_layer(family, tmp_path):
    """vLLM builds a block's experts as one layer (``...experts``) and looks up ``"-:"`` overrides
    by its name; eval/vllm_check.py serves such an export in vLLM."""
    recipe = {"passes": [{"quantize": {"bits": 4, "group_size": 32, "symmetric": True}}], "ignore": ["experts"]}
    model = llmcompress.compress(moe_model(family), recipe, calibration="none", progress=False)
    config = json.loads((export(model, tmp_path / "gptq", format="gptq") / "config.json").read_text())["quantization_config"]
    (pattern,) = [key.removeprefix("-:") for key in config["dynamic"] if key.startswith("-:")]
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    assert re.match(pattern, f"model.layers.1.{moe}.experts") and re.match(pattern, f"model.layers.0.{moe}.gate")
    assert not re.match(pattern, "model.layers.0.self_attn.qkv_proj") and not re.match(pattern, "model.layers.0.self_attn.q_proj")
