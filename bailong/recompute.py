"""What a checkpointed layer's recomputation can leave for its backward, and what it need not compute.

With activation checkpointing a layer's forward runs twice, the second time in the backward, right before
the layer's gradients are formed. That recomputation dequantizes each NF4 weight to multiply by it, and the
backward dequantizes it again for dL/dx = g W. Switched on (``Llama.keep_dequantized``, ``train.py
--keep-dequantized``), the recomputation keeps each copy whose dL/dx the backward will form, and the backward
takes it: per layer and step 14 dequantizations instead of up to 20 (down, a layer's last projection, is not
multiplied again in the recomputation, so its copy is made in the backward as before). The price: those six
copies held from the recomputation until the backward uses each, about 0.3 GB at the Llama-2-7B shape in
bf16. The values are the same either way (dequantizing is exact and deterministic).

On the plain LoRA path that relies on torch's checkpoint stopping the recomputation once it has saved again
what the backward keeps (its default, "early stop"), which ends it before down's frozen matmul (the fused
path's down skips that matmul itself, below). Without the early stop the plain LoRA path's recomputation
multiplies by down's weight too and keeps that copy, but in vain: down's frozen matmul saves nothing, so its
backward ran before the recomputation. Whatever no backward took is let go when the backward ends.

A recomputation's outputs are never read, only what it saves for the backward (``recomputing``): a node whose
output nothing saved depends on (a layer's last) may skip its work there (the MLP in chunks,
``bailong.memory.ChunkedMLP``; on the fused LoRA path down's frozen matmul, ``bailong.lora_fused.FrozenAddmm``,
with or without the early stop), but keeps what its own backward needs. And within ``dequantized_once`` a
weight is dequantized once for every matmul by it (the chunks of that MLP, forward and backward).

On the fused LoRA path a checkpointed layer is one autograd node of its own (``Recomputed``), whose backward
runs the recomputation and then the backward through the nodes it built: about a tenth less host time a layer
than torch's checkpoint (``bench/bench_host.py``); elsewhere torch's checkpoint (``checkpoint``). With the
layer kernels too, the layer's insides are written out by hand instead (``bailong.layer_fused``), on the same
random state, autocast and kept copies as here.

All of this is the process's, not a thread's: one forward or backward at a time (as DDP runs, a process a
device; not ``nn.DataParallel``'s threads).
"""
import contextlib
import operator

import torch
import torch.utils.checkpoint

_kept = {}  # id of an NF4Tensor (a tuple of ids for a tuple) -> (it, its dequantized copy), till a backward takes it
_keeping = False  # inside a recomputation that keeps its copies
_recomputing = False  # inside a forward whose outputs no one reads (``recomputing``)
_once = None  # inside ``dequantized_once``: as ``_kept``, the copies made at first use
_seeds = None  # the MaskSeeds of the model's forward running (``mask_seeds``)


def checkpoint(layer, x, args, keep=False, own=False):
    """``layer(x, *args)`` with activation checkpointing: only x kept for the backward, which runs the layer's
    forward again (a recomputation, ``recomputing``; with ``keep`` it keeps the NF4 copies it dequantizes for
    the backward, ``keeping``), then its backward. ``own``: as one autograd node (``Recomputed``), for a layer
    whose last frozen matmul skips itself in a recomputation (the fused LoRA path's down, ``FrozenAddmm``:
    ``bailong.lora.frozen_matmul_skipped``); else by torch's checkpoint, whose early stop ends the
    recomputation before the plain path's down. ``args`` want no gradient (cos, sin, positions, ...)."""
    assert not any(torch.is_tensor(a) and a.requires_grad for a in args), "checkpoint: args want no gradient"
    if own:
        return Recomputed.apply(layer, keep, args, x, *(p for p in layer.parameters() if p.requires_grad))
    return torch.utils.checkpoint.checkpoint(recomputation(layer, keep), x, *args, use_reentrant=False,
                                             preserve_rng_state=not capturing(x))


class Recomputed(torch.autograd.Function):
    """A checkpointed layer as one autograd node: ``layer(x, *args)``, with only x kept for the backward (and
    the random state and autocast the forward ran under). The backward runs the layer's forward again with
    them (a recomputation: dropout draws the same masks), then its backward, and returns dL/dx and the
    gradients of the layer's trained parameters through this node, as ``bailong.memory.ChunkedMLP`` does
    (distributed training sees one gradient a parameter; a hook set on a parameter itself,
    ``Tensor.register_hook``, runs twice: in the layer's backward and as this node hands the gradient on; and
    ``torch.autograd.grad`` of some of a layer's parameters forms them all). On the host it costs less than
    torch's checkpoint, whose hooks handle each tensor the layer saves, twice (``bench/bench_host.py``); but
    the whole layer runs again, where torch's checkpoint stops once the backward has all it keeps: a layer's
    last frozen matmul, whose output nothing saved reads, must skip itself (``is_recomputing``)."""

    @staticmethod
    def forward(ctx, layer, keep, args, x, *params):
        ctx.save_for_backward(x)
        ctx.layer, ctx.keep, ctx.args, ctx.params, ctx.state = layer, keep, args, params, forward_state(x)
        with torch.enable_grad(), nothing_saved():  # the training path, as the backward will run it
            return layer(x.detach(), *args).detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, = ctx.saved_tensors
        want_x = ctx.needs_input_grad[3]
        params = [p for p, wanted in zip(ctx.params, ctx.needs_input_grad[4:]) if wanted]
        with replayed(x, ctx.state):
            x_ = x.detach().requires_grad_(want_x)
            with recomputing(), keeping(ctx.keep), as_forward(x, ctx.state):
                y = ctx.layer(x_.view_as(x_), *ctx.args)  # not the leaf itself: hooks on the layer's input
            grads = iter(torch.autograd.grad(y, [x_] * want_x + params, g, allow_unused=True))
        dx = next(grads) if want_x else None
        return None, None, None, dx, *(next(grads) if wanted else None for wanted in ctx.needs_input_grad[4:])


def forward_state(x):
    """What a forward ran under that a replay of it needs (``replayed``, ``as_forward``): the random states
    (CPU, and x's CUDA device, not while a CUDA graph is captured: ``capturing``; and where LoRA dropout's kernels
    take their next key, ``MaskSeeds``) and the autocast dtype (None: off)."""
    device = x.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    random = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda and not capturing(x) else None,
              keys_taken())
    return random, torch.get_autocast_dtype(device) if on else None


def capturing(x) -> bool:
    """Whether x's CUDA stream is being captured into a CUDA graph (``bailong.step_graph``). A checkpointed
    layer then neither reads nor restores the CUDA generator's state, here and in torch's checkpoint: many
    torch versions refuse that read inside a capture, and a replay would not restore it; a captured step's
    only masks are LoRA dropout's kernels', which find their keys again without it (``MaskSeeds``)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def replayed(x, state):
    """Within: gradients on and the random states a forward had (``forward_state``), to run it again alike; the
    random states after it as before it. Its autocast: ``as_forward``, around the recomputation alone."""
    cpu, device_state, taken = state[0]
    with torch.random.fork_rng(devices=[x.device] if device_state is not None else []), torch.enable_grad(), \
            _keys_again(taken):
        torch.set_rng_state(cpu)
        if device_state is not None:
            torch.cuda.set_rng_state(device_state, x.device)
        yield


def keys_taken():
    """Where LoRA dropout's kernels take their next key (``MaskSeeds``): the forward's seeds and their count now,
    for a recomputation to take them again (``_keys_again``); None outside a forward of the model."""
    return None if _seeds is None else (_seeds, _seeds.used)


@contextlib.contextmanager
def _keys_again(taken):
    """Within: LoRA dropout's kernels take the keys a forward took, ``taken`` = (its ``MaskSeeds``, their count
    when it started: ``keys_taken``), or None: seeds of their own."""
    global _seeds
    seeds, used = taken or (None, 0)
    previous, _seeds = _seeds, seeds
    count = seeds.used if seeds is not None else 0
    if seeds is not None:
        seeds.used = used
    try:
        yield
    finally:
        if seeds is not None:
            seeds.used = count
        _seeds = previous


class MaskSeeds:
    """Where LoRA dropout's kernels (``bailong_kernels.dropout``) take the keys of their masks in one forward of
    the model (``mask_seeds``): one seed, a random int64 drawn on the device when the first mask is, and the
    Philox counters handed out from it so far, each mask's own. A checkpointed layer's recomputation counts from
    where its forward started (``forward_state``, ``replayed``), so it takes the forward's keys and draws the
    forward's masks, with nothing random read or restored on the host. So a CUDA graph can hold a step with LoRA
    dropout (``bailong.step_graph``): the seed's draw is captured as one of torch's random kernels, which draw
    anew at each replay (torch advances the generator's offset at each), and everything after reads it on the
    device. One launch a forward, where reading the generator on the host took none."""

    def __init__(self):
        self.seed, self.used = None, 0

    def key(self, x, counters):
        """(seed, first counter) for ``counters`` Philox counters of masks for x: the next ones of the seed."""
        if self.seed is None:
            self.seed = torch.randint(2**63 - 1, (1,), device=x.device)  # below 2^63: the kernels read int64
        first, self.used = self.used, self.used + counters
        return self.seed, first


@contextlib.contextmanager
def mask_seeds():
    """Within: LoRA dropout's kernels take their keys from one ``MaskSeeds`` (a forward of the model)."""
    global _seeds
    previous, _seeds = _seeds, MaskSeeds()
    try:
        yield
    finally:
        _seeds = previous


def mask_key(x, counters):
    """The key of LoRA dropout's next masks for x on the kernels' path, ``counters`` Philox counters: from the
    forward's seed (``mask_seeds``), or outside a forward of the model from a seed of their own, which a
    recomputation draws again from the random state restored (not inside a CUDA graph)."""
    return (MaskSeeds() if _seeds is None else _seeds).key(x, counters)


def as_forward(x, state):
    """Autocast as a forward had it (``forward_state``), for its recomputation. The backward through that runs
    outside it, as autograd's own backward does: under CUDA's autocast ``sum`` and other reductions return
    float32 (CPU's keep bf16)."""
    return autocast_as(x.device.type, state[1])


def autocast_as(device, dtype):
    """Autocast on ``device`` in ``dtype``, or off (None); nothing on a device without autocast (meta)."""
    if not torch.amp.is_autocast_available(device):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def nothing_saved():
    """Saved-tensor hooks that keep nothing, over any set around: for a forward that no backward will run
    through, whose saved tensors would otherwise pass through those hooks (a checkpoint's count of what the
    layer saves, an offload's) and, where an op saves its own output, never be freed (a cycle through the
    graph, which Python's collector does not see)."""
    return torch.autograd.graph.saved_tensors_hooks(_nothing, _never)


def _nothing(t):
    return None


def _never(packed):
    raise RuntimeError("bailong.recompute: a forward ran without keeping anything for a backward")


def recomputation(fn, keep=False):
    """``fn`` for ``torch.utils.checkpoint``, which calls it for the forward and again, in the backward, to
    recompute: the calls after the first run as recomputations (``recomputing``), with the keys of LoRA
    dropout's masks the first took (``MaskSeeds``; torch's checkpoint restores the random states) and, with
    ``keep``, keep the NF4 weights they dequantize for the backward (``keeping``)."""
    calls, taken = 0, None

    def run(*args, **kwargs):
        nonlocal calls, taken
        calls += 1
        if calls == 1:
            taken = keys_taken()
        with recomputing(calls > 1), keeping(keep and calls > 1), \
                _keys_again(taken) if calls > 1 else contextlib.nullcontext():
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
    unfilled where nothing saved depends on it (a layer's last), but keeps all its own backward needs (a
    ``Recomputed`` layer's backward runs through the recomputation's nodes)."""
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


def forget_kept():
    """Let go the copies recomputations kept for backwards that did not take them: after a CUDA graph's capture
    that failed inside a backward (``bailong.step_graph``), whose copies hold nothing (a capture runs nothing)."""
    _kept.clear()


def dequantized(q, dtype, dequantize, keep=False):
    """``dequantize(q, dtype)``, or the copy of q a recomputation kept, taken (the next dequantization of q
    after the recomputation, its backward's, takes it, and only that one), or within ``dequantized_once`` the
    copy made there. ``keep``: the input multiplied by q wants a gradient, so the backward will multiply by q
    again; inside a recomputation that keeps (``keeping``), the copy waits for it. ``q``: an NF4Tensor, or a
    tuple of them that one matmul multiplies by (q, k and v), dequantized, kept and found as one."""
    key = _key(q)
    if _once is not None and (held := _once.get(key)) is not None and _same(held[0], q) and held[1].dtype == dtype:
        return held[1]
    held = _kept.pop(key, None)
    if held is not None and _same(held[0], q) and held[1].dtype == dtype:
        w = held[1]
    else:
        w = dequantize(q, dtype)
        if keep and _keeping:
            _kept[key] = (q, w)
    if _once is not None:
        _once[key] = (q, w)
    return w


def is_held(q, dtype) -> bool:
    """Whether ``dequantized`` would find q's copy in ``dtype`` (kept by a recomputation, or made within
    ``dequantized_once``) rather than dequantize it."""
    key = _key(q)
    return any(held is not None and key in held and _same(held[key][0], q) and held[key][1].dtype == dtype
               for held in (_kept, _once))


def _key(q):
    return tuple(map(id, q)) if isinstance(q, tuple) else id(q)


def _same(a, b) -> bool:
    """Whether a and b are the same NF4Tensor, or tuples of the same ones (an id is reused once its object is gone,
    so the key alone does not tell)."""
    return a is b or isinstance(a, tuple) and len(a) == len(b) and all(map(operator.is_, a, b))
