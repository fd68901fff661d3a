"""Hand-written LoRA: trainable low-rank updates beside frozen (dense or NF4) weights.

    y = x W^T + s * B A x        W: (out, in) frozen;  A: (r, in);  B: (out, r);  s = alpha / r

Only A and B train: r (in + out) numbers per matrix instead of in * out. B starts
at zero, so training starts from exactly the base model. With rsLoRA
(Kalajdzievski, 2023) s = alpha / sqrt(r), which keeps updates from shrinking
as r grows.

The chain rule through one layer, with g = dL/dy (the base adds nothing to it):

    dL/dB = s * g^T (A x)       dL/dA = s * B^T g x^T       dL/dx = g W + s * (g B) A

Autograd derives the first two through two small ``nn.Linear``s, and for an NF4
W the ``nf4_linear`` function supplies g W without a weight gradient and without
keeping a dequantized W between forward and backward. Switched on
(``BAILONG_FUSED_LORA=1``), ``LoRAProjection`` forms all three, base included, in
one autograd node in the compute dtype.

LoRA wraps, never forks: the wrapped layer keeps its frozen weight under its
usual key (``q_proj.weight``), so a PEFT adapter's keys are ours with the
prefix ``base_model.model.`` (see ``bailong/adapter.py``).
"""
import math
import os
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from bailong.nf4 import NF4Tensor
from bailong.quantized import PROJECTIONS, NF4Linear, nf4_dequantized, nf4_linear, nf4_weights, set_module


@dataclass
class LoRAConfig:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    rslora: bool = False
    targets: tuple = PROJECTIONS + ("embed_tokens", "lm_head")  # last component of module names
    # as PEFT's save_pretrained(save_embedding_layers=True): the adapter also carries the embedding, for a
    # tied one (no LoRA on it) whose vocabulary grew
    save_embedding_layers: bool = False

    def scaling(self, r=None):
        r = r or self.r
        return self.alpha / (math.sqrt(r) if self.rslora else r)


class LoRALinear(nn.Module):
    """A frozen linear layer (dense or NF4) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear | NF4Linear, r, scaling, dropout=0.0, lora_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # frozen: a Parameter without grad, or an NF4Tensor
        if isinstance(self.weight, nn.Parameter):
            self.weight.requires_grad_(False)
        device = self.weight.data.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        nn.init.zeros_(self.lora_B.weight)  # A keeps nn.Linear's (Kaiming) initialisation
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        _LORA_LINEARS.add(self)

    @property
    def quantized(self):
        return isinstance(self.weight, NF4Tensor)

    def forward(self, x):
        if self.fused():  # training
            A, B = self.lora_A.weight, self.lora_B.weight
            casts = self.compute_weights(compute_dtype(x))
            return LoRAProjection.apply(x, self.weight, A, B, *casts, self.scaling, self.dropout_p())
        y = frozen_linear(x, self.weight)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)

    def fused(self) -> bool:
        """Whether this call takes the fused path: switched on, a gradient wanted (not inference: chat, CUDA
        graphs), the base frozen."""
        return _fused and torch.is_grad_enabled() and not getattr(self.weight, "requires_grad", False)

    def dropout_p(self) -> float:
        return self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0

    @staticmethod
    def shared(x, layers):
        """The outputs of ``layers``, LoRA layers that read the same x (q, k, v; gate, up), as one autograd
        node (``LoRAShared``) where that applies: the fused path, no dropout, one scaling and rank, one
        kind of base; else None, and each layer runs on its own."""
        first = layers[0]
        if not (all(isinstance(m, LoRALinear) and m.fused() and m.dropout_p() == 0 for m in layers)
                and len({(m.scaling, m.lora_A.out_features, m.quantized) for m in layers}) == 1):
            return None
        dtype = compute_dtype(x)
        casts = [m.compute_weights(dtype) for m in layers]
        key = tuple(m._cast_key for m in layers)
        if getattr(first, "_shared_key", None) != key:  # the A's side by side, made again when any cast is
            with torch.no_grad():
                first._shared_A = torch.cat([A for A, _ in casts])
            first._shared_key = key
        masters = [w for m in layers for w in (m.lora_A.weight, m.lora_B.weight)]
        return LoRAShared.apply(x, tuple(m.weight for m in layers), first._shared_A, tuple(B for _, B in casts),
                                first.scaling, *masters)

    def _cast_version(self, dtype):
        A, B = self.lora_A.weight, self.lora_B.weight
        return _optimizer_steps, A._version, B._version, A.data_ptr(), B.data_ptr(), dtype

    def compute_weights(self, dtype):
        """A and B in the compute dtype, cast once for as long as the float32 masters are unchanged: not once
        per call, nor again when activation checkpointing recomputes the forward. Any optimizer's step (fused
        ones too, which leave the version counters alone) or in-place change renews them, for every trainable
        LoRA layer on the device at once: one multi-tensor copy, not a cast per matrix."""
        if getattr(self, "_cast_key", None) != self._cast_version(dtype):
            _LORA_LINEARS.add(self)  # a copy of a model was made without __init__
            device = self.lora_A.weight.device
            stale = [m for m in _LORA_LINEARS if m is self or m.lora_A.weight.requires_grad and
                     m.lora_A.weight.device == device and getattr(m, "_cast_key", None) != m._cast_version(dtype)]
            for m in stale:  # the old copies go first, so that the new ones can take their memory
                m._cast = m._shared_A = m._shared_key = None
            masters = [w for m in stale for w in (m.lora_A.weight, m.lora_B.weight)]
            casts = [torch.empty_like(w, dtype=dtype) for w in masters]
            with torch.no_grad():
                torch._foreach_copy_(casts, masters)
            for i, m in enumerate(stale):
                m._cast, m._cast_key = (casts[2 * i], casts[2 * i + 1]), m._cast_version(dtype)
        return self._cast

    def merged_weight(self) -> torch.Tensor:
        """W + s * B @ A in float32 (an NF4 W is dequantized first)."""
        w = self.weight.dequantize(torch.float32) if self.quantized else self.weight.float()
        return w + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # a dense weight is a Parameter
        if self.quantized:
            destination.update(self.weight.to_bnb_dict(prefix))

    def _apply(self, fn, recurse=True):
        if self.quantized:  # as NF4Linear: follow the device, keep the dtypes
            self.weight = self.weight.to(fn(self.weight.data).device)
        return super()._apply(fn, recurse)


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


_fused = os.environ.get("BAILONG_FUSED_LORA", "0") not in ("", "0")
_LORA_LINEARS = weakref.WeakSet()  # so that the compute-dtype casts of all of them are made together
_optimizer_steps = 0  # in this process: each may have changed LoRA weights, so their casts are made again


def _count_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


def use_fused_lora(flag=True) -> bool:
    """Run LoRA projections as one autograd node (``LoRAProjection``, True) or as two ``nn.Linear`` (False);
    returns the previous setting, to restore. Off until timed on a GPU (``BAILONG_FUSED_LORA=1``): on the
    CPU the two paths take the same time."""
    global _fused
    previous, _fused = _fused, flag
    return previous


class LoRAEmbedding(nn.Module):
    """A frozen embedding plus a low-rank update: E[ids] + s * (A^T[ids]) B^T.

    Layout as PEFT's: ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B``
    (dim, r); here A starts at zero and B random, the opposite of the linear case.
    """

    def __init__(self, base: nn.Embedding, r, scaling, lora_dtype=torch.float32):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        vocab, dim = self.weight.shape
        kw = dict(device=self.weight.device, dtype=lora_dtype)
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, vocab, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, **kw))
        nn.init.normal_(self.lora_embedding_B)
        self.scaling = scaling

    def forward(self, ids):
        update = F.embedding(ids, self.lora_embedding_A.T) @ self.lora_embedding_B.T  # (B, T, dim)
        return F.embedding(ids, self.weight) + (update * self.scaling).to(self.weight.dtype)

    def merged_weight(self) -> torch.Tensor:
        return self.weight.float() + self.scaling * (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T


def add_lora(model, name, r, scaling, dropout=0.0):
    """Wrap the module ``name`` in LoRA; returns the wrapper."""
    base = model.get_submodule(name)
    if getattr(model.config, "tie_word_embeddings", False) and name.endswith(("embed_tokens", "lm_head")):
        raise ValueError(f"LoRA on {name}: the embedding and the head share one weight (tie_word_embeddings); "
                         "leave them out of the targets")
    if isinstance(base, nn.Embedding):
        wrapper = LoRAEmbedding(base, r, scaling)
    elif isinstance(base, (nn.Linear, NF4Linear)):
        wrapper = LoRALinear(base, r, scaling, dropout)
    else:
        raise ValueError(f"LoRA cannot wrap {name} ({type(base).__name__})")
    set_module(model, name, wrapper)
    return wrapper


def inject_lora(model, config: LoRAConfig):
    """Wrap every module whose last name component is in ``config.targets``."""
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in config.targets
             and not isinstance(m, (LoRALinear, LoRAEmbedding))]
    for name in names:
        add_lora(model, name, config.r, config.scaling(), config.dropout)
    return model


def lora_parameters(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def mark_only_lora_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_state_dict(model) -> dict:
    return {n: p.detach() for n, p in lora_parameters(model).items()}


def merge_lora(model, dtype=None):
    """Fold every update into its weight, W + s * B @ A, leaving a plain (dense) model.

    An NF4 weight is dequantized first; the merged weight then carries NF4's
    rounding, which a merge onto the original weights would not (a warning says so).
    """
    dtype = dtype or model.model.norm.weight.dtype
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]
    if any(isinstance(m, LoRALinear) and m.quantized for _, m in wrapped):
        print("warning: merging onto dequantized NF4 weights: the result keeps the 4-bit rounding error; "
              "merge onto the original weights (bailong.export --base) to avoid it", file=sys.stderr)
    for name, m in wrapped:
        w = nn.Parameter(m.merged_weight().to(dtype), requires_grad=False)
        plain = nn.Embedding(*w.shape, device=w.device) if isinstance(m, LoRAEmbedding) else \
            nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        plain.weight = w
        set_module(model, name, plain)
    return model


def lora_summary(model) -> str:
    """Trainable against all parameters (an NF4 weight counts its logical size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    nf4 = sum(q.numel for q in nf4_weights(model))
    total = dense + nf4
    return f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})"
