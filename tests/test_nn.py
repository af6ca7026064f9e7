import torch

from llmcompress.config import QuantFormat
from llmcompress.formats import dequantize, quantize
from llmcompress.nn import CompressedLinear


def _layer(fmt=QuantFormat(bits=4, group_size=32), bias=True):
    weight = torch.randn(48, 96)
    return CompressedLinear.from_quantized(quantize(weight, fmt), fmt, torch.randn(48) if bias else None), fmt, weight


def test_forward_is_linear_with_the_dequantized_weight():
    for fmt in (QuantFormat(bits=4, group_size=32), QuantFormat(kind="nvfp4"), QuantFormat(kind="mxfp4"), QuantFormat(bits=3, group_size=-1)):
        layer, fmt, weight = _layer(fmt)
        x = torch.randn(5, 7, 96)
        expected = torch.nn.functional.linear(x, dequantize(quantize(weight, fmt), fmt), layer.bias)
        assert torch.allclose(layer(x), expected, atol=1e-5)
        assert layer(x).shape == (5, 7, 48)


def test_dtype_casts_leave_packed_tensors_untouched():
    layer, _, _ = _layer(QuantFormat(kind="nvfp4"))
    before = {name: tensor.clone() for name, tensor in layer.packed().items()}
    layer = layer.to(torch.bfloat16)
    layer.half()
    for name, tensor in layer.packed().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor.view(torch.uint8), before[name].view(torch.uint8))
    assert layer.bias.dtype == torch.float16
    assert layer(torch.randn(2, 96, dtype=torch.float16)).dtype == torch.float16


def test_state_dict_holds_exactly_the_packed_tensors():
    layer, _, _ = _layer(QuantFormat(bits=4, group_size=32, symmetric=False), bias=False)
    assert set(layer.state_dict()) == {"weight_packed", "weight_scale", "weight_zero_point"}
    assert "INT4 g32 asym" in repr(layer)


def test_dequantized_cache_gives_identical_outputs_and_is_released():
    from llmcompress.nn import dequantized_weights

    layer, _, _ = _layer(QuantFormat(bits=3, group_size=32))
    model = torch.nn.Sequential(layer)
    x = torch.randn(4, 96)
    expected = layer(x)
    with dequantized_weights(model, torch.float32):
        assert layer._dequantized is not None
        assert torch.equal(layer(x), expected)
        assert layer(x.double()).dtype == torch.float64  # another dtype falls back to the reference path
    assert layer._dequantized is None
