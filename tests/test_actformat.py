import dataclasses

import pytest
import torch

from llmcompress.actformat import (
    ActFormat,
    dequantize_activations,
    fake_quantize_activations,
    quantize_activations,
    static_scale,
)
from llmcompress.config import QuantFormat, _from_dict
from llmcompress.errors import ConfigError
from llmcompress.formats import fake_quantize

E4M3, E5M2 = "fp8_e4m3", "fp8_e5m2"
# Formats whose quantize(dequantize(.)) is the identity on codes and scales (grouped INT without
# pow2 scales keeps the weight formats' half-step grid instead; see the module docstring).
FIXED_POINT_FORMATS = [
    ActFormat(bits=8), ActFormat(bits=4), ActFormat(bits=8, pow2_scales=True), ActFormat(bits=4, pow2_scales=True),
    ActFormat(bits=4, group_size=64, pow2_scales=True), ActFormat(bits=8, group_size=128, pow2_scales=True),
    ActFormat(kind=E4M3), ActFormat(kind=E5M2), ActFormat(kind=E4M3, group_size=128), ActFormat(kind=E4M3, pow2_scales=True),
    ActFormat(kind=E5M2, pow2_scales=True), ActFormat(kind=E4M3, group_size=64, pow2_scales=True),
]
STATIC_FORMATS = [ActFormat(bits=8, static=True), ActFormat(bits=8, static=True, pow2_scales=True),
                  ActFormat(kind=E4M3, static=True), ActFormat(kind=E5M2, static=True), ActFormat(kind=E4M3, static=True, pow2_scales=True)]
GROUPED_INT = [ActFormat(bits=4, group_size=64), ActFormat(bits=8, group_size=64)]
FP4_FORMATS = [ActFormat(kind="nvfp4", bits=4, group_size=16), ActFormat(kind="mxfp4", bits=4, group_size=32)]
ALL_FORMATS = FIXED_POINT_FORMATS + STATIC_FORMATS + GROUPED_INT + FP4_FORMATS


def _activations(shape=(2048, 256), seed=0, dtype=torch.float32):
    """Rows spanning many binades, with a few large outlier features as in real LLM activations."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.exp2(torch.randn(*shape[:-1], 1, generator=generator) * 6)
    x[..., 7] *= 30
    return x.to(dtype)


def _scale_for(fmt, x):
    return static_scale(x.abs().amax(), fmt) if fmt.static else None


@pytest.mark.parametrize(("fields", "field"), [
    ({"kind": "fp16"}, "kind"),
    ({"bits": 6}, "bits"),
    ({"bits": True}, "bits"),
    ({"kind": E4M3, "bits": 4}, "bits"),
    ({"kind": "nvfp4", "bits": 8, "group_size": 16}, "bits"),
    ({"group_size": 12}, "group_size"),
    ({"group_size": 0}, "group_size"),
    ({"group_size": -2}, "group_size"),
    ({"group_size": 64.0}, "group_size"),
    ({"kind": "nvfp4", "bits": 4}, "group_size"),
    ({"kind": "mxfp4", "bits": 4, "group_size": 16}, "group_size"),
    ({"symmetric": False}, "symmetric"),
    ({"static": 1}, "static"),
    ({"pow2_scales": "yes"}, "pow2_scales"),
    ({"static": True, "group_size": 64}, "static"),
    ({"kind": E4M3, "static": True, "group_size": 128}, "static"),
    ({"kind": "nvfp4", "bits": 4, "group_size": 16, "static": True}, "static"),
    ({"kind": "nvfp4", "bits": 4, "group_size": 16, "pow2_scales": True}, "pow2_scales"),
    ({"kind": "mxfp4", "bits": 4, "group_size": 32, "pow2_scales": True}, "pow2_scales"),
])
def test_bad_combinations_name_the_field(fields, field):
    with pytest.raises(ConfigError, match=rf"ActFormat\.{field}="):
        ActFormat(**fields)


def test_asymmetric_is_refused_as_unsupported():
    with pytest.raises(ConfigError, match="asymmetric activations are not supported"):
        ActFormat.from_quant_format(QuantFormat(bits=4, group_size=64, symmetric=False))


@pytest.mark.parametrize(("fmt", "label", "qmax"), [
    (ActFormat(), "INT8 per-token", 127), (ActFormat(bits=4, group_size=64), "INT4 g64", 7),
    (ActFormat(kind=E4M3), "FP8-E4M3 per-token", 448), (ActFormat(kind=E4M3, static=True), "FP8-E4M3 static per-tensor", 448),
    (ActFormat(kind=E5M2, pow2_scales=True), "FP8-E5M2 per-token + pow2 scales", 57344), (FP4_FORMATS[0], "NVFP4", 6),
])
def test_describe_and_qmax(fmt, label, qmax):
    assert fmt.describe() == label and fmt.qmax == qmax


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.describe())
def test_asdict_round_trips_through_from_dict(fmt):
    assert _from_dict(ActFormat, dataclasses.asdict(fmt)) == fmt


@pytest.mark.parametrize("fmt", FIXED_POINT_FORMATS + STATIC_FORMATS, ids=lambda f: f.describe())
def test_quantize_dequantize_quantize_is_bit_exact(fmt):
    x = _activations()
    scale = _scale_for(fmt, x[:64])  # calibrated on part of the data, so the rest also clamps
    codes, scales = quantize_activations(x, fmt, scale)
    again_codes, again_scales = quantize_activations(dequantize_activations(codes, scales, fmt), fmt, scale)
    assert again_codes.dtype == codes.dtype and again_scales.dtype == torch.float32
    assert torch.equal(again_codes.view(torch.int8), codes.view(torch.int8))
    assert torch.equal(again_scales, scales)


@pytest.mark.parametrize("fmt", GROUPED_INT, ids=lambda f: f.describe())
def test_grouped_int_codes_are_signed_and_dequantize_to_the_fake_quantized_values(fmt):
    x = _activations()
    codes, scales = quantize_activations(x, fmt)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -fmt.qmax - 1 and int(codes.max()) <= fmt.qmax
    assert torch.equal(dequantize_activations(codes, scales, fmt), fake_quantize_activations(x, fmt))


@pytest.mark.parametrize("fmt", [f for f in FIXED_POINT_FORMATS + STATIC_FORMATS if f.kind != "int"], ids=lambda f: f.describe())
def test_every_fp8_code_is_a_finite_value_of_its_format(fmt):
    x = _activations()
    x[0, :4] = torch.tensor([1e30, -1e30, 3e38, -3e38])
    # Half a step above the largest value, where a power-of-two scale saturates the top code (E5M2 casts it to inf).
    x[1] = torch.linspace(-1, 1, x.shape[1])
    x[1, 0] = {E4M3: 464.0, E5M2: 61440.0}[fmt.kind]
    codes, _ = quantize_activations(x, fmt, _scale_for(fmt, x[1:]))
    dtype = torch.float8_e4m3fn if fmt.kind == E4M3 else torch.float8_e5m2
    assert codes.dtype == dtype
    assert codes.float().isfinite().all() and codes.float().abs().max() <= fmt.qmax


@pytest.mark.parametrize("fmt", [f for f in FIXED_POINT_FORMATS + STATIC_FORMATS if f.pow2_scales], ids=lambda f: f.describe())
def test_pow2_scales_are_exact_powers_of_two(fmt):
    x = _activations()
    _, scales = quantize_activations(x, fmt, _scale_for(fmt, x))
    mantissa, _ = torch.frexp(scales)
    assert (mantissa == 0.5).all()


@pytest.mark.parametrize("fmt", STATIC_FORMATS, ids=lambda f: f.describe())
def test_static_scale_clamps_an_outlier_token(fmt):
    x = _activations((64, 128))
    scale = static_scale(x.abs().amax(), fmt)
    outlier = x.clone()
    outlier[3] = torch.linspace(-1, 1, 128) * 100 * x.abs().amax()
    out = fake_quantize_activations(outlier, fmt, scale)
    lowest = -(fmt.qmax + 1) if fmt.kind == "int" else -fmt.qmax  # INT codes reach -qmax - 1
    assert out[3].max() == fmt.qmax * scale and out[3].min() == lowest * scale
    assert torch.equal(out[:3], fake_quantize_activations(x[:3], fmt, scale))


def test_static_scale_is_amax_over_qmax_and_harmless_for_zero():
    assert static_scale(torch.tensor(254.0), ActFormat(static=True)).tolist() == [2.0]
    assert static_scale(torch.tensor([896.0, 3.0]), ActFormat(kind=E4M3, static=True)).tolist() == [2.0]
    assert static_scale(torch.tensor(100.0), ActFormat(static=True, pow2_scales=True)).tolist() == [1.0]
    for fmt in STATIC_FORMATS:
        zero = static_scale(torch.zeros(1), fmt)
        assert zero.dtype == torch.float32 and zero.shape == (1,) and zero.item() > 0


def test_per_token_int8_error_is_at_most_half_a_step():
    fmt = ActFormat(bits=8)
    x = _activations()
    codes, scales = quantize_activations(x, fmt)
    assert scales.shape == (x.shape[0], 1) and (codes.abs().amax(dim=-1) == 127).all()
    # Half a step, plus x / scale's own float32 rounding at a tie.
    assert ((x - fake_quantize_activations(x, fmt)).abs() <= scales / 2 * (1 + 2**-20)).all()


@pytest.mark.parametrize("legacy", [
    {"kind": "int", "bits": 4, "group_size": 64, "symmetric": True},
    {"kind": "int", "bits": 8, "group_size": 64, "symmetric": True},
    {"kind": "nvfp4", "bits": 4, "group_size": 16, "symmetric": True},
    {"kind": "mxfp4", "bits": 4, "group_size": 32, "symmetric": True},
], ids=lambda d: f"{d['kind']}{d['bits']}")
@pytest.mark.parametrize(("shape", "dtype"), [((257, 192), torch.float32), ((2, 3, 200), torch.bfloat16), ((5, 64), torch.float16)])
def test_old_checkpoint_dicts_compute_what_formats_fake_quantize_does(legacy, shape, dtype):
    x = _activations(shape, seed=3, dtype=dtype)
    x[0] = 0
    weight_fmt = QuantFormat(**legacy)
    assert dataclasses.asdict(weight_fmt) == legacy
    expected = fake_quantize(x, weight_fmt)
    for fmt in (_from_dict(ActFormat, legacy), ActFormat(**legacy), ActFormat.from_quant_format(weight_fmt)):
        assert torch.equal(fake_quantize_activations(x, fmt), expected)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.describe())
def test_zero_rows_and_leading_shapes_keep_dtype_without_nan(fmt):
    x = _activations((2, 3, 128), dtype=torch.bfloat16)
    x[0, 1] = 0
    out = fake_quantize_activations(x, fmt, _scale_for(fmt, x))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.isfinite().all() and (out[0, 1] == 0).all()
    if not fmt.is_fp4:
        codes, scales = quantize_activations(x, fmt, _scale_for(fmt, x))
        assert codes.shape == x.shape and scales.isfinite().all() and (scales > 0).all()
        if not fmt.static:
            assert scales.shape[:-1] == x.shape[:-1]


def test_scale_is_required_exactly_for_static_formats_and_fp4_codes_are_refused():
    x = _activations((4, 64))
    with pytest.raises(ValueError, match="calibrated per-tensor scale"):
        quantize_activations(x, ActFormat(static=True))
    with pytest.raises(ValueError, match="pass no scale"):
        quantize_activations(x, ActFormat(), torch.ones(1))
    with pytest.raises(ValueError, match="formats.quantize"):
        quantize_activations(x, FP4_FORMATS[0])
    with pytest.raises(ValueError, match="dynamic"):
        static_scale(torch.ones(1), ActFormat())
