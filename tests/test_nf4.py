"""course_utils.nf4 (exported from notebooks/03_qlora_nf4.ipynb): NF4, double quantization, QLoRA layer."""

import math

import bitsandbytes.functional as bnbF
import pytest
import torch

from course_utils.errors import CourseError
from course_utils.nf4 import (
    DYNAMIC_CODE,
    NF4_CODE,
    NF4_OFFSET,
    NF4_OFFSET_EXACT,
    build_nf4_code,
    QLoRALinear,
    add_qlora,
    dequantize_nf4,
    pack_nibbles,
    quantize_4bit,
    quantize_nf4,
    storage_bits,
    unpack_nibbles,
)


def weight(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_code_book_equals_bitsandbytes():
    torch.testing.assert_close(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"), atol=1e-6, rtol=0)
    assert NF4_CODE.numel() == 16 and (NF4_CODE == 0).sum() == 1
    assert torch.equal(DYNAMIC_CODE, bnbF.create_dynamic_map())


def test_offset_is_derived_and_matches_bitsandbytes():
    import inspect

    assert NF4_OFFSET_EXACT == pytest.approx(((1 - 1 / 30) + (1 - 1 / 32)) / 2, abs=0)
    assert NF4_OFFSET == inspect.signature(bnbF.create_normal_map).parameters["offset"].default
    # the unrounded offset moves the table by a few float32 units: bitsandbytes' table used the 7-decimal value
    assert not torch.equal(build_nf4_code(NF4_OFFSET_EXACT), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(build_nf4_code(NF4_OFFSET), bnbF.get_4bit_type("nf4", device="cpu"))


def test_pack_unpack_round_trip_and_order():
    codes = torch.tensor([1, 15, 10], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x1F, 0xA0]  # high nibble first, odd count padded
    assert torch.equal(unpack_nibbles(packed, 3), codes)


@pytest.mark.parametrize("shape", [(128, 64), (37, 29), (1000,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_bitsandbytes_without_double_quant(shape, dtype):
    w = weight(*shape, dtype=dtype)
    packed, state = quantize_nf4(w, 64, double_quant=False, partial_block=True)  # 37 x 29, 1000: short last block
    their_packed, their_state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(packed, their_packed.view(-1))
    assert torch.equal(state.absmax, their_state.absmax)
    ours = dequantize_nf4(packed, state)
    assert ours.dtype == dtype and ours.shape == w.shape
    theirs = bnbF.dequantize_4bit(their_packed, their_state).view(w.shape)  # bnb gives 1-D input back as [1, n]
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_double_quant_same_codes_and_absmax_within_the_8bit_error():
    w = weight(512, 256, seed=1)
    packed, state = quantize_nf4(w, 64, double_quant=True)
    their_packed, their_state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, their_packed.view(-1))
    torch.testing.assert_close(state.offset, their_state.offset)
    torch.testing.assert_close(state.absmax_scale, their_state.state2.absmax)
    exact = quantize_nf4(w, 64, double_quant=False)[1].absmax
    scale = state.absmax_scale.repeat_interleave(256)[: exact.numel()]
    g_max = (DYNAMIC_CODE[1:] - DYNAMIC_CODE[:-1]).max()
    assert ((state.block_absmax() - exact).abs() <= g_max / 2 * scale * (1 + 1e-5) + 1e-7).all()  # nearest value
    theirs_absmax = bnbF.dequantize_blockwise(their_state.absmax, their_state.state2) + their_state.offset
    assert ((state.block_absmax() - theirs_absmax).abs() <= g_max * scale * (1 + 1e-5) + 1e-7).all()


def test_round_trip_error_is_small_and_zero_stays_zero():
    w = weight(256, 256, seed=2)
    w[0, :64] = 0
    back = dequantize_nf4(*quantize_nf4(w))
    assert ((back - w).norm() / w.norm()) < 0.12
    assert torch.all(back[0, :64] == 0)


def test_storage_bits():
    w = weight(1024, 1024)
    assert storage_bits(*quantize_nf4(w, 64, double_quant=False)) == 4.5
    assert storage_bits(*quantize_nf4(w, 64, double_quant=True)) == 4 + 8 / 64 + 32 / (64 * 256)
    assert storage_bits(*quantize_nf4(w, 64), constants=True) > storage_bits(*quantize_nf4(w, 64))


def test_size_not_multiple_of_block_is_an_error_unless_asked_for():
    with pytest.raises(CourseError, match="150 values, not a multiple of blocksize=64.*partial_block=True"):
        quantize_nf4(weight(3, 50))


def test_partial_last_block_is_quantized_like_bitsandbytes():
    """With partial_block=True the last block is shorter, as bitsandbytes does it."""
    w = weight(3, 50)  # 150 weights: blocks of 64, 64, 22
    packed, state = quantize_nf4(w, 64, double_quant=False, partial_block=True)
    assert packed.numel() == 75 and state.absmax.numel() == 3
    torch.testing.assert_close(state.absmax[2], w.reshape(-1)[128:].abs().max())
    torch.testing.assert_close(dequantize_nf4(packed, state),
                               bnbF.dequantize_4bit(*bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                                        compress_statistics=False)), atol=0, rtol=0)


@pytest.mark.parametrize("bad", [torch.arange(128), torch.ones(128, dtype=torch.float64), torch.ones(64, dtype=torch.bool)])
def test_wrong_dtype_is_a_course_error(bad):
    with pytest.raises(CourseError, match="float32, float16 or bfloat16"):
        quantize_nf4(bad)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, "64"])
def test_unsupported_blocksize_is_a_course_error(blocksize):
    with pytest.raises(CourseError, match="blocksize"):
        quantize_nf4(weight(128, 64), blocksize=blocksize)


def test_other_bad_inputs():
    with pytest.raises(CourseError, match="empty"):
        quantize_nf4(torch.empty(0))
    with pytest.raises(CourseError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(CourseError, match="16 values sorted"):
        quantize_4bit(weight(64), torch.linspace(1, -1, 16))
    packed, state = quantize_nf4(weight(64, 64))
    with pytest.raises(CourseError, match="packed"):
        dequantize_nf4(packed[:-1], state)


def test_qlora_linear_starts_as_the_quantized_layer_and_trains_only_lora():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = QLoRALinear(linear, r=4, alpha=8)
    x = torch.randn(3, 128)
    expected = x @ dequantize_nf4(*quantize_nf4(linear.weight.detach())).T + linear.bias
    torch.testing.assert_close(layer(x), expected)  # B = 0 at the start
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    layer.lora_B.weight.data.normal_()
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert math.isclose(layer.scaling, 2.0)


def test_add_qlora_replaces_targets_and_errors_clearly():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(64, 64))
    model.add_module("other", torch.nn.Linear(64, 64))
    add_qlora(model, targets=("q_proj",), r=2)
    assert isinstance(model.q_proj, QLoRALinear) and isinstance(model.other, torch.nn.Linear)
    assert not model.other.weight.requires_grad
    with pytest.raises(CourseError, match="No nn.Linear"):
        add_qlora(torch.nn.Sequential(torch.nn.Linear(64, 64)), targets=("v_proj",))
    with pytest.raises(CourseError, match="rank"):
        QLoRALinear(torch.nn.Linear(64, 64), r=0)
