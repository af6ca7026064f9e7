import pytest
import torch
from conftest import TINY_CONFIGS, TINY_VOCAB, tiny_model
from torch import nn

import llmcompress
from llmcompress.config import CalibConfig, CompressConfig, ModuleOverride, QuantFormat
from llmcompress.errors import ConfigError, ModelError
from llmcompress.nn import CompressedLinear
from llmcompress.pipeline import catch_block_inputs, find_decoder_blocks, gather_statistics, plan_targets, run_block
from llmcompress.stats import ALL_STATISTICS, output_error


G32 = CompressConfig(quant=QuantFormat(bits=4, group_size=32))


def _windows(count=6, length=48, seed=1):
    return torch.randint(0, TINY_VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_compresses_and_stays_close(family):
    model = tiny_model(family)
    ids = _windows(2, 40, seed=9)
    with torch.no_grad():
        reference = model(ids).logits
    config = CompressConfig(quant=QuantFormat(bits=8, group_size=32))
    llmcompress.compress(model, config, calibration=_windows(), progress=False)
    path, blocks = find_decoder_blocks(model)
    linears = [m for m in blocks.modules() if isinstance(m, nn.Linear)]
    compressed = [m for m in blocks.modules() if isinstance(m, CompressedLinear)]
    assert not linears and len(compressed) == len(model.compression_report.layers) > 0
    assert isinstance(model.get_output_embeddings(), nn.Linear)  # lm_head stays in float
    errors = {}
    with torch.no_grad():
        errors[8] = _relative(model(ids).logits, reference)
    for bits in (4, 2):
        lower = tiny_model(family)
        llmcompress.compress(lower, CompressConfig(quant=QuantFormat(bits=bits, group_size=32)), calibration=_windows(), progress=False)
        with torch.no_grad():
            errors[bits] = _relative(lower(ids).logits, reference)
    assert errors[8] < 0.02
    assert errors[8] < errors[4] < errors[2]


def test_blocks_are_found_by_structure():
    assert find_decoder_blocks(tiny_model("opt"))[0] == "model.decoder.layers"
    assert find_decoder_blocks(tiny_model("qwen2"))[0] == "model.layers"


def test_unmappable_model_says_what_it_looked_for():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelError, match="looked for a torch.nn.ModuleList.*Conv1D"):
        find_decoder_blocks(model)


def test_statistics_equal_a_direct_computation_and_are_shared_by_siblings():
    model = tiny_model("llama")
    path, blocks = find_decoder_blocks(model)
    targets = [t for t in plan_targets(blocks, path, G32) if t.block == 0]
    inputs = catch_block_inputs(model, blocks, _windows(5, 32), batch_size=2, device=torch.device("cpu"))
    assert [h.shape[0] for h, _ in inputs] == [2, 2, 1]
    seen = {}
    hooks = [blocks[0].get_submodule(name).register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, []).append(a[0].detach()))
             for name in ("self_attn.q_proj", "mlp.down_proj")]
    run_block(blocks[0], inputs)
    for hook in hooks:
        hook.remove()
    stats = gather_statistics(blocks[0], targets, inputs, ALL_STATISTICS)
    for local in ("self_attn.q_proj", "mlp.down_proj"):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[local]]).float()
        layer = stats[f"{path}.0.{local}"]
        assert layer.tokens == 5 * 32
        assert torch.allclose(layer.hessian, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
        assert torch.allclose(layer.act_abs_mean, x.abs().mean(0), rtol=1e-5)
        assert torch.equal(layer.act_abs_max, x.abs().amax(0))
    assert stats[f"{path}.0.self_attn.q_proj"] is stats[f"{path}.0.self_attn.k_proj"] is stats[f"{path}.0.self_attn.v_proj"]
    assert stats[f"{path}.0.mlp.gate_proj"] is stats[f"{path}.0.mlp.up_proj"]
    assert stats[f"{path}.0.self_attn.o_proj"] is not stats[f"{path}.0.self_attn.q_proj"]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_one_input_statistics_skip_the_matmuls_without_changing_the_hessian(family, monkeypatch):
    from llmcompress.pipeline import input_groups
    from llmcompress.stats import HESSIAN

    model = tiny_model(family)
    path, blocks = find_decoder_blocks(model)
    targets = [t for t in plan_targets(blocks, path, G32) if t.block == 0]
    inputs = catch_block_inputs(model, blocks, _windows(3, 32), batch_size=2, device=torch.device("cpu"))
    calls = []
    real_forward = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: calls.append(self) or real_forward(self, x))
    for group in input_groups(blocks[0], targets, inputs):
        calls.clear()
        full = gather_statistics(blocks[0], group, inputs, frozenset({HESSIAN}), stop_after_last=True)
        full_calls = len(calls)
        calls.clear()
        skipped = gather_statistics(blocks[0], group, inputs, frozenset({HESSIAN}), stop_after_last=True, one_input=True)
        assert full_calls - len(calls) == (len(group) - 1) * len(inputs)  # the last target never ran anyway
        for target in group:
            assert torch.equal(full[target.name].hessian, skipped[target.name].hessian)
    assert all("forward" not in vars(m) for m in blocks[0].modules())  # the real forwards are back


def test_one_input_refuses_layers_that_read_different_tensors():
    model = tiny_model("llama")
    path, blocks = find_decoder_blocks(model)
    targets = [t for t in plan_targets(blocks, path, G32) if t.block == 0]
    inputs = catch_block_inputs(model, blocks, _windows(2, 16), batch_size=2, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="reads a different tensor"):
        gather_statistics(blocks[0], targets, inputs, ALL_STATISTICS, stop_after_last=True, one_input=True)
    assert all("forward" not in vars(m) for m in blocks[0].modules())


def test_each_block_sees_the_outputs_of_the_compressed_block_before_it():
    model = tiny_model("llama")
    windows = _windows(4, 32)
    llmcompress.compress(model, CompressConfig(quant=QuantFormat(bits=2, group_size=32)), calibration=windows, progress=False)
    path, blocks = find_decoder_blocks(model)
    inputs = catch_block_inputs(model, blocks, windows, batch_size=8, device=torch.device("cpu"))
    expected_input_of_last = run_block(blocks[1], run_block(blocks[0], inputs))
    # The recorded output error of the last block's first layer must match its compressed-model inputs.
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h, _ in expected_input_of_last]).float()
    layer = blocks[2].self_attn.q_proj
    normed = blocks[2].input_layernorm(x).float().detach()
    hessian = normed.T @ normed / normed.shape[0]
    record = next(r for r in model.compression_report.layers if r.name == f"{path}.2.self_attn.q_proj")
    float_model = tiny_model("llama")
    weight = find_decoder_blocks(float_model)[1][2].self_attn.q_proj.weight.detach()
    assert record.output_error == pytest.approx(output_error(weight, layer.dequantized_weight(), hessian), rel=1e-3)


def test_data_free_run_needs_no_tokenizer_or_text():
    model = tiny_model("mistral")
    llmcompress.compress(model, G32, progress=False)
    report = model.compression_report
    assert report.calibration_tokens == 0 and all(r.output_error is None for r in report.layers)
    assert model.llmcompress_config.calib.source == "none"


def test_overrides_skip_and_change_formats():
    model = tiny_model("llama")
    config = CompressConfig(quant=QuantFormat(bits=4, group_size=32),
                            overrides=(ModuleOverride(pattern="o_proj", skip=True), ModuleOverride(pattern="down_proj", bits=8, group_size=-1)))
    llmcompress.compress(model, config, progress=False)
    block = find_decoder_blocks(model)[1][1]
    assert isinstance(block.self_attn.o_proj, nn.Linear)
    assert block.mlp.down_proj.fmt == QuantFormat(bits=8, group_size=-1)
    assert block.mlp.up_proj.fmt == QuantFormat(bits=4, group_size=32)


def test_nan_weight_is_refused_by_name():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight contains NaN"):
        llmcompress.compress(model, G32, progress=False)


def test_group_larger_than_layer_is_refused():
    with pytest.raises(ConfigError, match="group_size=128 is larger than .* 64 input features"):
        llmcompress.compress(tiny_model("llama"), CompressConfig(quant=QuantFormat(group_size=128)), progress=False)


def test_overrides_that_skip_everything_are_refused():
    config = CompressConfig(overrides=(ModuleOverride(pattern=".", skip=True),))
    with pytest.raises(ConfigError, match="no Linear layer"):
        llmcompress.compress(tiny_model("llama"), config, progress=False)


def test_calibration_is_validated():
    with pytest.raises(llmcompress.CalibrationError, match="2-D long tensor"):
        llmcompress.compress(tiny_model("llama"), G32, calibration=torch.zeros(3, 5), progress=False)
    with pytest.raises(llmcompress.CalibrationError, match="tokenizer"):
        llmcompress.compress(tiny_model("llama"), G32, calibration="austen:train", progress=False)


def test_calibration_text_through_a_tokenizer(tokenizer):
    model = tiny_model("qwen2")
    config = CompressConfig(calib=llmcompress.CalibConfig(nsamples=4, seqlen=64, batch_size=3),
                            quant=QuantFormat(bits=4, group_size=32))
    llmcompress.compress(model, config, calibration="austen:train", tokenizer=tokenizer, progress=False)
    assert model.compression_report.calibration_tokens == 4 * 64
    assert model.llmcompress_config.calib.source == "austen:train"
    assert all(r.output_error is not None and 0 < r.output_error < 0.3 for r in model.compression_report.layers)


def test_moving_the_rest_of_the_model_leaves_blocks_and_keeps_ties():
    from llmcompress.pipeline import move_outside_blocks

    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    move_outside_blocks(model, blocks, torch.device("meta"))
    assert model.model.embed_tokens.weight.device.type == "meta" and model.model.norm.weight.device.type == "meta"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.device.type == "cpu" for p in blocks.parameters())


def test_overflowing_activations_are_caught_where_they_appear():
    """A float16 layer whose outputs pass 65504 poisons every statistic after it: the run stops
    there, naming the layer whose input went non-finite, instead of a Cholesky traceback in GPTQ.
    (On a CPU, calibration of a float16 model computes in bfloat16 or float32 unless asked for float16.)"""
    model = tiny_model("llama", dtype=torch.float16)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.fill_(2000.0)
    config = CompressConfig(quant=QuantFormat(bits=4, group_size=32), method="gptq", calib=CalibConfig(compute_dtype="float16"))
    with pytest.raises(ModelError, match=r"the input of model\.layers\.1\.mlp\.down_proj holds NaN or Inf on the calibration data, "
                                         r"in torch\.float16 \(float16 holds at most 65504: convert the model to bfloat16"):
        llmcompress.compress(model, config, calibration=_windows(), progress=False)
