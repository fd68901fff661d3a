"""The LoRA weights' copies in the compute dtype ("casts") on the fused path.

A LoRA layer trains float32 masters A and B, but its projection multiplies in the
compute dtype (bf16). Casting them at every call would be a kernel per matrix and
call, and again in activation checkpointing's recomputation; instead each layer
keeps its copies while its masters are unchanged (``cast``), all of a model's LoRA
layers are cast together in one multi-tensor copy (``group_casts``), and each
layer's backward lets its copies go (``release``), so that they are not held at the
backward's end beside every LoRA gradient. Made a decoder layer at a time instead
(``use_casts_by_layer``, ``train.py --casts-by-layer``), a layer's copies go after
its forward and are made again in its recomputation: less held at the backward's
start, for a second cast a step. A model's forward never takes copies made before
it began (``new_forward``): masters changed through ``.data``, as hand-written
updates do, change no version counter.
"""
import contextlib
import itertools
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from bailong.lora_fused import one_at_a_time

_by_layer = False  # the compute-dtype casts made a decoder layer at a time (``use_casts_by_layer``)
_LORA_LINEARS = weakref.WeakSet()  # every LoRA layer in the process, for ``forget_casts``
_renewals = 0  # optimizer steps and training forwards in this process: casts made before one are made again
_releases = None  # inside casts_kept: the layers whose release waits for its end


class Casts:
    """A LoRA layer's copies of A and B in the compute dtype (``cast``) and the key they were made under; in
    the first of layers that read the same input (``LoRALinear.shared``), their A's side by side too. Kept
    apart from the module: setting a module's attribute goes through ``nn.Module.__setattr__``, microseconds
    each time, a few dozen times a layer and step."""
    __slots__ = ("weights", "key", "shared_A", "shared_key", "peers", "model")

    def __init__(self, layer=None):
        self.peers = self.model = None  # weak references to its decoder layer's and model's LoRA layers
        self.clear()
        if layer is not None:
            _LORA_LINEARS.add(layer)

    def clear(self):
        self.weights = self.key = self.shared_A = self.shared_key = None

    def __reduce__(self):  # a cache: a copied or pickled model starts with an empty one, and no groups (each
        return Casts, ()  # of its LoRA layers is then cast alone, until ``group_casts``)


def _version(layer, dtype):
    A, B = layer.lora_A.weight, layer.lora_B.weight
    return _renewals, A._version, B._version, A.data_ptr(), B.data_ptr(), dtype


def cast(layer, dtype):
    """A LoRA layer's A and B in the compute dtype, cast once for as long as the float32 masters are
    unchanged: not once per call, nor again when activation checkpointing recomputes the forward. Any
    optimizer's step (fused ones too, which leave the version counters alone) or in-place change renews them,
    for every trainable LoRA layer of its model on the device at once (``group_casts``): one multi-tensor
    copy, not a cast per matrix, a decoder layer's A's side by side in one buffer (``stacked``). By layer
    (``use_casts_by_layer``): for those of its decoder layer."""
    if layer.casts.key != _version(layer, dtype):
        _LORA_LINEARS.add(layer)  # a copy of a model was made without __init__
        device = layer.lora_A.weight.device
        group = layer.casts.peers if _by_layer else layer.casts.model
        together = [m() for m in group or [weakref.ref(layer)]]
        stale = [m for m in together if m is layer or m is not None and m.lora_A.weight.requires_grad and
                 m.lora_A.weight.device == device and m.casts.key != _version(m, dtype)]
        for m in stale:  # the old copies go first, so that the new ones can take their memory
            m.casts.clear()
        As = []  # a decoder layer's A's one after another in one buffer (q/k/v's, gate/up's stacked are views);
        for _, run in itertools.groupby(stale, key=lambda m: id(m.casts.peers or m)):  # others', one each
            run = list(run)
            sizes = [m.lora_A.weight.numel() for m in run]
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            As += [part.view(m.lora_A.weight.shape) for m, part in zip(run, flat.split(sizes))]
        masters = [w for m in stale for w in (m.lora_A.weight, m.lora_B.weight)]
        casts = [t for m, A in zip(stale, As) for t in (A, torch.empty_like(m.lora_B.weight, dtype=dtype))]
        with torch.no_grad():
            torch._foreach_copy_(casts, masters)
        for i, m in enumerate(stale):
            m.casts.weights, m.casts.key = (casts[2 * i], casts[2 * i + 1]), _version(m, dtype)
    return layer.casts.weights


def stacked(As):
    """``torch.cat(As)``, the A's of layers that read one input (q/k/v; gate/up) stacked: a view where they
    lie one after another in one buffer, as ``cast`` makes a decoder layer's; else a copy."""
    end = As[0].data_ptr()
    for A in As:
        if not (A.is_contiguous() and A.shape[1:] == As[0].shape[1:] and A.data_ptr() == end
                and A.untyped_storage().data_ptr() == As[0].untyped_storage().data_ptr()):
            return torch.cat(As)
        end += A.numel() * A.element_size()
    return As[0].as_strided((sum(len(A) for A in As), *As[0].shape[1:]), As[0].stride())


def release(layer):
    """Let a LoRA layer's compute-dtype copies go, once its backward has used them: they go as the backward
    passes each layer, so that at its end they are not held beside every LoRA gradient (where a step's memory
    peaks: 2 bytes a LoRA weight, 0.61 GiB in the Llama-2-7B recipe); the next forward casts again, all layers
    at once, as after an optimizer step. Within ``casts_kept``, at its end."""
    if _releases is not None:
        _releases.append(layer)
        return
    layer.casts.clear()


def group_casts(model):
    """Make ``model``'s LoRA layers' casts together (``cast``): all of them, or by layer (``use_casts_by_layer``)
    a decoder layer's; not another model's. Weak references: no cycle."""
    everyone = tuple(weakref.ref(m) for m in model.modules() if isinstance(getattr(m, "casts", None), Casts))
    for ref in everyone:
        ref().casts.model = everyone
    for layer in getattr(getattr(model, "model", None), "layers", ()):
        peers = tuple(weakref.ref(m) for m in layer.modules() if isinstance(getattr(m, "casts", None), Casts))
        for ref in peers:  # one tuple a decoder layer: ``cast`` tells its layers' A's apart by it
            ref().casts.peers = peers
    return model


def new_forward(*_):
    """A model's forward with a gradient begins (``Llama.hidden_states``), or an optimizer has stepped (it may have
    changed LoRA weights, fused ones leaving the version counters alone): casts made before are made again.
    Within a forward and its backward they are kept (the recomputation's), but a forward never takes the last
    one's: masters changed through ``.data`` (a hand-written update, an average of weights copied in) change no
    version counter."""
    global _renewals
    _renewals += 1


register_optimizer_step_post_hook(new_forward)


def forget_casts():
    """Let every LoRA layer's compute-dtype copies go, to be made at the next forward: after a CUDA graph's
    capture (``bailong.step_graph``), whose copies are the graph's, made only by its replays (a capture runs
    nothing)."""
    for m in list(_LORA_LINEARS):
        m.casts.clear()


@contextlib.contextmanager
def casts_kept():
    """Within, a layer's backward keeps its compute-dtype copies (``release`` waits for the end): for a
    backward that runs the same layers' forward and backward again chunk by chunk
    (``bailong.memory.ChunkedMLP``), whose next chunk would otherwise cast anew, and with it every layer the
    backward has already passed."""
    global _releases
    if _releases is not None:  # inside another: that one's end
        yield
        return
    _releases = []
    try:
        yield
    finally:
        waiting, _releases = _releases, None
        for m in waiting:
            release(m)


def use_casts_by_layer(flag=True) -> bool:
    """Make the fused path's LoRA casts a decoder layer at a time (True) or all at once for the step (False,
    the default), and a shared node's backward dequantize one weight at a time (``one_at_a_time``); returns the
    previous setting. With checkpointing (``train.py --casts-by-layer``) a layer's casts go after its forward
    (``let_casts_go``), made again in its recomputation: 0.59 GiB less at the 7B recipe's backward start, its
    peak with bf16 gradients (``BF16Grads``) 8.84 -> 8.29 GiB, counted. Not timed on a GPU."""
    global _by_layer
    previous, _by_layer = _by_layer, flag
    one_at_a_time(flag)  # and the backward's shared weights dequantized one at a time: a layer's least held
    return previous


def let_casts_go(layer):
    """With casts made by layer (``use_casts_by_layer``), after a checkpointed decoder ``layer``'s forward: let
    its LoRA layers' copies go, for its recomputation to make again."""
    if _by_layer:
        for m in layer.modules():
            if isinstance(getattr(m, "casts", None), Casts):
                release(m)
