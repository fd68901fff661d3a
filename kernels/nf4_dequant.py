"""NF4 dequantization in Triton: packed 4-bit codes (+ double-quantized absmax) to a float tensor.

Reference: ``bailong.nf4.NF4Tensor.dequantize`` (the same signature through ``nf4_dequantize``).

    for each weight index i (flattened, row-major):
        byte  = packed[i // 2];  code = high nibble if i is even else low nibble
        scale = absmax[i // blocksize]                                   (plain)
              = nested_map[absmax_code[b]] * nested_absmax[b // 256] + offset, b = i // blocksize
        w[i]  = quant_map[code] * scale
"""
import torch
import triton
import triton.language as tl

from bailong.nf4 import NESTED_BLOCKSIZE, NF4Tensor


@triton.jit
def _block_scale(block, mask, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset, DOUBLE_QUANT: tl.constexpr):
    """Float32 absmax of the blocks ``block`` (any shape), expanding the 8-bit codes if double-quantized."""
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_map_ptr + absmax_code) * tl.load(nested_absmax_ptr + block // 256, mask=mask,
                                                                other=0.0)
        return scale + offset
    return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _nf4_values(flat, mask, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset,
                BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Float32 weights at flat indices ``flat`` (any shape); 0 where ``mask`` is false."""
    byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    code = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)  # first element in the high nibble
    value = tl.load(code_ptr + code)  # quant_map[code]: 16 floats, one cache line
    scale = _block_scale(flat // BLOCKSIZE, mask, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset,
                         DOUBLE_QUANT)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _nf4_dequant_kernel(w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset, out_ptr, n,
                        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    w = _nf4_values(flat, mask, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset,
                    BLOCKSIZE, DOUBLE_QUANT)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_args(q: NF4Tensor):
    """The tensors and scalars every NF4 kernel takes, in kernel-argument order."""
    if q.double_quant:
        assert q.nested_quant_map.numel() == 256 and NESTED_BLOCKSIZE == 256
        return (q.data, q.quant_map, q.absmax, q.nested_quant_map, q.nested_absmax, q.offset.item())
    return (q.data, q.quant_map, q.absmax, q.absmax, q.absmax, 0.0)  # unused pointers: anything valid


def nf4_dequantize(q: NF4Tensor, dtype=None) -> torch.Tensor:
    """``q.dequantize(dtype)`` computed by the kernel."""
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.data.device)
    n, block = q.numel, 1024
    # no fused multiply-add: the nested scale is rounded twice, as in the reference
    _nf4_dequant_kernel[(triton.cdiv(n, block),)](*nf4_args(q), out, n, BLOCKSIZE=q.blocksize,
                                                  DOUBLE_QUANT=q.double_quant, BLOCK=block, enable_fp_fusion=False)
    return out
