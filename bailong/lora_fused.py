"""The fused LoRA path: each projection's forward and backward written out by hand, as one autograd node.

``LoRALinear`` (bailong/lora.py) takes it when switched on (``BAILONG_FUSED_LORA=1``)
and a gradient is wanted: the frozen base's matmul, the low-rank update and the
dropout in one node, in the compute dtype, with the scaling in the matmuls' alpha;
``LoRAShared`` does the same for the projections that read one input (q, k, v;
gate, up). The tests hold both to the plain path, two ``nn.Linear`` a projection
and autograd, to 1e-5 in float32.
"""
import torch
import torch.nn.functional as F

from bailong.nf4 import NF4Tensor
from bailong.quantized import nf4_dequantized, nf4_linear


class LoRAProjection(torch.autograd.Function):
    """x W^T + s * dropout(x) A^T B^T as one autograd node, in the compute dtype, W frozen (dense or NF4).

    ``A`` and ``B`` are the compute-dtype copies of the float32 masters ``A_master``
    and ``B_master`` (``LoRALinear.compute_weights``); the gradients go to the masters.
    The scaling rides in the matmuls' alpha, the adds in the matmuls (``addmm``): no
    separate multiply or add pass. Kept for the backward: the dropped input, its
    rank-r projection, the dropout mask (bytes) and W as stored (NF4 stays packed,
    dequantized again for the backward). With g = dL/dout and u = g B:

        dL/dx = g W + s u A (dropout's mask applied to the second term)
        dL/dA = s u^T x_d           dL/dB = s g^T (x_d A^T)

    Dropout is ``native_dropout``, which draws the mask ``F.dropout`` draws from the
    same random state, so the fused and the plain path train alike.
    """

    @staticmethod
    def forward(ctx, x, W, A_master, B_master, A, B, scaling, p):
        y = frozen_linear(x, W)
        x2 = x.reshape(-1, x.shape[-1]).to(y.dtype)
        mask = None
        if p:  # one kernel, the same mask F.dropout draws from the same random state
            x2, mask = torch.native_dropout(x2, p, True)
        xa = x2 @ A.T  # (tokens, r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa, B.T, alpha=scaling)
        ctx.weight = W  # frozen: nothing of it changes before the backward
        ctx.save_for_backward(x2, xa, mask, A, B)
        ctx.scaling, ctx.p, ctx.x_shape, ctx.x_dtype = scaling, p, x.shape, x.dtype
        ctx.master_dtype = A_master.dtype  # and B_master's
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, g):
        x2, xa, mask, A, B = ctx.saved_tensors
        s, W = ctx.scaling, ctx.weight
        want_x, _, want_A, want_B = ctx.needs_input_grad[:4]
        g2 = g.reshape(-1, g.shape[-1])
        u = g2 @ B if want_x or want_A else None  # (tokens, r)
        dx = None
        if want_x:  # not for the first layer's input when the embedding trains nothing
            dx = _scaled_mm(u, A, s)
            if mask is not None:
                dx = torch.ops.aten.native_dropout_backward(dx, mask, 1 / (1 - ctx.p))
            dx = torch.addmm(dx, g2, frozen_weight(W, g.dtype)).view(ctx.x_shape).to(ctx.x_dtype)  # + g W
        dA, dB = _master_grads([(u.T, x2, s) if want_A else None, (g2.T, xa, s) if want_B else None],
                               ctx.master_dtype)
        return dx, None, dA, dB, None, None, None, None


def frozen_linear(x, W):
    """x W^T for a frozen weight, dense or NF4 (through the kernels on CUDA)."""
    return nf4_linear(x, W) if isinstance(W, NF4Tensor) else F.linear(x, W)


def frozen_weight(W, dtype):
    """A frozen weight in ``dtype`` for a backward's g W: an NF4 one dequantized again."""
    return nf4_dequantized(W, dtype) if isinstance(W, NF4Tensor) else W.to(dtype)


def _scaled_mm(a, b, s, out=None):
    """s * a @ b in one matmul: with beta = 0, addmm ignores its (empty) first operand."""
    return torch.addmm(torch.empty((), dtype=a.dtype, device=a.device), a, b, beta=0, alpha=s, out=out)


def _master_grads(products, dtype):
    """s * a @ b for each (a, b, s) of ``products`` (None: not wanted), side by side in one buffer of the
    compute dtype, then cast to ``dtype`` (the float32 masters') in one pass instead of one a product: views
    of one tensor, which autograd keeps as the gradients."""
    wanted = [p for p in products if p is not None]
    if not wanted:
        return [None] * len(products)
    shapes = [(a.shape[0], b.shape[1]) for a, b, _ in wanted]
    sizes = [rows * cols for rows, cols in shapes]
    flat = torch.empty(sum(sizes), dtype=wanted[0][0].dtype, device=wanted[0][0].device)
    for (a, b, s), part, shape in zip(wanted, flat.split(sizes), shapes):
        _scaled_mm(a, b, s, out=part.view(shape))
    grads = iter(part.view(shape) for part, shape in zip(flat.to(dtype).split(sizes), shapes))
    return [None if p is None else next(grads) for p in products]


def compute_dtype(x):
    """The dtype the projections of x compute in: autocast's, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class LoRAShared(torch.autograd.Function):
    """n LoRA projections of the same x (no dropout), as one autograd node: ``LoRAProjection`` for each, but
    x is read once for all their A's, x [A_1; ...; A_n]^T, and dL/dx is formed in one place, from one
    product for all the LoRA parts, s [u_1 ... u_n] [A_1; ...; A_n] with u_i = g_i B_i, and each base's
    g_i W_i added by its matmul, instead of n gradients that autograd then adds. dL/dA_i come out of one
    product too, s [u_1 ... u_n]^T x, as rows of one float32 tensor."""

    @staticmethod
    def forward(ctx, x, weights, A_cat, Bs, scaling, *masters):
        ys = [frozen_linear(x, W) for W in weights]
        x2 = x.reshape(-1, x.shape[-1]).to(ys[0].dtype)
        xa = x2 @ A_cat.T  # (tokens, n r)
        r = A_cat.shape[0] // len(weights)
        outs = [torch.addmm(y.reshape(-1, y.shape[-1]), xa[:, i * r:(i + 1) * r], B.T, alpha=scaling).view(y.shape)
                for i, (y, B) in enumerate(zip(ys, Bs))]
        ctx.weights, ctx.scaling, ctx.r, ctx.x_shape, ctx.x_dtype = weights, scaling, r, x.shape, x.dtype
        ctx.master_dtype = masters[0].dtype  # all of them
        ctx.save_for_backward(x2, xa, A_cat, *Bs)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gs):
        x2, xa, A_cat, *Bs = ctx.saved_tensors
        s, r = ctx.scaling, ctx.r
        wanted = ctx.needs_input_grad[5:]  # A_1, B_1, A_2, B_2, ...
        gs = [g.reshape(-1, g.shape[-1]) for g in gs]
        u = torch.empty((len(x2), A_cat.shape[0]), dtype=x2.dtype, device=x2.device)  # [u_1 ... u_n]
        for i, (g, B) in enumerate(zip(gs, Bs)):
            torch.mm(g, B, out=u[:, i * r:(i + 1) * r])
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _scaled_mm(u, A_cat, s)
            for g, W in zip(gs, ctx.weights):  # + g_i W_i
                dx = torch.addmm(dx, g, frozen_weight(W, g.dtype))
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        dA, *dBs = _master_grads([(u.T, x2, s) if any(wanted[::2]) else None]  # every dL/dA_i's rows
                                 + [(g.T, xa[:, i * r:(i + 1) * r], s) if wanted[2 * i + 1] else None
                                    for i, g in enumerate(gs)], ctx.master_dtype)
        grads = []
        for i, dB in enumerate(dBs):
            grads += [dA[i * r:(i + 1) * r] if wanted[2 * i] else None, dB]
        return dx, None, None, None, None, *grads
