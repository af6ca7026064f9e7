import pytest
import torch
from conftest import TINY_CONFIGS, TINY_VOCAB, tiny_model

import llmcompress
from llmcompress import checkpoint
from llmcompress.config import AWQConfig, CompressConfig, GPTQConfig, QuantFormat
from llmcompress.formats import dequantize, quantize
from llmcompress.methods.awq import candidate_scales, output_error_sum, search_clipping, search_scales
from llmcompress.methods.gptq import gptq
from llmcompress.nn import CompressedLinear
from llmcompress.pipeline import apply_fold, catch_block_inputs, find_decoder_blocks, find_fold, input_groups, plan_targets

FORMATS = [QuantFormat(bits=4, group_size=32), QuantFormat(bits=3, group_size=64, symmetric=True), QuantFormat(bits=2, group_size=-1),
           QuantFormat(kind="nvfp4"), QuantFormat(kind="mxfp4")]


def _layer(rows=48, cols=160, tokens=2000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(tokens, 24, generator=generator) @ torch.randn(24, cols, generator=generator)
    inputs += 0.2 * torch.randn(tokens, cols, generator=generator)
    inputs[:, :3] *= 8  # outlier channels, as real activations have
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    return weight, inputs.T @ inputs / tokens


def _hessian_error(weight, approx, hessian):
    return output_error_sum([weight], [approx], hessian)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize(("act_order", "static_groups"), [(False, False), (True, False), (True, True)])
def test_gptq_beats_rtn_on_the_hessian_weighted_error(fmt, act_order, static_groups):
    weight, hessian = _layer()
    result = gptq(weight, hessian, fmt, act_order=act_order, static_groups=static_groups)
    rtn_error = _hessian_error(weight, dequantize(quantize(weight, fmt), fmt), hessian)
    gptq_error = _hessian_error(weight, dequantize(result.quantized, fmt), hessian)
    assert gptq_error < 0.5 * rtn_error
    has_g_idx = result.quantized.g_idx is not None
    assert has_g_idx == (act_order and not static_groups and fmt.group_size != -1) or (has_g_idx and fmt.group_size == -1)


def test_act_order_groups_follow_the_hessian_diagonal():
    weight, hessian = _layer(cols=128)
    fmt = QuantFormat(bits=4, group_size=32)
    q = gptq(weight, hessian, fmt, act_order=True).quantized
    order = torch.argsort(torch.diagonal(hessian), descending=True)
    assert torch.equal(q.g_idx[order].long(), torch.arange(128) // 32)
    assert torch.bincount(q.g_idx.long()).tolist() == [32, 32, 32, 32]


def test_static_groups_stay_contiguous():
    weight, hessian = _layer(cols=128)
    q = gptq(weight, hessian, QuantFormat(bits=4, group_size=32), act_order=True, static_groups=True).quantized
    assert q.g_idx is None
    expected_scales, _ = quantize(weight, QuantFormat(bits=4, group_size=32)).scales, None
    assert torch.equal(q.scales, expected_scales)


def test_dead_input_channels_are_zeroed():
    weight, hessian = _layer(cols=64)
    hessian[5, :] = 0
    hessian[:, 5] = 0
    result = gptq(weight, hessian, QuantFormat(bits=4, group_size=32))
    assert result.dead_columns == 1
    assert float(dequantize(result.quantized, QuantFormat(bits=4, group_size=32))[:, 5].abs().max()) == 0.0


def test_cholesky_failure_raises_the_dampening():
    weight, _ = _layer(cols=64)
    # Eigenvalues 63.95 and -0.05 (x63): 1% dampening (0.0095) is not enough, 10% is.
    hessian = torch.ones(64, 64) - 0.05 * torch.eye(64)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(hessian + 0.0095 * torch.eye(64))
    result = gptq(weight, hessian, QuantFormat(bits=4, group_size=32), damp=0.01)
    assert result.damp == pytest.approx(0.1)
    assert torch.isfinite(dequantize(result.quantized, QuantFormat(bits=4, group_size=32))).all()


def test_act_order_round_trips_through_packing_and_save_load(tmp_path):
    model = tiny_model("llama")
    calibration = torch.randint(0, TINY_VOCAB, (8, 48), generator=torch.Generator().manual_seed(2))
    config = CompressConfig(quant=QuantFormat(bits=4, group_size=32), method="gptq", gptq=GPTQConfig(act_order=True, static_groups=False))
    llmcompress.compress(model, config, calibration=calibration, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, CompressedLinear) and layer.has_g_idx
    sibling = model.model.layers[0].self_attn.k_proj.weight_g_idx
    assert torch.equal(sibling, layer.weight_g_idx) and sibling.data_ptr() != layer.weight_g_idx.data_ptr()
    assert "act-order" in repr(layer)
    checkpoint.save(model, tmp_path / "ckpt", model.llmcompress_config)
    loaded, _ = llmcompress.load(tmp_path / "ckpt")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight_g_idx, layer.weight_g_idx)
    ids = calibration[:2]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_true_sequential_stages_follow_the_call_order():
    model = tiny_model("llama")
    path, blocks = find_decoder_blocks(model)
    targets = [t for t in plan_targets(blocks, path, CompressConfig(quant=QuantFormat(group_size=32))) if t.block == 0]
    inputs = catch_block_inputs(model, blocks, torch.randint(0, TINY_VOCAB, (2, 16)), 2, torch.device("cpu"))
    groups = [[t.local_name.split(".")[-1] for t in group] for group in input_groups(blocks[0], targets, inputs)]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_folded_awq_scales_leave_the_float_model_unchanged(family):
    model = tiny_model(family)
    ids = torch.randint(0, TINY_VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids).logits
    path, blocks = find_decoder_blocks(model)
    config = CompressConfig(quant=QuantFormat(group_size=32))
    inputs = catch_block_inputs(model, blocks, ids, 2, torch.device("cpu"))
    folded = []
    for index, block in enumerate(blocks):
        targets = [t for t in plan_targets(blocks, path, config) if t.block == index]
        for group in input_groups(block, targets, inputs):
            fold = find_fold(block, group, inputs)
            if fold is None:
                continue
            scales = torch.empty(group[0].fmt.group_size and block.get_submodule(group[0].local_name).in_features).uniform_(0.3, 3.0)
            apply_fold(block, fold, scales)
            with torch.no_grad():
                for target in group:
                    block.get_submodule(target.local_name).weight.mul_(scales)
            folded.append(fold.kind)
        with torch.no_grad():
            inputs = [(block(h, **kw), kw) for h, kw in inputs]
            inputs = [(h[0] if isinstance(h, tuple) else h, kw) for h, kw in inputs]
    with torch.no_grad():
        after = model(ids).logits
    assert len(folded) >= 2 * len(blocks)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)
    if family == "gemma":
        assert "one_plus" in folded


def test_scale_search_never_loses_to_rtn_and_uses_activation_outliers():
    weight, hessian = _layer()
    act_mean = torch.sqrt(torch.diagonal(hessian))
    fmt = QuantFormat(bits=3, group_size=32)
    search = search_scales([weight], [fmt], hessian, act_mean, grid=20)
    assert search.error <= search.error_unscaled
    assert search.alpha is not None and search.error < 0.9 * search.error_unscaled
    assert float(search.scales[:3].mean()) > float(search.scales[3:].mean())  # outlier channels are protected
    scales = candidate_scales(act_mean, 0.5, None)
    assert float(scales.max() * scales.min()) == pytest.approx(1.0, rel=1e-4)


def test_clipping_search_lowers_the_output_error():
    weight, hessian = _layer()
    weight[0, 7] = 1.0  # one large weight stretches its group's range
    fmt = QuantFormat(bits=3, group_size=32)
    clipped = search_clipping(weight, hessian, fmt, grid=20, max_shrink=0.5)
    plain = _hessian_error(weight, dequantize(quantize(weight, fmt), fmt), hessian)
    shrunk = _hessian_error(weight, dequantize(quantize(clipped, fmt), fmt), hessian)
    assert shrunk < plain
    assert float(clipped.abs().max()) <= float(weight.abs().max())


def test_gptq_range_search_sets_the_groups_and_leaves_the_target_unclipped():
    weight, hessian = _layer(rows=64, cols=256)
    fmt = QuantFormat(bits=3, group_size=64)
    ranges = search_clipping(weight, hessian, fmt, grid=50, max_shrink=0.2)
    searched = gptq(weight, hessian, fmt, act_order=True, static_groups=True, ranges=ranges)
    clipped_target = gptq(ranges, hessian, fmt, act_order=True, static_groups=True)
    assert torch.equal(searched.quantized.scales, quantize(ranges, fmt).scales)
    assert torch.equal(searched.quantized.zeros, quantize(ranges, fmt).zeros)
    # GPTQ still targets the original weight: far closer to it than GPTQ on the clipped weight.
    assert _hessian_error(weight, searched.weight, hessian) < 0.5 * _hessian_error(weight, clipped_target.weight, hessian)


@pytest.mark.slow
def test_gptq_range_search_lowers_the_output_error_of_real_layers(smollm2_dir):
    """On SmolLM2's own layers and inputs (random matrices do not show it: their groups have no
    outliers worth clipping), the search lowers GPTQ's mean output error at W3. At W4 its effect
    on these few tokens is within 1% either way; perplexity decides there (eval/compare_llmcompressor.py)."""
    from llmcompress.calib import calibration_windows
    from llmcompress.models import load_model

    model, tokenizer = load_model(smollm2_dir)
    windows = calibration_windows("austen:train", tokenizer, 4, 256, seed=0)
    layers = {name: model.get_submodule(name) for name in ("model.layers.3.self_attn.o_proj", "model.layers.9.mlp.up_proj",
                                                          "model.layers.15.mlp.down_proj", "model.layers.22.self_attn.k_proj")}
    hessians = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=n: hessians.__setitem__(name, hessians.get(name, 0) + (lambda x: x.T @ x)(
        i[0].reshape(-1, i[0].shape[-1]).float()))) for n, m in layers.items()]
    with torch.no_grad():
        model.float()(windows)
    for hook in hooks:
        hook.remove()
    for fmt in (QuantFormat(bits=3, group_size=64),):
        ratios = []
        for name, layer in layers.items():
            weight, hessian = layer.weight.detach().float(), hessians[name] / windows.numel()
            plain = gptq(weight, hessian, fmt, act_order=True, static_groups=True)
            searched = gptq(weight, hessian, fmt, act_order=True, static_groups=True, ranges=search_clipping(weight, hessian, fmt, grid=50, max_shrink=0.2))
            ratios.append(_hessian_error(weight, searched.weight, hessian) / _hessian_error(weight, plain.weight, hessian))
        # On average, not on every layer: a layer may come out up to 1% worse (down_proj of block 15 at W3).
        assert sum(ratios) / len(ratios) < 0.97 and max(ratios) < 1.02, (fmt.describe(), ratios)


def test_gptq_range_search_needs_static_groups_and_a_matching_shape():
    weight, hessian = _layer(rows=8, cols=64)
    fmt = QuantFormat(bits=4, group_size=32)
    with pytest.raises(ValueError, match="static groups"):
        gptq(weight, hessian, fmt, act_order=True, static_groups=False, ranges=weight)
    with pytest.raises(ValueError, match="ranges must be"):
        gptq(weight, hessian, fmt, static_groups=True, ranges=weight[:4])
    # On with static groups unless turned off; dynamic groups have no ranges to search up front.
    assert GPTQConfig().clip is True and GPTQConfig(clip=False).clip is False
    assert GPTQConfig(static_groups=False).clip is False
    with pytest.raises(llmcompress.ConfigError, match="GPTQConfig.clip.*static groups"):
        GPTQConfig(static_groups=False, clip=True)
    with pytest.raises(llmcompress.ConfigError, match="GPTQConfig.max_shrink"):
        GPTQConfig(max_shrink=1.0)


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_methods_run_end_to_end_with_fp4_and_record_what_they_did(method, tokenizer):
    model = tiny_model("qwen2")
    config = CompressConfig(quant=QuantFormat(kind="nvfp4"), method=method, awq=AWQConfig(grid=5, clip_grid=10),
                            calib=llmcompress.CalibConfig(nsamples=4, seqlen=64))
    llmcompress.compress(model, config, tokenizer=tokenizer, progress=False)
    layers = model.compression_report.layers
    assert model.llmcompress_config.calib.source == "austen:train" and len(layers) == 21
    assert all(r.method == {"awq": "awq+rtn"}.get(method, method) and r.output_error is not None for r in layers)
    if "awq" in method:
        assert any("awq: a=" in r.notes or "s=1 was best" in r.notes for r in layers)
        assert any("no foldable producer" in r.notes for r in layers if r.name.endswith("o_proj"))


def test_quantizing_methods_need_calibration():
    with pytest.raises(llmcompress.CalibrationError, match="needs calibration"):
        llmcompress.compress(tiny_model("llama"), CompressConfig(quant=QuantFormat(group_size=32), method="gptq"),
                             calibration="none", progress=False)
    with pytest.raises(llmcompress.ConfigError, match="GPTQConfig.damp"):
        GPTQConfig(damp=0)


@pytest.mark.parametrize("fmt", [QuantFormat(bits=4, group_size=64), QuantFormat(bits=3, group_size=64, symmetric=True), QuantFormat(kind="mxfp4")],
                         ids=lambda f: f.describe())
def test_stacked_gptq_equals_per_layer_gptq(fmt):
    from llmcompress.formats import split_rows

    first, hessian = _layer(rows=40, cols=128)
    second, _ = _layer(rows=24, cols=128, seed=1)
    separate = [gptq(w, hessian, fmt, act_order=True).quantized for w in (first, second)]
    stacked = split_rows(gptq(torch.cat([first, second]), hessian, fmt, act_order=True).quantized, [40, 24])
    for alone, together in zip(separate, stacked):
        assert torch.equal(alone.codes, together.codes) and torch.equal(alone.scales.view(torch.uint8), together.scales.view(torch.uint8))
        assert torch.equal(alone.g_idx, together.g_idx)
