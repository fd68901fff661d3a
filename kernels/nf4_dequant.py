"""NF4 dequantization in Triton: packed 4-bit codes (+ double-quantized absmax) to a float tensor.

Reference: ``bailong.nf4.NF4Tensor.dequantize`` (the same signature through ``nf4_dequantize``).
A byte holds two neighbouring weights (the first in the high nibble), so every
kernel looks a byte up once in a 256-entry table of code pairs instead of
looking each nibble up in the 16-entry code table:

    for each packed byte b (one program: BLOCK bytes):
        (w[2b], w[2b+1]) = pairs[packed[b]] * scale(block of 2b)      # both weights share a block
        scale(blk) = absmax[blk]                                                      (plain)
                   = nested_map[absmax_code[blk]] * nested_absmax[blk // 256] + offset  (double-quantized)
"""
import torch
import triton
import triton.language as tl

from bailong.nf4 import NESTED_BLOCKSIZE, NF4Tensor, code_pairs


@triton.jit
def _block_scale(block, mask, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                 DOUBLE_QUANT: tl.constexpr):
    """Float32 absmax of the blocks ``block`` (any shape), expanding the 8-bit codes if double-quantized."""
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_map_ptr + absmax_code) * tl.load(nested_absmax_ptr + block // 256, mask=mask,
                                                                other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _nf4_values(flat, mask, w_ptr, pairs_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Float32 weights at flat indices ``flat`` (any shape); 0 where ``mask`` is false. For rows that
    are not whole blocks: every element found from its own index."""
    byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    value = tl.load(pairs_ptr + 2 * byte + (flat & 1))  # even index: high nibble, the pair's first
    scale = _block_scale(flat // BLOCKSIZE, mask, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                         DOUBLE_QUANT)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _nf4_dequant_kernel(w_ptr, pairs_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, out_ptr, n,
                        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # packed byte indices
    byte_ok = b < (n + 1) // 2
    byte = tl.load(w_ptr + b, mask=byte_ok, other=0).to(tl.int32)
    pair = tl.load(pairs_ptr + 2 * byte[:, None] + tl.arange(0, 2)[None, :])  # (BLOCK, 2)
    scale = _block_scale(2 * b // BLOCKSIZE, byte_ok, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                         DOUBLE_QUANT)
    w = tl.reshape(pair * scale[:, None], (2 * BLOCK,))
    flat = tl.program_id(0).to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=flat < n)


_pairs = {}  # quant_map's address -> (quant_map, its pair table); holding quant_map keeps the address its own


def byte_pairs(quant_map: torch.Tensor) -> torch.Tensor:
    """``code_pairs(quant_map)``, computed once per code table."""
    hit = _pairs.get(quant_map.data_ptr())
    if hit is None or hit[0] is not quant_map:
        hit = _pairs[quant_map.data_ptr()] = (quant_map, code_pairs(quant_map))
    return hit[1]


def nf4_args(q: NF4Tensor):
    """The tensors every NF4 kernel takes, in kernel-argument order (all on the device: no host
    synchronisation, so the kernels can be captured in a CUDA graph)."""
    if q.double_quant:
        assert q.nested_quant_map.numel() == 256 and NESTED_BLOCKSIZE == 256
        return (q.data, byte_pairs(q.quant_map), q.absmax, q.nested_quant_map, q.nested_absmax, q.offset)
    return (q.data, byte_pairs(q.quant_map), q.absmax, q.absmax, q.absmax, q.absmax)  # unused: anything valid


def nf4_dequantize(q: NF4Tensor, dtype=None) -> torch.Tensor:
    """``q.dequantize(dtype)`` computed by the kernel."""
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.data.device)
    n, block = q.numel, 512
    # no fused multiply-add: the nested scale is rounded twice, as in the reference
    _nf4_dequant_kernel[(triton.cdiv(n, 2 * block),)](*nf4_args(q), out, n, BLOCKSIZE=q.blocksize,
                                                      DOUBLE_QUANT=q.double_quant, BLOCK=block,
                                                      enable_fp_fusion=False)
    return out
