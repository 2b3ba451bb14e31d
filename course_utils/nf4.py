"""QLoRA from scratch: the NF4 code book, blockwise 4-bit quantization, double quantization and a 4-bit LoRA layer.

Built in notebooks/03_qlora_nf4.ipynb, where every piece is proved equal to bitsandbytes and PEFT.
"""

# Exported from notebooks/03_qlora_nf4.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/03_qlora_nf4.ipynb · 1.1 The NF4 code book
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from course_utils.errors import CourseError, check_positive

# outermost normal probability of the NF4 code: the centre of the outermost of n equal-probability bins
# is 1 - 1/(2n); NF4 (8 values on one side, 7 on the other) takes the mean of n = 15 and n = 16
NF4_OFFSET_EXACT = ((1 - 1 / 30) + (1 - 1 / 32)) / 2
NF4_OFFSET = round(NF4_OFFSET_EXACT, 7)  # bitsandbytes built its table with the offset to 7 decimals
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ABSMAX_BLOCKSIZE = 256  # double quantization: absmax constants per 8-bit block


def normal_quantile(p: torch.Tensor) -> torch.Tensor:
    """Phi^-1(p), the standard normal quantile function: sqrt(2) * erfinv(2p - 1)."""
    return math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)


def build_nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values: 8 positive and 7 negative normal quantiles, an exact zero, scaled to [-1, 1].

    Probabilities in float32 and quantiles in float64, as bitsandbytes computed its table."""
    positive = normal_quantile(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    negative = -normal_quantile(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    code = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return code / code.max()


NF4_CODE = build_nf4_code()


# %% notebooks/03_qlora_nf4.ipynb · 1.2 Block-wise absmax quantization
def to_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [ceil(n / blocksize), blocksize], the last block padded with zeros."""
    pad = -flat.numel() % blocksize
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` for each entry (uint8)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def quantize_blockwise(flat: torch.Tensor, code: torch.Tensor, blocksize: int):
    """(codes [n] uint8, absmax [blocks] fp32): each block scaled by its absmax, rounded to the nearest code value."""
    blocks = to_blocks(flat.float(), blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    return nearest_code(scaled, code).view(-1)[: flat.numel()], absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """code[c_i] * absmax of its block, as a flat fp32 tensor of len(codes)."""
    values = to_blocks(code[codes.long()], blocksize) * absmax.unsqueeze(1)
    return values.view(-1)[: codes.numel()]


# %% notebooks/03_qlora_nf4.ipynb · 1.3 Two codes per byte
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16 -> bytes holding two codes each, high nibble first (an odd count gets a 0 pad)."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n codes stored in `packed` (inverse of pack_nibbles)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]


# %% notebooks/03_qlora_nf4.ipynb · 1.4 Double quantization
def build_dynamic_code(exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map: per exponent 10^-6..10^0, fraction means in [0.1, 1], both signs."""
    values = []
    for i in range(exponent_bits):
        fractions = 2 ** (i + total_bits - 1 - exponent_bits) + 1
        edges = torch.linspace(0.1, 1, fractions, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2
        scale = 10 ** (-(exponent_bits - 1) + i)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = build_dynamic_code()


def quantize_absmax(absmax: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE):
    """Double quantization: (8-bit codes, mean mu, fp32 scale per block of `blocksize` constants)."""
    offset = absmax.mean()
    codes, scale = quantize_blockwise(absmax - offset, DYNAMIC_CODE.to(absmax.device), blocksize)
    return codes, offset, scale


def dequantize_absmax(codes, offset, scale, code, blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    """m_b ~ s * d[e_b] + mu."""
    return dequantize_blockwise(codes, scale, code, blocksize) + offset


# %% notebooks/03_qlora_nf4.ipynb · 1.5 `quantize_nf4` and `dequantize_nf4`
@dataclass
class QuantState:
    """What dequantization needs: shape, dtype, block size, code book and the absmax constants."""

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor                         # the 16 values, sorted
    absmax: torch.Tensor                       # fp32 per block; uint8 codes with double quantization
    offset: torch.Tensor | None = None         # double quantization: mean of the absmax constants
    absmax_scale: torch.Tensor | None = None   # double quantization: fp32 per 256 constants
    absmax_code: torch.Tensor | None = None    # double quantization: the 8-bit dynamic map

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per block (after double quantization, its 8-bit approximation)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(self.absmax, self.offset, self.absmax_scale, self.absmax_code)


def quantize_4bit_core(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """The idea, without argument checks: absmax per block, nearest code, two codes per byte, 8-bit absmax."""
    code = code.to(device=w.device, dtype=torch.float32)
    codes, absmax = quantize_blockwise(w.reshape(-1), code, blocksize)
    if codes.numel() % 2:  # fill the last byte with the code of 0, as bitsandbytes does
        codes = torch.cat([codes, nearest_code(torch.zeros(1, device=w.device), code)])
    state = QuantState(shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code, absmax=absmax)
    if double_quant:
        state.absmax, state.offset, state.absmax_scale = quantize_absmax(absmax)
        state.absmax_code = DYNAMIC_CODE.to(w.device)
    return pack_nibbles(codes), state


def dequantize_core(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """One table lookup per byte, row b of `pairs` = (code[b >> 4], code[b & 15]), times the block's absmax."""
    n = math.prod(state.shape)
    pairs = torch.stack([state.code.repeat_interleave(16), state.code.repeat(16)], dim=1)
    values = to_blocks(pairs[packed.reshape(-1).long()].view(-1)[:n], state.blocksize) * state.block_absmax().unsqueeze(1)
    return values.view(-1)[:n].view(state.shape).to(state.dtype)


# %% notebooks/03_qlora_nf4.ipynb · 1.5 `quantize_nf4` and `dequantize_nf4`
def check_weight(w) -> None:
    """A CourseError unless w is a non-empty float32/float16/bfloat16 tensor."""
    if not isinstance(w, torch.Tensor):
        raise CourseError(f"quantize_nf4 takes a torch.Tensor, not {type(w).__name__}.")
    if w.dtype not in SUPPORTED_DTYPES:
        raise CourseError(f"quantize_nf4 takes float32, float16 or bfloat16 weights, not {w.dtype}: "
                          "convert first, e.g. w.float().")
    if w.numel() == 0:
        raise CourseError("quantize_nf4 got an empty tensor: there is nothing to quantize.")


def check_blocksize(blocksize) -> None:
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise CourseError(f"blocksize={blocksize!r} is not supported; use one of {SUPPORTED_BLOCKSIZES} "
                          "(the block sizes bitsandbytes accepts; the paper uses 64).")


def quantize_4bit(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *,
                  partial_block: bool = False):
    """(packed uint8 [ceil(n/2)], QuantState): block-wise absmax quantization onto a sorted 16-value code.

    A size that is not a multiple of blocksize is an error unless partial_block=True, which quantizes
    the remainder as one shorter block, as bitsandbytes does."""
    check_weight(w)
    check_blocksize(blocksize)
    if w.numel() % blocksize and not partial_block:
        raise CourseError(f"The weight has {w.numel()} values, not a multiple of blocksize={blocksize}: its last "
                          f"block would hold only {w.numel() % blocksize}. Pass partial_block=True to quantize it "
                          "as a shorter block (what bitsandbytes does), or choose a blocksize that divides the size.")
    if code.numel() != 16 or not bool((code[1:] >= code[:-1]).all()):
        raise CourseError("A 4-bit code book needs 16 values sorted in increasing order.")
    return quantize_4bit_core(w, code, blocksize, double_quant)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *, partial_block: bool = False):
    """NF4 quantization as in QLoRA: (packed, state). A size that is not a multiple of blocksize
    needs partial_block=True (the last block is then shorter, as in bitsandbytes)."""
    return quantize_4bit(w, NF4_CODE, blocksize, double_quant, partial_block=partial_block)


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The weight back from its 4-bit codes: code[c_i] * absmax of its block, in state.shape and state.dtype."""
    n = math.prod(state.shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise CourseError(f"packed must be the uint8 tensor of {(n + 1) // 2} bytes that quantize_nf4 returned "
                          f"with this state, got {packed.dtype} with {packed.numel()} elements.")
    return dequantize_core(packed, state)


# %% notebooks/03_qlora_nf4.ipynb · 1.5 `quantize_nf4` and `dequantize_nf4`
def storage_bits(packed: torch.Tensor, state: QuantState, *, constants: bool = False) -> float:
    """Bits per parameter actually stored: packed codes plus absmax constants (plus, with
    constants=True, the code books and the mean, which one model can share across tensors)."""
    tensors = [packed, state.absmax]
    if state.double_quant:
        tensors.append(state.absmax_scale)
        if constants:
            tensors += [state.offset, state.absmax_code]
    if constants:
        tensors.append(state.code)
    total = sum(t.numel() * t.element_size() for t in tensors)
    return 8 * total / math.prod(state.shape)


# %% notebooks/03_qlora_nf4.ipynb · 1.6 A QLoRA linear layer
class QLoRALinear(torch.nn.Module):
    """A frozen NF4 linear layer plus a trainable LoRA update (QLoRA)."""

    def __init__(self, linear: torch.nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        check_positive("LoRA rank r", r)
        packed, state = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        self.shape, self.dtype, self.blocksize = state.shape, state.dtype, state.blocksize
        self.register_buffer("packed", packed)
        for name in ("code", "absmax", "offset", "absmax_scale", "absmax_code"):
            self.register_buffer(name, getattr(state, name))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.lora_A = torch.nn.Linear(linear.in_features, r, bias=False, device=packed.device)
        self.lora_B = torch.nn.Linear(r, linear.out_features, bias=False, device=packed.device)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default
        torch.nn.init.zeros_(self.lora_B.weight)
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.scaling = alpha / r

    @property
    def quant_state(self) -> QuantState:
        return QuantState(self.shape, self.dtype, self.blocksize, self.code, self.absmax,
                          self.offset, self.absmax_scale, self.absmax_code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_nf4(self.packed, self.quant_state).to(x.dtype)
        return F.linear(x, weight, self.bias) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def add_qlora(model: torch.nn.Module, targets=("q_proj", "v_proj"), **kwargs) -> torch.nn.Module:
    """Replace every nn.Linear whose name ends with a target by a QLoRALinear (in place); freeze the rest."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise CourseError(f"No nn.Linear named {targets} in this model: pick targets among its linear layers.")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QLoRALinear(module, **kwargs))
    return model
