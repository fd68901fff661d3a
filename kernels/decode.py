"""Fused Triton kernels for the decoding step (inference only: no backward).

Eagerly, a decoder layer's step is dozens of small PyTorch operations; on a GPU
each is a kernel launch that moves a few kilobytes, so the step is bound by
launches, not by reading the weights. These kernels do the same arithmetic in
fewer launches, each beside the PyTorch code it replaces (``bailong.model``):

- ``rms_norm``: ``RMSNorm.forward`` (square, mean, rsqrt, multiply, casts) in one launch.
- ``swiglu``: ``silu(gate) * up`` in one launch.
- ``projections``: q, k and v (or any bare NF4 projections that read the same x,
  or bare bf16 / fp16 ones: the GEMV's dense loop) in one GEMV launch, and the
  head; ``gated_projection``: gate and up with SwiGLU on the way out, in one
  launch; ``added_projection``: o or down with the residual added on the way out
  (``bailong_kernels.nf4_gemv.gemv_group`` / ``gemv_swiglu`` / ``gemv``).
- ``decode_attention``: for one new token, RoPE on q and k, the new k and v
  written into the KV cache, and attention over the positions filled so far
  (not the whole cache buffer), in one launch (two for a long cache):

      for each (batch b, head h, part j), one program, kv head g = h // (heads / kv heads):
          q, k = rope(q[b, h], p), rope(k[b, g], p)      # p: the new token's position, read on the device
          if h is the first head of g and j = 0: cache_k[b, g, p], cache_v[b, g, p] = k, v
          over part j of the cache positions 0..p-1 (and, in part 0, the new k, v):
              the running max m, sum l and output o of softmax(K q / sqrt(D)) V
              (online softmax, BLOCK_S positions at a time, in float32)
          one part: y[b, h] = o / l
      several parts: a second launch merges them, y[b, h] = sum_j e^(m_j - M) o_j / sum_j e^(m_j - M) l_j

  With one program a head, a long cache is read by as many programs as there are
  heads (32 at Llama-2-7B, on a GPU of 132 multiprocessors); a cache of more than
  ``PART_POSITIONS`` positions is cut into parts (flash-decoding), one program
  each, for the price of the merging launch.

Head dimensions are kept as two halves, as Hugging Face's rotate-half RoPE pairs
dimension i with i + D/2.

With programmatic dependent launch (``bailong_kernels.use_pdl``, Hopper and
later) each of these kernels and the GEMV's lets the next kernel start first
(``_pdl_start``) and waits for the one before (``_pdl_wait``) before it reads
anything but weights or writes anything (``nf4_dequant.pdl``).
"""
import math

import torch
import triton
import triton.language as tl
from torch import nn

from bailong.quantized import NF4Linear
from bailong_kernels.nf4_dequant import FMA, _pdl_start, _pdl_wait, cdiv, launch_device, next_power_of_2, pdl_meta
from bailong_kernels.nf4_gemv import dense_takes, gemv, gemv_group, gemv_swiglu, gemv_takes


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, C, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64) * C
    cols = tl.arange(0, BLOCK)
    ok = cols < C
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)  # the norm's weight: read before the wait
    _pdl_wait(PDL)
    x = tl.load(x_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
    normed = x / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)  # in float32, as the reference
    tl.store(y_ptr + row + cols, w * normed.to(x_ptr.dtype.element_ty).to(tl.float32), mask=ok)


def rms_norm(x, weight, eps):
    """``weight * (x / rms(x)).to(x.dtype)``, the norm taken over the last dimension in float32."""
    x = x.contiguous()
    y = torch.empty(x.shape, device=x.device, dtype=torch.result_type(weight, x))
    C = x.shape[-1]
    with launch_device(x):
        _rms_norm_kernel[(x.numel() // C,)](x, weight, y, C, eps, BLOCK=next_power_of_2(C), **pdl_meta(x), **FMA)
    return y


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, y_ptr, C, stride_gate, stride_up, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    _pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)  # one row, BLOCK of its columns: no division by C an element
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < C
    g = tl.load(gate_ptr + row * stride_gate + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + col, mask=ok, other=0.0).to(tl.float32)
    silu = (g / (1 + tl.exp(-g))).to(gate_ptr.dtype.element_ty).to(tl.float32)  # rounded, as F.silu's result
    tl.store(y_ptr + row * C + col, silu * u, mask=ok)


def swiglu(gate, up):
    """``F.silu(gate) * up``; gate and up may be columns of one tensor (``rows``)."""
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    gate, up = rows(gate), rows(up)
    C = gate.shape[1]
    with launch_device(gate):
        _swiglu_kernel[(gate.shape[0], cdiv(C, 1024))](gate, up, y, C, gate.stride(0), up.stride(0), BLOCK=1024,
                                                       **pdl_meta(gate), **FMA)
    return y


def rows(t):
    """t as a matrix (rows, C) whose columns lie next to each other: a view where t's rows are evenly spaced (q, k
    and v, or gate and up, columns of one output: ``bailong_kernels.nf4_matmul``), so that a kernel reads them
    with their row stride, without a copy; else a copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _one_launch_weights(x, layers):
    """The weights of ``layers`` if one GEMV launch can take them all for x, else None: bare NF4 projections
    the GEMV takes, quantized alike, or bare bias-free linear layers in x's dtype (``dense_takes``); no autocast
    (it would cast x)."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    x2d = x.reshape(-1, x.shape[-1])
    if all(type(m) is NF4Linear for m in layers):
        qs = [m.weight for m in layers]
        if len({(q.blocksize, q.double_quant) for q in qs}) == 1 and all(gemv_takes(x2d, q) for q in qs):
            return qs
    elif all(type(m) is nn.Linear and m.bias is None and dense_takes(x2d, m.weight) for m in layers):
        return [m.weight for m in layers]
    return None


def projections(x, layers):
    """``tuple(m(x) for m in layers)`` in one GEMV launch, or None where that launch cannot take them."""
    qs = _one_launch_weights(x, layers)
    if qs is None:
        return None
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in gemv_group(x.reshape(-1, x.shape[-1]), qs))


def added_projection(residual, layer, x):
    """``residual + layer(x)`` in one GEMV launch (the add on the way out), or None where it cannot take them."""
    qs = _one_launch_weights(x, (layer,))
    if qs is None or residual.dtype != x.dtype:
        return None
    return gemv(x.reshape(-1, x.shape[-1]), qs[0], residual=residual.reshape(-1, residual.shape[-1])).view(
        residual.shape)


def gated_projection(x, gate, up):
    """``F.silu(gate(x)) * up(x)`` in one GEMV launch, or None where that launch cannot take them."""
    qs = _one_launch_weights(x, (gate, up))
    if qs is None or qs[0].shape != qs[1].shape:
        return None
    return gemv_swiglu(x.reshape(-1, x.shape[-1]), *qs).view(*x.shape[:-1], gate.out_features)


@triton.jit
def _rotate(x_ptr, cos, sin, d, HALF: tl.constexpr):
    """The two halves of x[0:2 HALF] (at offsets d of each) rotated by the angles of cos and sin, in float32."""
    x1 = tl.load(x_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


PART_POSITIONS = 512  # cache positions a program of decode_attention reads, at most, once the cache is longer


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr, y_ptr,
                             ml_ptr, H, KV, S, stride_cb, stride_ch, stride_cs, scale,
                             HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PARTS: tl.constexpr,
                             PDL: tl.constexpr):
    _pdl_start(PDL)
    _pdl_wait(PDL)  # nothing read here is a weight: q, k, v, cos, sin, the position and the cache all change
    b, h, part = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    g = h // (H // KV)  # the kv head this head reads
    D: tl.constexpr = 2 * HALF
    d = tl.arange(0, BLOCK_D)  # offsets within a half (BLOCK_D: HALF rounded up to a power of two)
    dm = d < HALF
    dtype = k_cache_ptr.dtype.element_ty
    p = tl.load(pos_ptr)  # the new token's position: everything before it is in the cache
    cos = tl.load(cos_ptr + d, mask=dm, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + d, mask=dm, other=0.0).to(tl.float32)
    q1, q2 = _rotate(q_ptr + (b * H + h) * D, cos, sin, d, HALF)
    q1, q2 = q1.to(q_ptr.dtype.element_ty).to(tl.float32) * scale, q2.to(q_ptr.dtype.element_ty).to(tl.float32) * scale
    k1, k2 = _rotate(k_ptr + (b * KV + g) * D, cos, sin, d, HALF)
    k1, k2 = k1.to(dtype), k2.to(dtype)  # as stored in the cache
    v1 = tl.load(v_ptr + (b * KV + g) * D + d, mask=dm, other=0.0)
    v2 = tl.load(v_ptr + (b * KV + g) * D + HALF + d, mask=dm, other=0.0)
    cache = b * stride_cb + g * stride_ch
    if (h % (H // KV) == 0) & (part == 0) & (p < S):  # one program of the group writes the new position, if it fits
        new = cache + p * stride_cs
        tl.store(k_cache_ptr + new + d, k1, mask=dm)
        tl.store(k_cache_ptr + new + HALF + d, k2, mask=dm)
        tl.store(v_cache_ptr + new + d, v1.to(dtype), mask=dm)
        tl.store(v_cache_ptr + new + HALF + d, v2.to(dtype), mask=dm)
    # part 0 starts from the new position (its score, weight 1, its v); the others from nothing, with a max far
    # below any score (an empty part then weighs 0 in the merge)
    first = part == 0
    m = tl.where(first, tl.sum(k1.to(tl.float32) * q1 + k2.to(tl.float32) * q2, axis=0), -1e30)
    total = tl.where(first, 1.0, 0.0)
    out1, out2 = tl.where(first, v1.to(tl.float32), 0.0), tl.where(first, v2.to(tl.float32), 0.0)
    filled = tl.minimum(p, S)  # cached positions before the new one; this part's: whole blocks of them
    per_part = tl.cdiv(tl.cdiv(filled, BLOCK_S), PARTS) * BLOCK_S
    start, end = part * per_part, tl.minimum(part * per_part + per_part, filled)
    for s0 in range(start, end, BLOCK_S):  # a block at a time (online softmax)
        s = s0 + tl.arange(0, BLOCK_S)
        rows = cache + s[:, None] * stride_cs + d[None, :]
        ok = (s < end)[:, None] & dm[None, :]
        score = tl.sum(tl.load(k_cache_ptr + rows, mask=ok, other=0.0).to(tl.float32) * q1[None, :]
                       + tl.load(k_cache_ptr + rows + HALF, mask=ok, other=0.0).to(tl.float32) * q2[None, :], axis=1)
        score = tl.where(s < end, score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=0))
        alpha, weight = tl.exp(m - m_new), tl.exp(score - m_new)
        total = total * alpha + tl.sum(weight, axis=0)
        out1 = out1 * alpha + tl.sum(weight[:, None] * tl.load(v_cache_ptr + rows, mask=ok, other=0.0), axis=0)
        out2 = out2 * alpha + tl.sum(weight[:, None] * tl.load(v_cache_ptr + rows + HALF, mask=ok, other=0.0), axis=0)
        m = m_new
    if PARTS == 1:
        y = y_ptr + (b * H + h) * D
        tl.store(y + d, out1 / total, mask=dm)
        tl.store(y + HALF + d, out2 / total, mask=dm)
    else:  # this part's m, l and (float32) o, for the merging launch
        at = (b * H + h) * PARTS + part
        tl.store(ml_ptr + 2 * at, m)
        tl.store(ml_ptr + 2 * at + 1, total)
        tl.store(y_ptr + at * D + d, out1, mask=dm)
        tl.store(y_ptr + at * D + HALF + d, out2, mask=dm)


@triton.jit
def _merge_parts_kernel(ml_ptr, o_ptr, y_ptr, D, PARTS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """y[b, h] from the PARTS partial softmaxes (m, l, o) of ``_decode_attention_kernel``."""
    _pdl_start(PDL)
    _pdl_wait(PDL)
    bh = tl.program_id(0).to(tl.int64)
    j, d = tl.arange(0, PARTS), tl.arange(0, BLOCK_D)
    m = tl.load(ml_ptr + 2 * (bh * PARTS + j))
    weight = tl.exp(m - tl.max(m, axis=0))  # each part's share, against the largest max
    total = tl.sum(tl.load(ml_ptr + 2 * (bh * PARTS + j) + 1) * weight, axis=0)
    o = tl.load(o_ptr + (bh * PARTS + j)[:, None] * D + d[None, :], mask=(d < D)[None, :], other=0.0)
    tl.store(y_ptr + bh * D + d, tl.sum(o * weight[:, None], axis=0) / total, mask=d < D)


def decode_attention(q, k, v, cos, sin, positions, k_cache, v_cache):
    """Attention of one new token: q (B, 1, H*D), k and v (B, 1, KV*D) straight from the projections;
    cos and sin (1, D) of its position; ``positions`` (1,) that position, on the device; k_cache and
    v_cache (B, KV, S, D) one layer's cache (or its first S positions), which gets the new k and v (not
    past its end: a full cache is left as it is, where PyTorch's cache write raises). Returns (B, 1, H*D)."""
    B, KV, S, D = k_cache.shape
    H = q.shape[-1] // D
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride() == k_cache.stride()
    parts = min(next_power_of_2(cdiv(S, PART_POSITIONS)), 16)
    y = torch.empty_like(q)
    out, ml = (torch.empty((B, H, parts, D), device=q.device, dtype=torch.float32),
               torch.empty((B, H, parts, 2), device=q.device, dtype=torch.float32)) if parts > 1 else (y, None)
    with launch_device(q):
        _decode_attention_kernel[(B, H, parts)](q, k, v, cos.contiguous(), sin.contiguous(), positions, k_cache,
                                                v_cache, out, ml, H, KV, S, *k_cache.stride()[:3], 1 / math.sqrt(D),
                                                HALF=D // 2, BLOCK_D=next_power_of_2(D // 2), BLOCK_S=64,
                                                PARTS=parts, **pdl_meta(q), **FMA)
        if parts > 1:
            _merge_parts_kernel[(B * H,)](ml, out, y, D, PARTS=parts, BLOCK_D=next_power_of_2(D), **pdl_meta(q),
                                          **FMA)
    return y
