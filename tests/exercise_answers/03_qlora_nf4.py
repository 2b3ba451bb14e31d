"""Plausible wrong answers for notebook 03's exercises: each check cell must fail on them."""
import torch


def my_unpack(packed, n):
    # low nibble first: the order reversed within each byte
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(-1)[:n]


def bits_per_parameter(blocksize, absmax_bits=32, dq_blocksize=None):
    # forgets the second-level fp32 scales of double quantization
    return 4 + absmax_bits / blocksize


def worst_case_error(code, absmax):
    # half the widest gap between neighbouring values: misses a code book that does not reach +-1
    return ((code[1:] - code[:-1]).max() / 2).item() * absmax
