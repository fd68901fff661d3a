"""The fused LoRA path: each projection's forward and backward written out by hand, as one autograd node.

``LoRALinear`` (bailong/lora.py) takes it by default (``BAILONG_FUSED_LORA=0`` switches it off)
where a gradient is wanted: the frozen base's matmul, the low-rank update and the
dropout in one node, in the compute dtype, with the scaling in the matmuls' alpha;
``LoRAShared`` does the same for the projections that read one input (q, k, v;
gate, up). The tests hold both to the plain path, two ``nn.Linear`` a projection
and autograd, to 1e-5 in float32.
"""
import math

import torch
import torch.nn.functional as F

from bailong.nf4 import NF4Tensor
from bailong.quantized import nf4_dequantized, nf4_linear
from bailong.recompute import is_held, is_recomputing, mask_key


class LoRAProjection(torch.autograd.Function):
    """x W^T + s * dropout(x) A^T B^T as one autograd node, in the compute dtype, W frozen (dense or NF4),
    plus ``residual`` where one is given (in the compute dtype), added by the base's matmul; W None: the
    update onto the residual alone (the caller adds x W^T: ``FrozenAddmm``), not formed in a checkpointed
    layer's recomputation, where no one reads it (``bailong.recompute.is_recomputing``).

    ``A`` and ``B`` are the compute-dtype copies of the float32 masters ``A_master``
    and ``B_master`` (``LoRALinear.compute_weights``); the gradients go to the masters, and
    ``release()``, where given, is called once the backward has used the copies.
    The scaling rides in the matmuls' alpha, the adds in the matmuls (``addmm``): no
    separate multiply or add pass. Kept for the backward: the dropped input, its
    rank-r projection, the dropout mask (on the training kernels' path its seed) and
    W as stored (NF4 stays packed, dequantized again for the backward, or there the
    copy a checkpointed layer's recomputation kept: ``bailong.recompute``). With
    g = dL/dout and u = g B:

        dL/dx = g W + s u A (dropout's mask applied to the second term)
        dL/dA = s u^T x_d           dL/dB = s g^T (x_d A^T)          dL/dresidual = g

    Dropout is ``native_dropout``, which draws the mask ``F.dropout`` draws from the
    same random state, so the fused and the plain path train alike; on the training
    kernels' path (CUDA) it is ``bailong_kernels.dropout``, whose mask is drawn
    again in the backward from a seed, not stored (``_dropped``).
    """

    @staticmethod
    def forward(ctx, x, W, A_master, B_master, A, B, scaling, p, residual, release=None):
        keep = ctx.needs_input_grad[0]  # the backward multiplies by W again (bailong.recompute)
        if W is None:
            y = residual
        elif residual is None:
            y = frozen_linear(x, W, keep)
        else:
            y = frozen_addmm(residual, x, W, keep)
        x2 = x.reshape(-1, x.shape[-1]).to(y.dtype)
        mask = key = None
        if p:  # one kernel
            xs, mask, key = _dropped(x2, 1, p)
            x2 = xs[0]
        xa = x2 @ A.T  # (tokens, r)
        if W is None and is_recomputing():  # the update onto the residual, whose sum no one reads: only saved
            out = y.new_empty(y.shape)
        elif W is None:  # onto the residual, which stays as it was
            out = torch.addmm(y.reshape(-1, y.shape[-1]), xa, B.T, alpha=scaling)
        else:  # into the base's output, ours (``frozen_addmm``: no copy of it first)
            out = y.view(-1, y.shape[-1]).addmm_(xa, B.T, alpha=scaling)
        ctx.weight = W  # frozen: nothing of it changes before the backward
        ctx.save_for_backward(x2, xa, mask, A, B)
        ctx.scaling, ctx.p, ctx.key, ctx.x_shape, ctx.x_dtype = scaling, p, key, x.shape, x.dtype
        ctx.master_dtype, ctx.release = A_master.dtype, release  # and B_master's dtype
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
            if ctx.p:
                dx = _through_masks(dx.unsqueeze(0), mask, ctx.key, ctx.p)
            if W is not None:
                dx.addmm_(g2, frozen_weight(W, g.dtype))  # + g W
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        dA, dB = _master_grads([(u.T, x2, s) if want_A else None, (g2.T, xa, s) if want_B else None],
                               ctx.master_dtype)
        if ctx.release:
            ctx.release()
        return dx, None, dA, dB, None, None, None, None, g if ctx.needs_input_grad[8] else None, None


class FrozenAddmm(torch.autograd.Function):
    """residual + x W^T for a frozen W (dense or NF4), in one matmul; nothing kept for the backward but W as
    stored (an NF4 one dequantized again, as in ``LoRAProjection``): dL/dresidual = g, dL/dx = g W. In a
    recomputation, whose outputs no one reads (``bailong.recompute.is_recomputing``), the matmul is skipped."""

    @staticmethod
    def forward(ctx, residual, x, W):
        ctx.weight, ctx.x_shape, ctx.x_dtype = W, x.shape, x.dtype
        if is_recomputing():  # nothing saved depends on the output: a layer's last projection (down)
            return residual.new_empty(residual.shape)
        return frozen_addmm(residual, x, W, ctx.needs_input_grad[1])

    @staticmethod
    def backward(ctx, g):
        dx = None
        if ctx.needs_input_grad[1]:
            dx = (g.reshape(-1, g.shape[-1]) @ frozen_weight(ctx.weight, g.dtype)).view(ctx.x_shape).to(ctx.x_dtype)
        return g, dx, None


def frozen_addmm(residual, x, W, keep=False, in_place=False):
    """residual + x W^T for a frozen weight, dense or NF4, in one matmul, in the residual's dtype. ``keep``: a
    backward will multiply by W again (``bailong.recompute``), as for the two below. ``in_place``: into
    ``residual`` itself, one the caller may overwrite.

    The nodes above add in place wherever the tensor added into is their own (and the hand-written layer here,
    ``in_place``): on CUDA an ``addmm`` into a new tensor first copies its 2-d input there, one kernel and a
    pass over the output more (ATen's cuda/Blas.cpp; tests/launch_count.py counts it); ``addmm_`` adds in the
    GEMM itself."""
    r = residual.view(-1, residual.shape[-1]) if in_place else residual.reshape(-1, residual.shape[-1])
    x = x.reshape(-1, x.shape[-1]).to(residual.dtype)
    w = frozen_weight(W, residual.dtype, keep).T
    return (r.addmm_(x, w) if in_place else torch.addmm(r, x, w)).view(residual.shape)


def frozen_linear(x, W, keep=False):
    """x W^T for a frozen weight, dense or NF4 (through the kernels on CUDA); for a tuple of weights that read x,
    the tuple of x W_i^T (NF4 through the kernels: views of one output, ``nf4_linear``)."""
    if isinstance(W, tuple):
        return nf4_linear(x, W, keep) if isinstance(W[0], NF4Tensor) else tuple(F.linear(x, w) for w in W)
    return nf4_linear(x, W, keep) if isinstance(W, NF4Tensor) else F.linear(x, W)


def frozen_weight(W, dtype, keep=False):
    """A frozen weight in ``dtype`` for a backward's g W: an NF4 one dequantized again, or the copy a
    checkpointed layer's recomputation kept for it; for a tuple of weights, the tuple of them (NF4 through the
    kernels: made in one launch, ``nf4_dequantized``)."""
    if isinstance(W, tuple):
        return nf4_dequantized(W, dtype, keep) if isinstance(W[0], NF4Tensor) else tuple(w.to(dtype) for w in W)
    return nf4_dequantized(W, dtype, keep) if isinstance(W, NF4Tensor) else W.to(dtype)


def seeded_dropout(x):
    """``bailong_kernels.dropout`` where x takes the training layer kernels (CUDA, switched on:
    ``bailong_kernels.use_layer_kernels``; whatever the grad mode, which a node's forward runs without), else
    None."""
    if not x.is_cuda:
        return None
    import bailong_kernels  # Triton is imported only where it runs
    layer_kernels = bailong_kernels.switches()[2]
    if not (bailong_kernels.enabled(x) and layer_kernels):
        return None
    from bailong_kernels import dropout
    return dropout


def _dropped(x2, n, p):
    """(xs, mask, key): n copies of x2 (tokens, in), each dropped by its own mask of probability p, (n, tokens,
    in), and what the backward needs to apply the masks again (``_through_masks``). From torch's
    ``native_dropout`` the masks (key None), those n calls of ``F.dropout`` draw in turn on the CPU; on the
    training kernels' path their Philox key (mask None; ``bailong.recompute.MaskSeeds``): nothing stored,
    ``bailong_kernels.dropout`` draws them again."""
    if (kernels := seeded_dropout(x2)) is not None:
        key = mask_key(x2, kernels.counters(x2, n))
        return kernels.dropout(x2, n, p, key), None, key
    xs, mask = torch.native_dropout(x2.expand(n, *x2.shape), p, True)
    return xs, mask, None


def _through_masks(dx, mask, key, p):
    """The gradients dx (n, tokens, in) of ``_dropped``'s n copies back through their masks and summed: the
    gradient of x2, (tokens, in). One kernel (n = 1: in place) on the kernels' path."""
    if key is not None:
        from bailong_kernels import dropout
        return dropout.dropout_sum(dx, key, p, out=dx[0] if len(dx) == 1 else None)
    dx = torch.ops.aten.native_dropout_backward(dx, mask, 1 / (1 - p) if p < 1 else 0.0)  # p = 1: autograd's 0
    return dx[0] if len(dx) == 1 else dx.sum(0)


def _scaled_mm(a, b, s, out=None):
    """s * a @ b in one matmul (a batch of them for 3-d a and b): with beta = 0, addmm and baddbmm ignore
    their (empty) first operand."""
    product = torch.addmm if a.dim() == 2 else torch.baddbmm
    return product(torch.empty((), dtype=a.dtype, device=a.device), a, b, beta=0, alpha=s, out=out)


def _master_grads(products, dtype):
    """s * a @ b for each (a, b, s) of ``products`` (None: not wanted), side by side in one buffer of the
    compute dtype, then cast to ``dtype`` (the float32 masters') in one pass instead of one a product: views
    of one tensor, which autograd keeps as the gradients."""
    wanted = [p for p in products if p is not None]
    if not wanted:
        return [None] * len(products)
    shapes = [(*a.shape[:-1], b.shape[-1]) for a, b, _ in wanted]
    sizes = [math.prod(shape) for shape in shapes]
    flat = torch.empty(sum(sizes), dtype=wanted[0][0].dtype, device=wanted[0][0].device)
    for (a, b, s), part, shape in zip(wanted, flat.split(sizes), shapes):
        _scaled_mm(a, b, s, out=part.view(shape))
    grads = iter(part.view(shape) for part, shape in zip(flat.to(dtype).split(sizes), shapes))
    return [None if p is None else next(grads) for p in products]


_one_at_a_time = False  # a shared node's backward: its weights dequantized one at a time (``one_at_a_time``)


def one_at_a_time(flag=True) -> bool:
    """In a shared node's backward (``LoRAShared``), dequantize the weights for dL/dx = sum_i g_i W_i one at a
    time, each let go before the next is made (True), or together, in one launch through the kernels (False,
    the default); returns the previous setting. Through the kernels n launches instead of one, for all but the
    largest copy less held: 86 MiB at the Llama-2-7B shape, gate's and up's. A copy a recomputation kept serves
    as before.
    ``bailong.lora_casts.use_casts_by_layer`` sets it too."""
    global _one_at_a_time
    previous, _one_at_a_time = _one_at_a_time, flag
    return previous


class LoRAShared(torch.autograd.Function):
    """n LoRA projections of the same x, as one autograd node: ``LoRAProjection`` for each, but x is read once
    for all their A's and dL/dx is formed in one place, instead of n gradients that autograd then adds.

    NF4 bases through the kernels (``bailong.quantized.nf4_linear``) are dequantized in one launch and
    multiplied by in one matmul, x [W_1; ...; W_n]^T; the outputs are views of it, each with its update added in
    place, and the backward's g_i W_i take the row blocks of one dequantization too.

    Without dropout: x [A_1; ...; A_n]^T in one matmul; dL/dx from one product for all the LoRA parts,
    s [u_1 ... u_n] [A_1; ...; A_n] with u_i = g_i B_i, each base's g_i W_i added by its matmul; the dL/dA_i
    from one product too, s [u_1 ... u_n]^T x, as rows of one float32 tensor.

    With dropout each projection draws its own mask, as PEFT's do, but all n in one launch: x broadcast to
    (n, tokens, in) and dropped at once, then batched matmuls, (n, tokens, in) x (n, in, r) forward and their
    transposes backward, the masks applied to the n LoRA parts of dL/dx before they are summed (``_dropped``).
    On the CPU those are the very masks n calls of ``F.dropout`` draw in turn (the same random stream, element
    after element), so the plain path trains alike; on CUDA they are other draws of the same law.
    """

    @staticmethod
    def forward(ctx, x, weights, A_cat, Bs, scaling, p, release, *masters):
        n = len(weights)
        ys = frozen_linear(x, weights, ctx.needs_input_grad[0])
        x2 = x.reshape(-1, x.shape[-1]).to(ys[0].dtype)
        r = A_cat.shape[0] // n
        mask = key = None
        if p:  # xs: (n, tokens, in), each row dropped by its own mask; xa: (n, tokens, r)
            xs, mask, key = _dropped(x2, n, p)
            xa = torch.bmm(xs, A_cat.view(n, r, -1).transpose(1, 2))
        else:  # xs: (tokens, in); xa: (tokens, n r)
            xs, xa = x2, x2 @ A_cat.T
        outs = [y.view(-1, y.shape[-1]).addmm_(part, B.T, alpha=scaling).view(y.shape)  # into the base's output
                for y, part, B in zip(ys, _parts(xa, r, p), Bs)]
        ctx.weights, ctx.scaling, ctx.p, ctx.r, ctx.x_shape, ctx.x_dtype = weights, scaling, p, r, x.shape, x.dtype
        ctx.key = key
        ctx.master_dtype, ctx.release = masters[0].dtype, release  # all of them
        ctx.save_for_backward(xs, xa, mask, A_cat, *Bs)
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gs):
        xs, xa, mask, A_cat, *Bs = ctx.saved_tensors
        s, r, n = ctx.scaling, ctx.r, len(Bs)
        wanted = ctx.needs_input_grad[7:]  # A_1, B_1, A_2, B_2, ...
        gs = [g.reshape(-1, g.shape[-1]) for g in gs]
        tokens = len(gs[0])
        # u = [u_1 ... u_n] laid out as xa: (tokens, n r), or (n, tokens, r) with dropout
        u = torch.empty((n, tokens, r) if ctx.p else (tokens, n * r), dtype=xs.dtype, device=xs.device)
        for g, B, part in zip(gs, Bs, _parts(u, r, ctx.p)):
            torch.mm(g, B, out=part)
        # every dL/dA_i's rows in one product: s u^T x, or the batch s u_i^T x_i
        u_dA, A = (u.transpose(1, 2), A_cat.view(n, r, -1)) if ctx.p else (u.T, A_cat)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _scaled_mm(u, A, s)
            if ctx.p:  # each LoRA part of dL/dx through its mask, then their sum
                dx = _through_masks(dx, mask, ctx.key, ctx.p)
            if _one_at_a_time and not is_held(ctx.weights, gs[0].dtype):  # + g_i W_i, each W_i made and let go in turn
                for g, w in zip(gs, ctx.weights):
                    dx.addmm_(g, frozen_weight(w, gs[0].dtype))
            else:
                for g, W in zip(gs, frozen_weight(ctx.weights, gs[0].dtype)):  # + g_i W_i
                    dx.addmm_(g, W)
                del W  # a view of the weights' one dequantized copy: let it go before the LoRA gradients are made
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        dA, *dBs = _master_grads([(u_dA, xs, s) if any(wanted[::2]) else None]
                                 + [(g.T, part, s) if wanted[2 * i + 1] else None
                                    for i, (g, part) in enumerate(zip(gs, _parts(xa, r, ctx.p)))], ctx.master_dtype)
        grads = []
        for i, dB in enumerate(dBs):
            grads += [dA.reshape(n * r, -1)[i * r:(i + 1) * r] if wanted[2 * i] else None, dB]
        if ctx.release:
            ctx.release()
        return dx, None, None, None, None, None, None, *grads


def _parts(t, r, p):
    """Each projection's r columns of ``t``, (tokens, n r), or with dropout (p > 0) its matrix of the batch
    (n, tokens, r): views."""
    return t.unbind(0) if p else t.split(r, dim=1)
