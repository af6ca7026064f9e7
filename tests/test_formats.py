import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcompress.config import QuantFormat
from llmcompress.formats import (
    E2M1_VALUES,
    column_groups,
    dequantize,
    dividing_group,
    e2m1_decode,
    e2m1_encode,
    encode,
    multipliers,
    num_groups,
    quantize,
)
from llmcompress.methods.rtn import rtn

INT_FORMATS = [QuantFormat(bits=b, group_size=g, symmetric=s) for b in (2, 3, 4, 8) for g in (32, 128, -1) for s in (False, True)]
shapes = st.tuples(st.integers(1, 7), st.integers(1, 300))


def _weight(shape, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * scale


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), fmt=st.sampled_from(INT_FORMATS), scale=st.sampled_from([1e-3, 0.05, 3.0]))
def test_int_error_is_at_most_half_a_step(shape, seed, fmt, scale):
    weight = _weight(shape, seed, scale)
    q = quantize(weight, fmt)
    assert q.codes.shape == weight.shape and q.codes.dtype == torch.uint8
    assert int(q.codes.max()) < 2**fmt.bits
    assert q.scales.shape == (shape[0], num_groups(fmt, shape[1]))
    step = multipliers(q.scales, fmt)[:, column_groups(q, fmt)]
    error = (dequantize(q, fmt) - weight).abs()
    # Half a step plus the float16 rounding of the scale itself.
    assert bool((error <= step * 0.5 * (1 + 2e-3) + 1e-7).all())


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), fmt=st.sampled_from(INT_FORMATS + [QuantFormat(kind="nvfp4"), QuantFormat(kind="mxfp4")]))
def test_dequantized_weight_lies_exactly_on_the_grid(shape, seed, fmt):
    q = quantize(_weight(shape, seed), fmt)
    columns = column_groups(q, fmt)
    multiplier = multipliers(q.scales, fmt, q.global_scale)[:, columns]
    zeros = None if q.zeros is None else q.zeros[:, columns]
    assert torch.equal(encode(dequantize(q, fmt), multiplier, zeros, fmt), q.codes)


def test_symmetric_int4_uses_all_sixteen_levels_and_maps_zero_exactly():
    # amax 0.9375 makes the scale 0.125, exact in float16, so -amax lands on code -8.
    weight = torch.cat([torch.tensor([-0.9375]), torch.arange(-7, 8) * 0.125]).reshape(1, 16)
    fmt = QuantFormat(bits=4, group_size=16, symmetric=True)
    q = quantize(weight, fmt)
    assert q.zeros is None
    assert float(q.scales[0, 0]) == 0.125
    assert set(q.codes.unique().tolist()) == set(range(16))
    assert float(dequantize(quantize(torch.zeros(1, 16), fmt), fmt).abs().max()) == 0.0


def test_asymmetric_range_includes_zero_and_hits_both_ends():
    weight = torch.tensor([[0.5, 1.0, 2.0, 3.0]])
    fmt = QuantFormat(bits=2, group_size=-1)
    q = quantize(weight, fmt)
    assert int(q.zeros[0, 0]) == 0  # min clamped to 0 -> zero point 0
    assert torch.allclose(dequantize(q, fmt), torch.tensor([[0.0, 1.0, 2.0, 3.0]]), atol=1e-3)


def test_ragged_last_group_gets_its_own_scale():
    # SmolLM2's 576 inputs with group 128: four full groups and one of 64.
    weight = torch.ones(2, 576) * 0.01
    weight[:, 512:] = 5.0
    fmt = QuantFormat(bits=4, group_size=128)
    q = quantize(weight, fmt)
    assert q.scales.shape == (2, 5)
    assert float(q.scales[0, 0]) < 1e-3 < float(q.scales[0, 4])
    assert torch.allclose(dequantize(q, fmt), weight, rtol=1e-2)


@pytest.mark.parametrize(("in_features", "requested", "expected"), [
    (576, 128, 64),     # SmolLM2's hidden size: 96 divides too, but vLLM's Marlin takes 32/64/128 only
    (1536, 128, 128),   # divides already (the pipeline does not ask then); the request is kept
    (96, 64, 32),       # the tiny test models' down_proj
    (600, 128, 120),    # 8 x 75: no Marlin group divides, the largest multiple of 8 that does
    (576, 256, 192),    # a request Marlin does not take: the largest divisor, no preference
    (100, 64, -1),      # no multiple of 8 divides: one scale per channel
    (40, 128, 40),      # inputs below the request: the whole row is one group
])
def test_dividing_group_is_the_largest_divisor_a_kernel_takes(in_features, requested, expected):
    assert dividing_group(in_features, requested) == expected
    if expected != -1:
        assert in_features % expected == 0 and expected <= requested


@given(st.integers(8, 20000), st.sampled_from([32, 64, 128, 96, 256]))
@settings(max_examples=300, deadline=None)
def test_dividing_group_always_divides_and_is_the_largest_of_its_kind(in_features, requested):
    group = dividing_group(in_features, requested)
    divisors = [g for g in range(8, min(requested, in_features) + 1, 8) if in_features % g == 0]
    if not divisors:
        assert group == -1
        return
    marlin = [g for g in divisors if g in (32, 64, 128)]
    assert group == (max(marlin) if requested in (32, 64, 128) and marlin else max(divisors))


def test_all_zero_groups_stay_zero():
    for fmt in (QuantFormat(), QuantFormat(symmetric=True), QuantFormat(kind="nvfp4"), QuantFormat(kind="mxfp4")):
        assert torch.equal(dequantize(quantize(torch.zeros(3, 64), fmt), fmt), torch.zeros(3, 64))


def test_e2m1_table_is_exact_and_ties_round_to_even():
    values = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES[1:]))
    assert torch.equal(e2m1_decode(e2m1_encode(values)), values)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1_decode(e2m1_encode(ties)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert e2m1_decode(e2m1_encode(torch.tensor([7.0, -100.0]))).tolist() == [6.0, -6.0]
    assert int(e2m1_encode(torch.tensor([-0.1]))) == 0  # negative values that round to zero carry no sign


def test_nvfp4_follows_the_global_and_block_scale_rule():
    weight = _weight((4, 64), 1)
    q = quantize(weight, QuantFormat(kind="nvfp4"))
    amax = weight.abs().max()
    assert torch.allclose(q.global_scale, 448 * 6 / amax)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (4, 4)
    block_amax = weight.reshape(4, 4, 16).abs().amax(-1)
    expected = (block_amax / 6 * q.global_scale).to(torch.float8_e4m3fn)
    assert torch.equal(q.scales.float(), expected.float())
    relative = (dequantize(q, QuantFormat(kind="nvfp4")) - weight).norm() / weight.norm()
    assert relative < 0.15


def test_mxfp4_scales_are_powers_of_two_from_the_shared_exponent():
    weight = _weight((3, 96), 2)
    fmt = QuantFormat(kind="mxfp4")
    q = quantize(weight, fmt)
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (3, 3)
    block_amax = weight.reshape(3, 3, 32).abs().amax(-1)
    assert torch.equal(multipliers(q.scales, fmt), torch.exp2(torch.floor(torch.log2(block_amax)) - 2))
    assert (dequantize(q, fmt) - weight).norm() / weight.norm() < 0.2


def test_rtn_is_quantize_in_float32():
    weight = _weight((5, 40), 3).half()
    fmt = QuantFormat(bits=3, group_size=8)
    assert torch.equal(rtn(weight, fmt).codes, quantize(weight.float(), fmt).codes)


def test_non_matrix_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(4), QuantFormat())
