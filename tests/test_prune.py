import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_VOCAB, tiny_model

import llmcompress
from llmcompress.cli import main
from llmcompress.config import CompressConfig, LowRankConfig, PruneConfig, QuantFormat
from llmcompress.errors import ConfigError
from llmcompress.formats import dequantize
from llmcompress.methods.awq import output_error_sum
from llmcompress.methods.gptq import gptq
from llmcompress.methods.prune import input_norms_from_hessian, magnitude_mask, mask_from_scores, pruned_before, wanda_mask, wanda_scores
from llmcompress.nn import CompressedLinear
from llmcompress.packing import pack_bits, unpack_bits
from llmcompress.summary import size_summary


def _layer(rows=40, cols=96, tokens=1500, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(tokens, 16, generator=generator) @ torch.randn(16, cols, generator=generator)
    inputs += 0.3 * torch.randn(tokens, cols, generator=generator)
    inputs[:, :4] *= 6
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    return weight, inputs


def _windows(count=6, length=48, seed=1):
    return torch.randint(0, TINY_VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def _check_counts(mask, sparsity, n_m):
    rows, cols = mask.shape
    if n_m is None:
        assert (mask.sum(dim=1) == cols - pruned_before(cols, sparsity)).all()
    else:
        assert (mask.reshape(rows, -1, n_m[1]).sum(-1) == n_m[0]).all()


PATTERNS = [(0.0, None), (0.29, None), (0.5, None), (0.77, None), (0.5, (2, 4)), (0.5, (4, 8)), (0.75, (1, 4))]


@pytest.mark.parametrize("sparsity,n_m", PATTERNS)
@pytest.mark.parametrize("shape", [(7, 24), (5, 136), (33, 72)])
def test_every_method_prunes_exactly_the_requested_count(sparsity, n_m, shape):
    weight, inputs = _layer(*shape, tokens=400, seed=shape[1])
    hessian = inputs.T @ inputs / inputs.shape[0]
    masks = {
        "magnitude": magnitude_mask(weight, sparsity, n_m),
        "wanda": wanda_mask(weight, input_norms_from_hessian(hessian), sparsity, n_m),
        "sparsegpt": gptq(weight, hessian, None, block_size=32, sparsity=sparsity, n_m=n_m).mask,
        "sparsegpt+int4": gptq(weight, hessian, QuantFormat(bits=4, group_size=8), block_size=32, sparsity=sparsity, n_m=n_m).mask,
    }
    for name, mask in masks.items():
        _check_counts(mask, sparsity, n_m)
    result = gptq(weight, hessian, QuantFormat(bits=3, group_size=8), block_size=32, sparsity=sparsity, n_m=n_m)
    assert (dequantize(result.quantized, QuantFormat(bits=3, group_size=8))[~result.mask] == 0).all()
    assert (result.weight[~result.mask] == 0).all()


def test_ties_never_change_the_count():
    scores = torch.ones(3, 10)
    _check_counts(mask_from_scores(scores, 0.5, None), 0.5, None)
    _check_counts(mask_from_scores(torch.zeros(2, 8), 0.5, (2, 4)), 0.5, (2, 4))


def test_wanda_scores_match_a_hand_computation():
    weight = torch.tensor([[1.0, -2.0, 0.5, 4.0], [-3.0, 0.1, 2.0, -0.2]])
    inputs = torch.tensor([[1.0, 0.0, 4.0, 0.0], [1.0, 1.0, 4.0, 0.0], [1.0, 0.0, 0.0, 0.4]])
    norms = inputs.norm(dim=0)  # sqrt(3), 1, sqrt(32), 0.4
    expected = torch.tensor([[3**0.5, 2.0, 0.5 * 32**0.5, 1.6], [3 * 3**0.5, 0.1, 2 * 32**0.5, 0.08]])
    assert torch.allclose(wanda_scores(weight, norms), expected)
    hessian = inputs.T @ inputs / 3
    assert torch.allclose(input_norms_from_hessian(hessian) * 3**0.5, norms)
    # The input norm lifts row 0's small 0.5 over its large 4.0, which magnitude keeps.
    assert wanda_mask(weight, input_norms_from_hessian(hessian), 0.5, None).tolist() == [[False, True, True, False], [True, False, True, False]]
    assert magnitude_mask(weight, 0.5, None).tolist() == [[False, True, False, True], [True, False, True, False]]
    assert magnitude_mask(weight, 0.5, (1, 2)).tolist() == [[False, True, False, True], [True, False, True, False]]


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_lowers_the_output_error_below_wanda(n_m):
    weight, inputs = _layer(rows=64, cols=128, tokens=3000, seed=3)
    hessian = inputs.T @ inputs / inputs.shape[0]
    wanda = weight * wanda_mask(weight, input_norms_from_hessian(hessian), 0.5, n_m)
    sparsegpt = gptq(weight, hessian, None, sparsity=0.5, n_m=n_m).weight
    magnitude = weight * magnitude_mask(weight, 0.5, n_m)
    errors = {name: output_error_sum([weight], [approx], hessian) for name, approx in
              (("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparsegpt))}
    assert errors["sparsegpt"] < 0.8 * errors["wanda"] < 0.8 * errors["magnitude"], errors


def test_a_fixed_mask_through_gptq_stays_exact_and_beats_rounding_after_pruning():
    weight, inputs = _layer(rows=32, cols=128, seed=5)
    hessian = inputs.T @ inputs / inputs.shape[0]
    fmt = QuantFormat(bits=4, group_size=32)
    mask = wanda_mask(weight, input_norms_from_hessian(hessian), 0.5, (2, 4))
    joint = gptq(weight, hessian, fmt, mask=mask, act_order=True, static_groups=True)
    assert torch.equal(joint.mask, mask)
    assert (dequantize(joint.quantized, fmt)[~mask] == 0).all()
    rounded = dequantize(llmcompress.formats.quantize(weight * mask, fmt), fmt)
    assert output_error_sum([weight], [joint.weight], hessian) < output_error_sum([weight], [rounded], hessian)


def test_bitmask_packing_round_trips_ragged_rows():
    mask = torch.rand(5, 29, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.shape == (5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, 29), mask)
    # LSB first: column j is bit j % 8 of byte j // 8.
    single = torch.zeros(1, 16, dtype=torch.bool)
    single[0, 9] = True
    assert pack_bits(single).tolist() == [[0, 2]]


@pytest.mark.parametrize("bad,message", [
    (dict(sparsity=1.0), "a fraction in [0, 1)"),
    (dict(sparsity=-0.1), "a fraction in [0, 1)"),
    (dict(pattern="3:2"), "0 < N < M"),
    (dict(pattern="0:4"), "0 < N < M"),
    (dict(pattern="two:four"), "unstructured or N:M"),
    (dict(pattern="2:4", sparsity=0.3), "fixes the sparsity at 0.5"),
    (dict(method="lasso"), "magnitude, wanda, sparsegpt"),
])
def test_bad_pruning_settings_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        PruneConfig(**{"method": "wanda", **bad})


def test_pattern_that_does_not_divide_the_inputs_is_refused_by_layer_name():
    model = tiny_model("llama")  # hidden 64, intermediate 96: 5 divides neither
    with pytest.raises(ConfigError, match=r"pattern 2:5 groups every 5 inputs, but model\.layers\.0\.self_attn\.q_proj has 64"):
        llmcompress.compress(model, CompressConfig(quant=None, prune=PruneConfig(method="magnitude", pattern="2:5")), progress=False)


def test_calibration_free_config_refuses_data_driven_pruning():
    with pytest.raises(ConfigError, match="wanda scores weights by calibration activations"):
        CompressConfig(quant=None, prune=PruneConfig(method="wanda"), calib=llmcompress.config.CalibConfig(source="none"))
    with pytest.raises(ConfigError, match="leave nothing to do"):
        CompressConfig(quant=None)


@pytest.mark.parametrize("quant,method", [(None, "rtn"), (QuantFormat(bits=4, group_size=32), "gptq"), (QuantFormat(kind="nvfp4"), "rtn")])
def test_two_four_checkpoint_is_compact_and_loads_identically(tmp_path, quant, method):
    model = tiny_model("llama")
    dense_bytes = size_summary(model).bytes
    config = CompressConfig(quant=quant, method=method, prune=PruneConfig(method="sparsegpt", pattern="2:4"))
    llmcompress.compress(model, config, calibration=_windows(), output_dir=tmp_path / "ckpt", progress=False)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, CompressedLinear) and layer.layout.sparsity == "2:4"
    mask = unpack_bits(layer.weight_bitmask, layer.in_features)
    _check_counts(mask, 0.5, (2, 4))
    assert (layer.dequantized_weight()[~mask] == 0).all()
    assert size_summary(model).bytes < dense_bytes
    loaded, _ = llmcompress.load(tmp_path / "ckpt")
    ids = _windows(2, 24, seed=4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    report = json.loads((tmp_path / "ckpt" / "compression_report.json").read_text())
    assert all(abs(layer["sparsity"] - 0.5) < 1e-6 for layer in report["layers"])


def test_unstructured_sixteen_bit_pruning_keeps_plain_linears_with_exact_zeros():
    model = tiny_model("llama")
    llmcompress.compress(model, CompressConfig(quant=None, prune=PruneConfig(method="wanda", sparsity=0.6)), calibration=_windows(), progress=False)
    weight = model.model.layers[2].self_attn.o_proj.weight
    assert isinstance(model.model.layers[2].self_attn.o_proj, torch.nn.Linear)
    assert ((weight == 0).sum(dim=1) == pruned_before(64, 0.6)).all()


def test_eora_compensates_pruning_and_quantization_together():
    windows = _windows(8, 64)
    config = CompressConfig(quant=QuantFormat(bits=4, group_size=32), prune=PruneConfig(method="wanda", pattern="2:4"))
    errors = {}
    for rank in (0, 16):
        model = tiny_model("llama")
        with_branch = dataclasses.replace(config, lowrank=LowRankConfig(rank=rank))
        llmcompress.compress(model, with_branch, calibration=windows, progress=False)
        errors[rank] = sum(r.output_error for r in model.compression_report.layers)
    assert errors[16] < 0.8 * errors[0]


def test_cli_prunes_alone_with_bits_16(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    result = CliRunner().invoke(main, [str(tiny_model_dir), "--out", str(out), "--bits", "16", "--prune", "magnitude", "--pattern", "2:4",
                                       "--eval-seqlen", "64", "--eval-windows", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "compressing: magnitude 2:4, data-free" in result.output
    assert "sparsity: 2:4, stored compact" in result.output
    model, _ = llmcompress.load(out)
    assert model.model.layers[0].mlp.up_proj.fmt is None and model.model.layers[0].mlp.up_proj.layout.sparsity == "2:4"
    result = CliRunner().invoke(main, [str(tiny_model_dir), "--out", str(tmp_path / "u"), "--bits", "4", "--group-size", "32",
                                       "--prune", "magnitude", "--sparsity", "0.5", "--no-eval"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stored dense" in result.output and "no size or speed gain" in result.output
    # Unstructured pruning alone leaves the layers dense nn.Linear: they still count, at their float bits.
    result = CliRunner().invoke(main, [str(tiny_model_dir), "--out", str(tmp_path / "d"), "--bits", "16", "--prune", "magnitude",
                                       "--sparsity", "0.5", "--no-eval"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    sizes = json.loads((tmp_path / "d" / "compression_report.json").read_text())
    assert sizes["size_after"]["layer_parameters"] == sizes["size_before"]["layer_parameters"] > 0
    assert sizes["size_after"]["layer_bits_per_weight"] == sizes["size_before"]["layer_bits_per_weight"] == 32  # tiny models are float32
    result = CliRunner().invoke(main, [str(tiny_model_dir), "--out", str(tmp_path / "b"), "--bits", "16", "--prune", "wanda",
                                       "--sparsity", "1.0", "--no-eval"])
    assert result.exit_code == 1 and "PruneConfig.sparsity=1.0 is not allowed" in result.output


def test_a_corrupt_sparse_layout_is_named_on_load(tmp_path):
    model = tiny_model("llama")
    config = CompressConfig(quant=None, prune=PruneConfig(method="magnitude", pattern="2:4"))
    llmcompress.compress(model, config, output_dir=tmp_path / "ckpt", progress=False)
    config_file = tmp_path / "ckpt" / "config.json"
    raw = json.loads(config_file.read_text())
    raw["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["layout"]["values_dtype"] = "float7"
    config_file.write_text(json.dumps(raw))
    with pytest.raises(llmcompress.CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj is invalid .*values_dtype 'float7'"):
        llmcompress.load(tmp_path / "ckpt")
