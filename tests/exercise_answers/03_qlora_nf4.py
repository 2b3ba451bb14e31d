"""Plausible wrong answers for notebook 03's exercises: each check cell must fail on them."""
import torch


def decode_bnb(packed, state):
    # forgets the mean that double quantization subtracted from the absmax constants
    def per_block(values, scales, blocksize):
        padded = torch.nn.functional.pad(values, (0, -values.numel() % blocksize)).view(-1, blocksize)
        return (padded * scales[:, None]).view(-1)[: values.numel()]

    absmax = state.absmax
    if state.nested:
        absmax = per_block(state.state2.code[absmax.long()], state.state2.absmax, state.state2.blocksize)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=1).view(-1)
    n = state.shape.numel()
    return per_block(state.code[codes[:n].long()], absmax, state.blocksize).view(state.shape).to(state.dtype)


def bits_per_parameter(n, blocksize, absmax_bits=32, dq_blocksize=None):
    # the evenly dividing case of section 2.2: misses the short last block, group and byte
    bits = 4 + absmax_bits / blocksize
    if dq_blocksize is not None:
        bits += 32 / (blocksize * dq_blocksize)
    return bits


def worst_case_error(code, absmax):
    # half the widest gap between neighbouring values: misses a code book that does not reach +-1
    return ((code[1:] - code[:-1]).max() / 2).item() * absmax
