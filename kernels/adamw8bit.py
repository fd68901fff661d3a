"""One AdamW step of a tensor whose moments are kept in 8 bits (``bailong.optim.AdamW8bit``), in one launch.

A program takes a block of 256 values, the moments' quantization block: it reads
the gradient, the parameter and the two moments' codes, expands the codes through
their tables times the block's absmax, does AdamW's float32 update, writes the
parameter, and stores the new moments as the index of each one's nearest code
against the block's new absmax (a positive second moment at least the smallest
positive code). The nearest code is found by a binary search over the 255
midpoints between codes: 8 comparisons, the 1 KB table in the L1 cache. Its
reference: ``bailong.optim.step_8bit``.
"""
import math

import triton
import triton.language as tl

from bailong_kernels.nf4_dequant import FMA, cdiv, launch_device


@triton.jit
def _nearest(x, midpoints_ptr):
    """The index of the code nearest to each x: how many of the 255 sorted midpoints lie below it (a value exactly
    on a midpoint takes the lower code)."""
    index = tl.zeros(x.shape, tl.int32)
    for i in tl.static_range(8):
        half = 128 >> i
        index = tl.where(tl.load(midpoints_ptr + index + half - 1) < x, index + half, index)
    return index


@triton.jit
def _moment(codes_ptr, absmax_ptr, code_ptr, offsets, inside, block):
    """A block of one moment, expanded to float32 (0 past the tensor's end)."""
    codes = tl.load(codes_ptr + offsets, mask=inside, other=0).to(tl.int32)
    return tl.where(inside, tl.load(code_ptr + codes) * tl.load(absmax_ptr + block), 0.0)


@triton.jit
def _store_moment(values, codes_ptr, absmax_ptr, midpoints_ptr, offsets, inside, block,
                  POSITIVE_NOT_ZERO: tl.constexpr):
    """A block of one moment stored again: its new absmax, and each value's nearest code (with
    POSITIVE_NOT_ZERO, a value above 0 at least code 1)."""
    absmax = tl.max(tl.where(inside, tl.abs(values), 0.0), axis=0)
    tl.store(absmax_ptr + block, absmax)
    scaled = tl.div_rn(values, tl.where(absmax > 0, absmax, 1.0))
    codes = _nearest(scaled, midpoints_ptr)
    if POSITIVE_NOT_ZERO:
        codes = tl.where(scaled > 0, tl.maximum(codes, 1), codes)
    tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=inside)


@triton.jit
def _adamw8bit(p_ptr, g_ptr, m_ptr, m_absmax_ptr, m_code_ptr, m_midpoints_ptr, v_ptr, v_absmax_ptr, v_code_ptr,
               v_midpoints_ptr, n, decay, m_weight, beta2, v_weight, step_size, bias2_sqrt, eps,
               BLOCK: tl.constexpr):
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    m = _moment(m_ptr, m_absmax_ptr, m_code_ptr, offsets, inside, block)
    v = _moment(v_ptr, v_absmax_ptr, v_code_ptr, offsets, inside, block)
    # torch.optim.AdamW's update, in its order, with IEEE division and square root as torch's
    p = p * decay
    m = m + m_weight * (g - m)  # m_weight = 1 - beta1, v_weight = 1 - beta2: rounded as torch rounds them
    v = v * beta2 + v_weight * g * g
    p = p - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps)
    tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=inside)
    overflowed = v > 3.4028234663852886e38  # a second moment past float32 (a NaN is not: tl.minimum would drop it)
    m = tl.where(overflowed, 0.0, m)  # stored as the reference stores them: torch steps that weight by 0 from
    v = tl.where(overflowed, 3.4028234663852886e38, v)  # then on
    _store_moment(m, m_ptr, m_absmax_ptr, m_midpoints_ptr, offsets, inside, block, False)
    _store_moment(v, v_ptr, v_absmax_ptr, v_midpoints_ptr, offsets, inside, block, True)


def adamw8bit_step(p, g, state, tables, step, lr, beta1, beta2, eps, weight_decay, blocksize):
    """``bailong.optim.step_8bit`` in one launch; ``p`` and ``g`` contiguous, ``tables`` and ``blocksize`` (the
    values sharing one absmax) from ``bailong.optim``, which imports this module only where it runs."""
    n = p.numel()
    with launch_device(p):  # a weight on another GPU than the current one
        _adamw8bit[(cdiv(n, blocksize),)](
            p, g, state["exp_avg"], state["exp_avg_absmax"], tables["exp_avg"], tables["exp_avg_midpoints"],
            state["exp_avg_sq"], state["exp_avg_sq_absmax"], tables["exp_avg_sq"], tables["exp_avg_sq_midpoints"],
            n, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1 ** step),
            math.sqrt(1 - beta2 ** step), eps, BLOCK=blocksize, num_warps=2, **FMA)
