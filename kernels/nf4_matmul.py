"""NF4 matmul in Triton: y = x @ W.T for a frozen weight W stored in NF4 (bitsandbytes' layout).

Two ways, chosen by the number of rows M of x:

- M <= 4 (decoding): one GEMV kernel that streams the packed weight once and
  multiply-adds it with x in registers. Decoding is bound by reading the weights,
  and NF4 holds a weight in 4.13 bits instead of bf16's 16, so reading the 4-bit
  codes directly is up to ~3.9x less traffic than a bf16 matrix-vector product.
- M > 4 (prefill, training): the dequantize kernel writes W in x's dtype, then
  cuBLAS multiplies. There the matmul's time grows with M and the extra pass
  over W does not; a tiled dequant-in-the-loop kernel was 25x slower than this
  on an H200 and was removed (docs/BENCHMARKS.md).

The GEMV is ``bailong_kernels.nf4_gemv``. Backward, dx = dy @ W: the dequantize
kernel, then cuBLAS (W is frozen: no weight gradient). Reference:
``bailong.quantized.NF4Matmul``.

Weights that read the same x (q, k and v; gate and up) can go as a tuple, where
no graph is recorded (a fused LoRA node's forward, ``bailong.lora_fused.LoRAShared``):
one dequantize launch writes them all as the rows of one matrix
(``nf4_dequantize_group``), one cuBLAS matmul multiplies by it, and each weight's
output is a view, its columns of the one output. Per layer and pass that is 4
dequantize launches and 4 matmuls instead of 7 and 7. The kernels that read those
outputs (RoPE, SwiGLU: ``bailong_kernels.layers``) take them with their row stride.
"""
import torch
import torch.nn.functional as F

from bailong.nf4 import NF4Tensor
from bailong.recompute import dequantized
from bailong_kernels.nf4_dequant import launch_device, nf4_dequantize, nf4_dequantize_group
from bailong_kernels.nf4_gemv import gemv, gemv_group, gemv_takes


def dequantize(q: NF4Tensor | tuple, dtype) -> torch.Tensor:
    """q dequantized by the kernel, or for a tuple of weights of one K (q, k, v) the rows of one (sum of N, K)
    matrix, made in one launch (``nf4_dequantize_group``)."""
    if isinstance(q, tuple):
        return nf4_dequantize_group(q, dtype).view(-1, q[0].shape[1])
    return nf4_dequantize(q, dtype)


def dequant_matmul(x2d, q: NF4Tensor | tuple, keep=False):
    """(M, K) @ W.T through the dequantize kernel and cuBLAS (for a tuple of weights, one matrix of them all:
    ``dequantize``); ``keep``: W's copy kept for the backward where a checkpointed layer's recomputation keeps
    them (``bailong.recompute.dequantized``)."""
    return F.linear(x2d, dequantized(q, x2d.dtype, dequantize, keep))


def nf4_matmul_forward(x2d, q: NF4Tensor | tuple, keep=False):
    """(M, K) @ W.T -> (M, N) in x's dtype: the GEMV kernel where it takes x (``gemv_takes``), else the
    dequantize kernel and cuBLAS. For a tuple of weights, the tuple of (M, N_i): views of one output."""
    if isinstance(q, tuple):
        if all(gemv_takes(x2d, w) for w in q):
            return gemv_group(x2d, q)
        return dequant_matmul(x2d, q, keep).split([w.shape[0] for w in q], dim=-1)
    if gemv_takes(x2d, q):
        return gemv(x2d, q)
    return dequant_matmul(x2d, q, keep)


class NF4MatmulKernel(torch.autograd.Function):
    """y = x @ W.T through the kernels; the backward gives dx only and keeps just the packed W (and, from a
    checkpointed layer's recomputation to its backward where asked, W dequantized: ``bailong.recompute``)."""

    @staticmethod
    def forward(ctx, x, q: NF4Tensor, keep=False):
        ctx.q = q
        return _matmul(x, q, keep or ctx.needs_input_grad[0])

    @staticmethod
    def backward(ctx, dy):
        return dy @ dequantized(ctx.q, dy.dtype, dequantize), None, None  # (..., N) @ (N, K)


def _matmul(x, q: NF4Tensor | tuple, keep):
    with launch_device(x):  # autograd makes it the backward's current device itself
        y = nf4_matmul_forward(x.reshape(-1, x.shape[-1]), q, keep)
    if isinstance(q, tuple):
        return tuple(part.view(*x.shape[:-1], w.shape[0]) for part, w in zip(y, q))
    return y.view(*x.shape[:-1], q.shape[0])


def nf4_matmul(x, q: NF4Tensor | tuple, keep=False):
    """``x @ W.T`` for ``q = bailong.nf4.quantize(W)``, any leading dimensions on x, with a gradient for x;
    under autocast computed in the autocast dtype, as ``F.linear`` is. ``keep``: as for
    ``bailong.quantized.nf4_linear``. For a tuple of weights of one K (q, k, v; no gradient wanted), the tuple of
    x @ W_i.T: views of one output, all the weights dequantized in one launch and multiplied by in one matmul."""
    for w in q if isinstance(q, tuple) else (q,):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"x has {x.shape[-1]} features; the weight expects {w.shape[1]}")
        if x.device != w.data.device:
            raise ValueError(f"x is on {x.device}, the weight on {w.data.device}")
    if torch.is_autocast_enabled(x.device.type):  # as F.linear does under autocast
        x = x.to(torch.get_autocast_dtype(x.device.type))
    # no graph to record (inference; the forward of a fused LoRA node): no autograd node, microseconds less a call
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _matmul(x, q, keep)
    assert not isinstance(q, tuple), "nf4_matmul: a tuple of weights forms no graph"
    return NF4MatmulKernel.apply(x, q, keep)
