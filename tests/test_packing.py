import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcompress.config import QuantFormat
from llmcompress.formats import quantize
from llmcompress.packing import pack_int, pack_nibbles, pack_weight, packed_spec, unpack_int, unpack_nibbles, unpack_weight


def test_int4_words_by_hand():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8)
    words = pack_int(codes, 4)
    assert words.dtype == torch.int32
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0x87654321, 0xF000000F]


def test_int2_and_int8_words_by_hand():
    assert [w & 0xFFFFFFFF for w in pack_int(torch.tensor([[3, 0, 1, 2] + [0] * 12], dtype=torch.uint8), 2)[0].tolist()] == [0b10010011]
    assert [w & 0xFFFFFFFF for w in pack_int(torch.tensor([[0x11, 0x22, 0x33, 0xFF, 0x01]], dtype=torch.uint8), 8)[0].tolist()] == [0xFF332211, 0x01]


def test_int3_codes_straddle_words():
    # Eleven 3-bit codes = 33 bits: code 10 puts two bits in word 0 and one in word 1.
    codes = torch.zeros(1, 11, dtype=torch.uint8)
    codes[0, 10] = 0b101
    assert [w & 0xFFFFFFFF for w in pack_int(codes, 3)[0].tolist()] == [0b01 << 30, 0b1]
    codes = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert pack_int(codes, 3)[0].tolist() == [1 | 2 << 3 | 3 << 6]


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 5), count=st.integers(1, 200), seed=st.integers(0, 1000))
def test_int_round_trip_is_exact(bits, rows, count, seed):
    codes = torch.randint(0, 2**bits, (rows, count), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    words = pack_int(codes, bits)
    assert words.shape == (rows, -(-count * bits // 32))
    assert torch.equal(unpack_int(words, bits, count), codes)


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 99), seed=st.integers(0, 1000))
def test_nibble_round_trip_and_low_nibble_first(count, seed):
    codes = torch.randint(0, 16, (3, count), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack_nibbles(codes)
    assert packed.shape == (3, -(-count // 2)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed, count), codes)
    assert int(pack_nibbles(torch.tensor([[0x3, 0xA]], dtype=torch.uint8))[0, 0]) == 0xA3


def test_word_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int(torch.zeros(1, 2, dtype=torch.int32), 4, 17)


@pytest.mark.parametrize("fmt", [QuantFormat(bits=4), QuantFormat(bits=3, group_size=64), QuantFormat(bits=8, symmetric=True),
                                 QuantFormat(bits=2, group_size=-1), QuantFormat(kind="nvfp4"), QuantFormat(kind="mxfp4")])
def test_layer_tensors_match_their_spec_and_round_trip(fmt):
    weight = torch.randn(7, 576)
    q = quantize(weight, fmt)
    tensors = pack_weight(q, fmt)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == packed_spec(fmt, 7, 576)
    back = unpack_weight(tensors, fmt, 576)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales.view(torch.uint8), q.scales.view(torch.uint8))
    assert (back.zeros is None) == (q.zeros is None)
    if q.zeros is not None:
        assert torch.equal(back.zeros, q.zeros)
