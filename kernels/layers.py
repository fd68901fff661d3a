"""Triton kernels for a decoder layer's small operations in training: forward and backward.

Each replaces a chain of PyTorch operations (and, in training, their backward
chains) with one launch each way, beside the code it replaces in ``bailong.model``:

- ``rms_norm``: ``RMSNorm.forward`` with a frozen weight (QLoRA trains no norm).
  Forward: ``decode.rms_norm``'s kernel. Backward, per row, with n = x * rstd:

      dx = rstd * (g w - n * mean(g w n))

- ``swiglu``: ``silu(gate) * up``. Forward: ``decode.swiglu``'s kernel. Backward,
  with s = sigmoid(gate), both gradients in one launch:

      d_up = g * silu(gate)        d_gate = g * up * s * (1 + gate * (1 - s))

- ``rope``: ``apply_rope`` on a projection's output (B, T, heads * D), before it is
  split into heads: each pair (x_i, x_{i+D/2}) rotated by its position's angle.
  The backward is the same rotation by the opposite angle.

- ``cross_entropy_``: the loss of each row of a chunk of logits and, written over
  the logits, the gradient of the summed loss, in one launch (the chunked loss,
  ``bailong.memory.ChunkedLoss``): no float32 copy of the logits, no second pass
  for the backward. Per row, with lse = log(sum(exp(z))) found in one sweep:

      loss = lse - z[target]        dloss/dz = exp(z - lse) - onehot(target)

  (both zero where the target is -100).

Everything inside a kernel is float32; results are written in the inputs' dtype.
Activation checkpointing recomputes these forwards like any other operation.
"""
import torch
import triton
import triton.language as tl

from bailong_kernels import decode
from bailong_kernels.nf4_dequant import FMA, cdiv, launch_device, next_power_of_2

ELEMENTWISE_BLOCK = 1024
CROSS_ENTROPY_BLOCK = 4096  # logits read per step of a row's sweep


@triton.jit
def _rms_norm_backward_kernel(x_ptr, w_ptr, g_ptr, plus_ptr, dx_ptr, C, eps, BLOCK: tl.constexpr,
                              PLUS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * C
    cols = tl.arange(0, BLOCK)
    ok = cols < C
    x = tl.load(x_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    n = x * rstd
    gw = tl.load(g_ptr + row + cols, mask=ok, other=0.0).to(tl.float32) * \
        tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dx = rstd * (gw - n * (tl.sum(gw * n, axis=0) / C))
    if PLUS:
        dx += tl.load(plus_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(dx_ptr + row + cols, dx, mask=ok)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return decode.rms_norm(x, weight, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return rms_norm_backward(ctx, g), None, None


def rms_norm_backward(ctx, g, plus=None):
    """``RMSNormFunction``'s dL/dx from its context and dL/dy = g; ``plus``: a gradient of x's shape added in the
    same launch (a decoder layer's residual stream: ``bailong.layer_fused``), in float32 before the sum is
    rounded to x's dtype."""
    x, weight = ctx.saved_tensors
    g = g.contiguous()
    dx = torch.empty_like(x)
    C = x.shape[-1]
    with launch_device(x):
        _rms_norm_backward_kernel[(x.numel() // C,)](x, weight, g, g if plus is None else plus.contiguous(), dx, C,
                                                      ctx.eps, BLOCK=next_power_of_2(C), PLUS=plus is not None,
                                                      **FMA)
    return dx


def rms_norm(x, weight, eps):
    """``weight * (x / rms(x)).to(x.dtype)`` with a gradient for x (the weight is frozen)."""
    return RMSNormFunction.apply(x, weight, eps)


@triton.jit
def _swiglu_backward_kernel(gate_ptr, up_ptr, g_ptr, dgate_ptr, dup_ptr, C, stride_gate, stride_up,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one row, BLOCK of its columns (g and the gradients: contiguous)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = col < C
    a = tl.load(gate_ptr + row * stride_gate + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_up + col, mask=ok, other=0.0).to(tl.float32)
    at = row * C + col
    g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
    s = 1 / (1 + tl.exp(-a))
    silu = (a * s).to(gate_ptr.dtype.element_ty).to(tl.float32)  # rounded, as the forward used it
    tl.store(dup_ptr + at, g * silu, mask=ok)
    tl.store(dgate_ptr + at, g * u * s * (1 + a * (1 - s)), mask=ok)


class SwiGLUFunction(torch.autograd.Function):
    """gate and up may be columns of one tensor (q, k, v and gate, up come as views of one matmul's output:
    ``bailong_kernels.nf4_matmul``): both kernels read them with their row stride (``decode.rows``), no copy."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return decode.swiglu(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        dgate, dup = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(2))
        gate, up, g = decode.rows(gate), decode.rows(up), g.contiguous()
        C = gate.shape[1]
        with launch_device(gate):
            _swiglu_backward_kernel[(gate.shape[0], cdiv(C, ELEMENTWISE_BLOCK))](
                gate, up, g, dgate, dup, C, gate.stride(0), up.stride(0), BLOCK=ELEMENTWISE_BLOCK, **FMA)
        return dgate, dup


def swiglu(gate, up):
    """``F.silu(gate) * up`` with gradients for both."""
    return SwiGLUFunction.apply(gate, up)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, HEADS, stride_x, stride_y, sign, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # one position of one sequence: all its heads, as a (heads, half) tile
    d = tl.arange(0, BLOCK_D)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    ok = (h < HEADS) & (d < HALF)
    t = (row % T).to(tl.int64) * 2 * HALF
    cos = tl.load(cos_ptr + t + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = sign * tl.load(sin_ptr + t + d, mask=d < HALF, other=0.0).to(tl.float32)
    at = h * 2 * HALF + d
    x_at = x_ptr + row.to(tl.int64) * stride_x + at
    x1 = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=ok, other=0.0).to(tl.float32)
    y_at = y_ptr + row.to(tl.int64) * stride_y + at  # y = x: in place, each value read before it is written
    tl.store(y_at, x1 * cos - x2 * sin, mask=ok)
    tl.store(y_at + HALF, x2 * cos + x1 * sin, mask=ok)


def _rope(x, cos, sin, head_dim, sign, in_place=False):
    assert cos.shape == sin.shape == (x.shape[-2], head_dim) and x.shape[-1] % head_dim == 0, \
        "rope: cos and sin are (T, head_dim) for positions 0..T-1"
    shape, T, heads = x.shape, x.shape[-2], x.shape[-1] // head_dim
    x2 = decode.rows(x)  # q and k: columns of one output, read with their row stride
    if in_place and x2.data_ptr() != x.data_ptr():  # rows() had to copy: the rotation would miss x
        raise ValueError("rope_: x's rows are not evenly spaced")
    if in_place and x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]:  # (an expanded batch: one row rotated twice)
        raise ValueError("rope_: x's rows overlap")
    y = x2 if in_place else torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    with launch_device(x):
        _rope_kernel[(x2.shape[0],)](x2, cos.contiguous(), sin.contiguous(), y, T, heads, x2.stride(0), y.stride(0),
                                     sign, HALF=head_dim // 2, BLOCK_H=next_power_of_2(heads),
                                     BLOCK_D=next_power_of_2(head_dim // 2), **FMA)
    return x if in_place else y.view(shape)


def rope_(x, cos, sin, head_dim, sign=1.0):
    """``rope`` in place, no graph recorded (a decoder layer written out by hand, ``bailong.layer_fused``, where
    nothing else reads x); sign -1: the backward's rotation, of dL/dy into dL/dx."""
    return _rope(x, cos, sin, head_dim, sign, in_place=True)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, head_dim):
        ctx.save_for_backward(cos, sin)
        ctx.head_dim = head_dim
        return _rope(x, cos, sin, head_dim, 1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rope(g, cos, sin, ctx.head_dim, -1.0), None, None, None


def rope(x, cos, sin, head_dim):
    """``apply_rope`` for x of shape (B, T, heads * head_dim), positions 0..T-1 (cos, sin: (T, head_dim))."""
    return RoPEFunction.apply(x, cos, sin, head_dim)


@triton.jit
def _cross_entropy_kernel(z_ptr, targets_ptr, loss_ptr, V, BLOCK: tl.constexpr):
    z_ptr += tl.program_id(0).to(tl.int64) * V  # one row: its logits, read twice
    target = tl.load(targets_ptr + tl.program_id(0))
    m = tl.full((), -float("inf"), tl.float32)  # running maximum and sum of exp(z - m): lse in one sweep
    total = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(z, axis=0))
        total = total * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)  # the old sum rescaled: no overflow
        m = new_m
    lse = m + tl.log(total)
    kept = target != -100
    z_target = tl.load(z_ptr + tl.where(kept & (target >= 0) & (target < V), target, 0)).to(tl.float32)
    tl.store(loss_ptr + tl.program_id(0), tl.where(kept, lse - z_target, 0.0))
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(z_ptr + cols, tl.where(kept, grad, 0.0), mask=cols < V)


def cross_entropy_(logits, targets):
    """Each row's ``F.cross_entropy(logits.float(), targets, reduction="none")`` (float32; 0 where the target
    is -100), and the gradient of their sum with respect to the logits written over ``logits`` (N, V). Targets
    are ids below V or -100 (not checked: that would wait for the GPU; another id reads no memory outside
    its row, but its loss means nothing)."""
    assert logits.dim() == 2 and logits.is_contiguous() and targets.shape == logits.shape[:1]
    loss = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
    with launch_device(logits):
        _cross_entropy_kernel[(len(logits),)](logits, targets.contiguous(), loss, logits.shape[1],
                                              BLOCK=min(CROSS_ENTROPY_BLOCK, next_power_of_2(logits.shape[1])), **FMA)
    return loss
