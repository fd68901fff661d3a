"""What a checkpointed layer's recomputation can leave for its backward, and what it need not compute.

With activation checkpointing a layer's forward runs twice, the second time in the backward, right before
the layer's gradients are formed. That recomputation dequantizes each NF4 weight to multiply by it, and the
backward dequantizes it again for dL/dx = g W. Switched on (``Llama.keep_dequantized``, ``train.py
--keep-dequantized``), the recomputation keeps each copy whose dL/dx the backward will form, and the backward
takes it: per layer and step 14 dequantizations instead of up to 20 (down, a layer's last projection, is not
multiplied again in the recomputation, so its copy is made in the backward as before). The price: those six
copies held from the recomputation until the backward uses each, about 0.3 GB at the Llama-2-7B shape in
bf16. The values are the same either way (dequantizing is exact and deterministic).

That relies on torch's checkpoint stopping the recomputation once it has saved again what the backward
keeps (its default, "early stop"), which ends it before down's frozen matmul. Without the early stop the
plain LoRA path's recomputation multiplies by down's weight too and keeps that copy, but in vain: down's frozen
matmul saves nothing, so its backward ran before the recomputation. Whatever no backward took is let go when
the backward ends.

A recomputation's outputs are never read, only what it saves for the backward (``recomputing``): a node that
saves nothing, or only its inputs, may skip its work there (the MLP in chunks, ``bailong.memory.ChunkedMLP``;
on the fused LoRA path down's frozen matmul, ``bailong.lora_fused.FrozenAddmm``, with or without the early
stop). And within ``dequantized_once`` a weight is dequantized once for every matmul by it (the chunks of that
MLP, forward and backward).

All of this is the process's, not a thread's: one forward or backward at a time (as DDP runs, a process a
device; not ``nn.DataParallel``'s threads).
"""
import contextlib

import torch

_kept = {}  # id of an NF4Tensor -> (that NF4Tensor, its dequantized copy), until a backward takes it
_keeping = False  # inside a recomputation that keeps its copies
_recomputing = False  # inside a forward whose outputs no one reads (``recomputing``)
_once = None  # inside ``dequantized_once``: id of an NF4Tensor -> (that NF4Tensor, its copy), made at first use


def recomputation(fn, keep=False):
    """``fn`` for ``torch.utils.checkpoint``, which calls it for the forward and again, in the backward, to
    recompute: the calls after the first run as recomputations (``recomputing``) and, with ``keep``, keep the
    NF4 weights they dequantize for the backward (``keeping``)."""
    calls = 0

    def run(*args, **kwargs):
        nonlocal calls
        calls += 1
        with recomputing(calls > 1), keeping(keep and calls > 1):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def recomputing(on=True):
    """Within: the forward running is a recomputation for a backward, whose outputs no one reads; only what
    its nodes save for the backward counts (``is_recomputing``)."""
    global _recomputing
    previous, _recomputing = _recomputing, on
    try:
        yield
    finally:
        _recomputing = previous


def is_recomputing() -> bool:
    """Whether the forward running is a recomputation (``recomputing``): a node may then return its output
    unfilled where nothing it saves depends on it."""
    return _recomputing


@contextlib.contextmanager
def dequantized_once():
    """Within: each NF4 weight is dequantized once, at its first use, and that copy serves every matmul by it
    in that dtype (forward and backward); let go at the end."""
    global _once
    previous, _once = _once, {}
    try:
        yield
    finally:
        _once = previous


@contextlib.contextmanager
def keeping(on=True):
    """Within: ``dequantized(..., keep=True)`` keeps its copy for the backward. A recomputation first lets go
    whatever the one before left untaken, and anything left when its backward ends is let go then."""
    global _keeping
    previous, _keeping = _keeping, on
    if on:
        _kept.clear()
        try:
            torch.autograd.Variable._execution_engine.queue_callback(_kept.clear)  # when this backward ends
        except RuntimeError:  # no backward running (a saved tensor unpacked by hand): nothing to wait for
            pass
    try:
        yield
    finally:
        _keeping = previous


def dequantized(q, dtype, dequantize, keep=False):
    """``dequantize(q, dtype)``, or the copy of q a recomputation kept, taken (the next dequantization of q
    after the recomputation, its backward's, takes it, and only that one), or within ``dequantized_once`` the
    copy made there. ``keep``: the input multiplied by q wants a gradient, so the backward will multiply by q
    again; inside a recomputation that keeps (``keeping``), the copy waits for it."""
    if _once is not None and (held := _once.get(id(q))) is not None and held[0] is q and held[1].dtype == dtype:
        return held[1]
    held = _kept.pop(id(q), None)
    if held is not None and held[0] is q and held[1].dtype == dtype:
        w = held[1]
    else:
        w = dequantize(q, dtype)
        if keep and _keeping:
            _kept[id(q)] = (q, w)
    if _once is not None:
        _once[id(q)] = (q, w)
    return w
