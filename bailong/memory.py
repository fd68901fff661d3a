"""Training in less GPU memory: the loss chunk by chunk, and layer inputs kept in host memory.

Both are off by default until timed on a GPU (``bench/bench_train.py``): the chunked loss with
``BAILONG_CHUNKED_LOSS=1`` or ``use_chunked_loss()``, the offload with ``train.py --offload-activations``
(``Llama.offload``). ``bailong.model`` calls them; each trains as the plain way does (tests/test_lora_fused.py,
tests/test_model.py).
"""
import os
import weakref

import torch
import torch.nn.functional as F

_chunked_loss = os.environ.get("BAILONG_CHUNKED_LOSS", "0") not in ("", "0")
LOSS_CHUNK_LOGITS = 1 << 24  # logits a chunk of chunked_cross_entropy: 64 MB in float32


def use_chunked_loss(flag=True) -> bool:
    """Compute the training loss chunk by chunk (True, ``chunked_cross_entropy``) or from the whole logits
    (False); returns the previous setting, to restore. Off until timed on a GPU (``BAILONG_CHUNKED_LOSS=1``)."""
    global _chunked_loss
    previous, _chunked_loss = _chunked_loss, flag
    return previous


def summed_loss(h, head, targets, kernels=None):
    """The summed cross-entropy of ``head(h)`` (float32 logits) against ``targets`` (-100: no loss): from the
    whole logits, or switched on (``use_chunked_loss``), chunk by chunk. ``kernels``: the training layer
    kernels' module where they run (``bailong.model.layer_kernels``), for the chunks' cross-entropy."""
    if _chunked_loss:
        return chunked_cross_entropy(h, head, targets, kernels=kernels)
    return F.cross_entropy(head(h).float(), targets, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(h, head, targets, chunk=None, kernels=None):
    """Summed cross-entropy of ``head(h)`` (float32 logits) against ``targets`` (-100: no loss), ``chunk``
    rows at a time (default: about 16M logits a chunk), so that the whole logits and their gradient
    never exist at once: at Bailong's vocabulary and 2,048 tokens they would take 485 MB each.

    With gradients wanted, the head's backward runs chunk by chunk inside the forward: the loss ends the
    graph, so each chunk's gradients are known up to the one number the backward brings (``ChunkedLoss``).
    """
    chunk = chunk or max(1, LOSS_CHUNK_LOGITS // head.out_features)
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (h.requires_grad or params):
        return ChunkedLoss.apply(h, targets, head, chunk, kernels, *params)
    return sum(F.cross_entropy(head(h[i:i + chunk]).float(), targets[i:i + chunk], ignore_index=-100,
                               reduction="sum") for i in range(0, len(h), chunk))


class ChunkedLoss(torch.autograd.Function):
    """``chunked_cross_entropy`` with gradients: the forward keeps dL/dh and the head's parameter
    gradients (one chunk's logits alive at a time, none kept), the backward scales them. With the
    training layer kernels, a chunk's loss and the gradient of its logits are one launch."""

    @staticmethod
    def forward(ctx, h, targets, head, chunk, kernels, *params):
        total = torch.zeros((), device=h.device)
        dh = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        dparams = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for i in range(0, len(h), chunk):
                part = h[i:i + chunk].detach().requires_grad_(dh is not None)
                wanted = ([part] if dh is not None else []) + list(params)
                logits = head(part)
                if kernels:  # each row's loss, and over the logits their gradient: one launch
                    loss = kernels.cross_entropy_(logits.detach(), targets[i:i + chunk]).sum()
                    grads = torch.autograd.grad(logits, wanted, logits.detach())
                else:
                    loss = F.cross_entropy(logits.float(), targets[i:i + chunk], ignore_index=-100, reduction="sum")
                    grads = torch.autograd.grad(loss, wanted)
                if dh is not None:
                    dh[i:i + chunk] = grads[0]
                for total_grad, grad in zip(dparams, grads[dh is not None:]):
                    total_grad += grad
                total += loss.detach()
        ctx.save_for_backward(dh, *dparams)
        return total

    @staticmethod
    def backward(ctx, g):
        dh, *dparams = ctx.saved_tensors
        return (None if dh is None else dh * g), None, None, None, None, *(d * g for d in dparams)


class OffloadedInput(torch.autograd.graph.saved_tensors_hooks):
    """Around a checkpointed layer's forward: its input ``x``, which activation checkpointing keeps for the
    recomputation, waits in (pinned) host memory instead of on the GPU until the backward reaches the layer,
    as Unsloth does. On CUDA both copies run on a side stream while the GPU goes on computing: the copy out
    as soon as x is complete, and the copy back of the layer before (``before``, its OffloadedInput: the
    backward needs it next) as soon as this layer's input comes back, so that it overlaps this layer's
    recomputation and backward. Everything else kept (cos and sin, which every layer shares) stays where it
    is. Saves batch x sequence x hidden values a layer: 64 MiB a sequence of 8,192 at hidden 4,096 in bf16."""

    def __init__(self, x, before=None):
        x = weakref.ref(x)  # the hooks live as long as what they saved: they must not keep x themselves
        self.saved = lambda: None  # a weak reference to the HostCopy of x once packed, for the next layer to fetch

        def pack(t):
            if t is not x():
                return t
            saved = HostCopy(t)
            self.saved = weakref.ref(saved)
            return saved

        def unpack(packed):
            if not isinstance(packed, HostCopy):
                return packed
            packed.fetch()  # its own copy first (a no-op where fetched ahead), then the next one's
            if before is not None and (earlier := before.saved()) is not None:
                earlier.fetch()
            return packed.take()

        super().__init__(pack, unpack)


class HostCopy:
    """A tensor's copy in (pinned) host memory, and on the way back its copy on the device."""
    side_streams = {}  # one per CUDA device, for the copies both ways
    __slots__ = ("__weakref__", "back", "device", "host")

    def __init__(self, t):
        self.device, self.back = t.device, None
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        if not t.is_cuda:
            self.host.copy_(t)
            return
        side = self.side_stream()
        side.wait_stream(torch.cuda.current_stream(t.device))  # t is complete
        with torch.cuda.stream(side):
            self.host.copy_(t, non_blocking=True)
        t.record_stream(side)  # its GPU memory is not handed out again before the copy is done

    def side_stream(self):
        if self.device not in self.side_streams:
            self.side_streams[self.device] = torch.cuda.Stream(self.device)
        return self.side_streams[self.device]

    def fetch(self):
        """Start the copy back to the device (once): on CUDA it runs on the side stream, apart from the
        computation. Returns the device tensor and the event that marks it complete (None on the CPU)."""
        if self.back is None:
            if self.device.type != "cuda":
                self.back = self.host.to(self.device), None
            else:
                side = self.side_stream()
                with torch.cuda.stream(side):  # after the copy out, queued on the same stream
                    t = self.host.to(self.device, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(side)
                self.back = t, done
        return self.back

    def take(self):
        """The tensor on its device, for the current stream to use (fetched now if no one fetched it ahead)."""
        t, done = self.fetch()
        self.back = None  # held on the device only until taken
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            t.record_stream(current)  # made on the side stream: not handed out again before the current one is done
        return t
