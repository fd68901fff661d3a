"""NF4 dequantization in Triton: packed 4-bit codes (+ double-quantized absmax) to a float tensor.

Reference: ``bailong.nf4.NF4Tensor.dequantize`` (the same signature through ``nf4_dequantize``).
A byte holds two neighbouring weights (the first in the high nibble); each
nibble is looked up in the 16-entry code table:

    for each packed byte b (one program: BLOCK bytes):
        (w[2b], w[2b+1]) = code[(packed[b] >> 4, packed[b] & 15)] * scale(block of 2b)   # one block for both
        scale(blk) = absmax[blk]                                                      (plain)
                   = nested_map[absmax_code[blk]] * nested_absmax[blk // 256] + offset  (double-quantized)

Why 16 entries and not a 256-entry table of code pairs (one lookup per byte
instead of two): a lookup is a gather from global memory served by the L1
cache, which handles one cache line (128 bytes) per cycle for a warp. The
16 float32 codes are 64 bytes, one line: a warp's 32 lookups take one pass. A
pair table is 2 KiB, 16 lines: a warp's 32 random bytes touch about 13 of
them, so 13 passes for 64 values instead of 2 passes.
"""
import contextlib

import torch
import triton
import triton.language as tl

from bailong.nf4 import NESTED_BLOCKSIZE, NF4Tensor


@triton.jit
def _block_scale(block, mask, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                 DOUBLE_QUANT: tl.constexpr):
    """Float32 absmax of the blocks ``block`` (any shape), expanding the 8-bit codes if double-quantized; masked
    blocks read as 0 (``mask`` None: every block is read)."""
    if DOUBLE_QUANT:
        if mask is None:
            absmax_code = tl.load(absmax_ptr + block).to(tl.int32)
            nested_absmax = tl.load(nested_absmax_ptr + block // 256)
        else:
            absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            nested_absmax = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        scale = tl.load(nested_map_ptr + absmax_code) * nested_absmax + tl.load(offset_ptr)
    elif mask is None:
        scale = tl.load(absmax_ptr + block)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def nibbles(byte):
    """The two codes of each packed byte, high nibble first: shape (..., 2) for bytes of shape (..., 1)."""
    return (byte >> (4 - 4 * tl.arange(0, 2))) & 0xF


@triton.jit
def _nf4_dequant_kernel(w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, out_ptr, n,
                        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # packed byte indices
    byte_ok = b < (n + 1) // 2
    byte = tl.load(w_ptr + b, mask=byte_ok, other=0).to(tl.int32)
    pair = tl.load(code_ptr + nibbles(byte[:, None]))  # (BLOCK, 2)
    scale = _block_scale(2 * b // BLOCKSIZE, byte_ok, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                         DOUBLE_QUANT)
    w = tl.reshape(pair * scale[:, None], (2 * BLOCK,))
    flat = tl.program_id(0).to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=flat < n)


def nf4_args(q: NF4Tensor):
    """The tensors every NF4 kernel takes, in kernel-argument order (all on the device: no host
    synchronisation, so the kernels can be captured in a CUDA graph)."""
    if q.double_quant:
        assert q.nested_quant_map.numel() == 256 and NESTED_BLOCKSIZE == 256
        return (q.data, q.quant_map, q.absmax, q.nested_quant_map, q.nested_absmax, q.offset)
    return (q.data, q.quant_map, q.absmax, q.absmax, q.absmax, q.absmax)  # unused: anything valid


def launch_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: a context that makes it ``t``'s."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def nf4_dequantize(q: NF4Tensor, dtype=None) -> torch.Tensor:
    """``q.dequantize(dtype)`` computed by the kernel."""
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.data.device)
    n, block = q.numel, 512
    with launch_device(out):
        # no fused multiply-add: the nested scale is rounded twice, as in the reference
        _nf4_dequant_kernel[(triton.cdiv(n, 2 * block),)](*nf4_args(q), out, n, BLOCKSIZE=q.blocksize,
                                                          DOUBLE_QUANT=q.double_quant, BLOCK=block,
                                                          enable_fp_fusion=False)
    return out
