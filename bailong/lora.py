"""Hand-written LoRA: trainable low-rank updates beside frozen (dense or NF4) weights.

    y = x W^T + s * (x A^T) B^T    x: (tokens, in);  W: (out, in) frozen;  A: (r, in);  B: (out, r);  s = alpha / r

Only A and B train: r (in + out) numbers per matrix instead of in * out. B starts
at zero, so training starts from exactly the base model. With rsLoRA
(Kalajdzievski, 2023) s = alpha / sqrt(r), which keeps updates from shrinking
as r grows.

The chain rule through one layer, with g = dL/dy (tokens, out) and u = g B (tokens, r)
(the base adds nothing to the first two; LoRA dropout, on by default, replaces x by
dropout(x) in them and masks the second term of the third):

    dL/dB = s * g^T (x A^T)       dL/dA = s * u^T x       dL/dx = g W + s * u A

Autograd derives the first two through two small ``nn.Linear``s, and for an NF4
W the ``nf4_linear`` function supplies g W without a weight gradient and without
keeping a dequantized W between forward and backward. By default (switched off
with ``BAILONG_FUSED_LORA=0``), ``LoRAProjection`` (bailong/lora_fused.py) forms all
three, base included, in one autograd node in the compute dtype. This file's path
is the one to read first; tests/test_lora_fused.py holds the two to the same
losses (within 1e-5 in float32) and gradients.

LoRA wraps, never forks: the wrapped layer keeps its frozen weight under its
usual key (``q_proj.weight``), so a PEFT adapter's keys are ours with the
prefix ``base_model.model.`` (see ``bailong/adapter.py``).
"""
import math
import sys
import warnings
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bailong.config import torch_dtype
from bailong.errors import BailongWarning
from bailong.lora_casts import Casts, cast, group_casts, release, stacked
from bailong.lora_fused import FrozenAddmm, LoRAProjection, LoRAShared, frozen_linear
from bailong.nf4 import NF4Tensor
from bailong.progress import BAR_HIDDEN
from bailong.quantized import (PROJECTIONS, NF4Linear, compute_dtype, embedding_rows, load_nf4, nf4_weights,
                               set_module)
from bailong.switches import initial


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
    base_fingerprint: str | None = None  # of the base it is trained on (``weights.fingerprint``), saved with it

    def __post_init__(self):
        """One target may be named alone ("q_proj"); a rank or dropout that trains nothing is refused."""
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if isinstance(self.r, bool) or not isinstance(self.r, Integral) or self.r < 1:
            raise ValueError(f"r must be a whole number above 0, not {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be at least 0 and below 1, not {self.dropout!r}")

    def scaling(self, r=None, alpha=None):
        """alpha / r, or alpha / sqrt(r) with rsLoRA; of a module's own rank and alpha where an adapter gives them."""
        r, alpha = r or self.r, self.alpha if alpha is None else alpha
        return alpha / (math.sqrt(r) if self.rslora else r)


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
        self.casts = Casts(self)

    @property
    def quantized(self):
        return isinstance(self.weight, NF4Tensor)

    def forward(self, x):
        if self.fused():  # training
            return self._projection(x, None)
        # the update first, the base's matmul last: a checkpointed layer's recomputation stops once everything
        # the backward keeps is saved again (an op's inputs are saved before it runs; an NF4 base saves none),
        # so the layer's last projection, down, does not multiply by its frozen weight again
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        y = frozen_linear(x, self.weight)
        return y + (update * self.scaling).to(y.dtype)

    def fused(self) -> bool:
        """Whether this call takes the fused path: switched on, a gradient wanted (not inference: chat, CUDA
        graphs), the base frozen."""
        return _fused and torch.is_grad_enabled() and not getattr(self.weight, "requires_grad", False)

    def added(self, residual, x, last=False):
        """``residual + self(x)`` with the add in a matmul (``model.add_projection``), where that applies
        (``adds``); else None. One node, the add in the base's matmul; for a layer's ``last`` projection (down),
        the update onto the residual, then the base's matmul as a node that keeps nothing (``FrozenAddmm``),
        which a recomputation need not run."""
        if self.adds(residual, x):
            if last:
                return FrozenAddmm.apply(self._projection(x, residual, base=False), x, self.weight)
            return self._projection(x, residual)
        return None

    def adds(self, residual, x) -> bool:
        """Whether ``added`` puts ``residual`` in the matmul: the fused path, the residual in the compute dtype
        and of the output's shape."""
        return (self.fused() and residual.dtype == compute_dtype(x)
                and residual.shape == (*x.shape[:-1], self.out_features))

    def _projection(self, x, residual, base=True):
        return LoRAProjection.apply(*self.projection_args(x, residual, base))

    def projection_args(self, x, residual, base=True):
        """``LoRAProjection``'s inputs for this layer: x W^T (``base``) + the update + ``residual``."""
        A, B = self.lora_A.weight, self.lora_B.weight
        casts = self.compute_weights(compute_dtype(x))
        return (x, self.weight if base else None, A, B, *casts, self.scaling, self.dropout_p(), residual,
                self.release_casts)

    def dropout_p(self) -> float:
        return self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0

    @staticmethod
    def shared(x, layers):
        """The outputs of ``layers``, LoRA layers that read the same x (q, k, v; gate, up), as one autograd
        node (``LoRAShared``) where that applies (``shares``); else None, and each layer runs on its own."""
        return LoRAShared.apply(*LoRALinear.shared_args(x, layers)) if LoRALinear.shares(layers) else None

    @staticmethod
    def shares(layers) -> bool:
        """Whether ``layers`` can run as one ``LoRAShared`` node: all LoRA layers on the fused path, with one
        scaling, rank, dropout and kind of base (NF4 ones quantized alike: dequantized in one launch)."""
        return (all(isinstance(m, LoRALinear) and m.fused() for m in layers)
                and len({(m.scaling, m.lora_A.out_features, m.dropout_p(), m.quantized,
                          (m.weight.blocksize, m.weight.double_quant) if m.quantized else None) for m in layers}) == 1)

    @staticmethod
    def shared_args(x, layers):
        """``LoRAShared``'s inputs for ``layers`` (``shares``) reading x."""
        first = layers[0]
        dtype = compute_dtype(x)
        casts = [m.compute_weights(dtype) for m in layers]
        key = tuple(m.casts.key for m in layers)
        if first.casts.shared_key != key:  # the A's stacked, again when any is cast again: a view, or a copy
            with torch.no_grad():
                first.casts.shared_A = stacked([A for A, _ in casts])
            first.casts.shared_key = key
        masters = [w for m in layers for w in (m.lora_A.weight, m.lora_B.weight)]
        return (x, tuple(m.weight for m in layers), first.casts.shared_A, tuple(B for _, B in casts), first.scaling,
                first.dropout_p(), lambda: [m.release_casts() for m in layers], *masters)

    def compute_weights(self, dtype):
        """A and B in the compute dtype: the copies kept for as long as the masters are unchanged
        (``bailong.lora_casts.cast``)."""
        return cast(self, dtype)

    def release_casts(self):
        """Let the compute-dtype copies go, once this layer's backward has used them (``lora_casts.release``)."""
        release(self)

    def merged_weight(self) -> torch.Tensor:
        """W + s * B @ A in float32 (an NF4 W is dequantized first)."""
        w = self.weight.dequantize(torch.float32) if self.quantized else self.weight.float()
        return w + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # a dense weight is a Parameter
        if self.quantized:
            destination.update(self.weight.to_bnb_dict(prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *lists):
        if self.quantized:  # bitsandbytes' keys, as saved above
            taken = load_nf4(self, state_dict, prefix, local_metadata, missing_keys, lists[-1])
            state_dict = {k: v for k, v in state_dict.items() if k not in taken}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *lists)

    def _apply(self, fn, recurse=True):
        if self.quantized:  # as NF4Linear: follow the device, keep the dtypes
            self.weight = self.weight.to(fn(self.weight.data).device)
        return super()._apply(fn, recurse)


_fused = initial("BAILONG_FUSED_LORA")


def frozen_matmul_skipped(module) -> bool:
    """Whether ``module``, a layer's last projection, skips its frozen matmul in a checkpointed layer's
    recomputation (the fused LoRA path: ``FrozenAddmm``), so that the layer may be checkpointed as a node of
    its own, which recomputes all of it (``bailong.recompute.Recomputed``)."""
    return isinstance(module, LoRALinear) and module.fused()


def use_fused_lora(flag=True) -> bool:
    """Run LoRA projections as one autograd node (``LoRAProjection``, True) or as two ``nn.Linear`` (False);
    returns the previous setting, to restore. On by default (``BAILONG_FUSED_LORA=0`` switches it off): on an
    H200, with the layer kernels and the chunked loss, a 7B step takes 0.45x the time of the two ``nn.Linear``
    (docs/BENCHMARKS.md); on the CPU the two paths take about the same time."""
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
        return embedding_rows(self.weight, ids) + (update * self.scaling).to(self.weight.dtype)

    def merged_weight(self) -> torch.Tensor:  # (the table may be in host memory)
        B, A = self.lora_embedding_B.float(), self.lora_embedding_A.float()
        return self.weight.to(B.device, torch.float32) + self.scaling * (B @ A).T


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
    set_module(model, name, wrapper.train(model.training))  # a model in eval mode stays there: no dropout
    return wrapper


def inject_lora(model, config: LoRAConfig):
    """Wrap every module whose last name component is in ``config.targets`` (each must name one)."""
    found = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if missing := [t for t in config.targets if t not in found]:  # (a name mistyped would train nothing there)
        raise ValueError(f"LoRA target {missing[0]!r}: no module of the model is named so (a target is a module's "
                         f"last name: {', '.join(t for t in LoRAConfig.targets if t in found)})")
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in config.targets
             and not isinstance(m, (LoRALinear, LoRAEmbedding))]
    for name in names:
        add_lora(model, name, config.r, config.scaling(), config.dropout)
    return group_casts(model)


def lora_parameters(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def mark_only_lora_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def lora_state_dict(model) -> dict:
    return {n: p.detach() for n, p in lora_parameters(model).items()}


def merge_lora(model, dtype=None):
    """Fold every update into its weight, W + s * B @ A, leaving plain layers where LoRA was (a projection
    LoRA did not wrap keeps its storage, NF4 included).

    An NF4 weight is dequantized first: the merged weight is then the model that
    trained, NF4(W) + s B A, NF4's rounding of W kept (a warning says so); onto the
    original weights (``bailong.export --base``) it is W + s B A. Quantized again,
    as the SFT stage quantizes its merged base, they part: onto NF4's own values an
    update smaller than NF4's rounding mostly rounds back to them, where onto W it
    stays on average, each weight rounded afresh (measured on normal weights, random
    updates a fifth of the mean rounding error: 2% of the update stays onto NF4's
    values, 99% onto W). So train.py's SFT stage merges onto the original weights.
    """
    dtype = torch_dtype(dtype) or model.model.norm.weight.dtype
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]
    if any(isinstance(m, LoRALinear) and m.quantized for _, m in wrapped):
        warnings.warn("merging onto dequantized NF4 weights: the result keeps the 4-bit rounding error; merge onto "
                      "the original weights (bailong.export --base) to avoid it", BailongWarning, stacklevel=2)
    names = [name for name, _ in wrapped]
    del wrapped  # each old weight let go as its merged one takes its place: at 7B two copies do not fit in 24 GiB
    for name in tqdm(names, desc="merging LoRA", unit="layer", disable=BAR_HIDDEN, leave=False, file=sys.stderr):
        m = model.get_submodule(name)
        w = nn.Parameter(m.merged_weight().to(dtype), requires_grad=False)
        if isinstance(m, LoRAEmbedding):
            plain = nn.Embedding.from_pretrained(w, freeze=True)  # (no random weights made to be dropped)
        else:
            plain = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            plain.weight = w
        plain.train(m.training)
        del m
        set_module(model, name, plain)
    # the merged model is the base of whatever adapter is saved of it next: a grown vocabulary's rows are its own
    model.__dict__.pop("vocab_grown_from", None)
    return model


def lora_summary(model) -> str:
    """Trainable against all parameters (an NF4 weight counts its logical size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    nf4 = sum(q.numel for q in nf4_weights(model))
    total = dense + nf4
    return f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})"
