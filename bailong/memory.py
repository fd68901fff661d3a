"""Training in less GPU memory: the loss chunk by chunk, the MLP chunk by chunk, layer inputs and the
embedding's table kept in host memory, and LoRA gradients kept in bf16.

The chunked loss is on by default (``BAILONG_CHUNKED_LOSS=0`` or ``use_chunked_loss(False)`` switches it
off): with the fused LoRA and the layer kernels it makes the set timed fastest on an H200, 2.2x autograd's
tokens/s at a lower peak (``bench/bench_train.py``'s ours-all, docs/BENCHMARKS.md; its own share not timed
apart). The others are off by default: the chunked MLP (``BAILONG_CHUNKED_MLP=1`` or ``use_chunked_mlp()``)
saves memory at 0.81x the tokens/s there, the offload (``train.py --offload-activations``,
``Llama.offload``) saves it at the same speed but holds the layer inputs in pinned host memory,
``offload_embedding`` (``train.py --offload-embedding``) the embedding's table (not timed on a GPU), and
``BF16Grads`` (``train.py --bf16-grads``) keeps the projections' LoRA gradients in bf16 (not timed on a GPU).
``bailong.model`` calls them; each trains as the plain way does (tests/test_lora_fused.py, tests/test_model.py,
tests/test_bf16_grads.py).
"""
import collections
import weakref

import torch
import torch.nn.functional as F

from bailong.lora_casts import casts_kept
from bailong.recompute import (as_forward, autocast_as, dequantized_once, forward_state, is_recomputing,
                               nothing_saved, recomputing, replayed)
from bailong.switches import initial

_chunked_loss = initial("BAILONG_CHUNKED_LOSS")
LOSS_CHUNK_LOGITS = 1 << 24  # logits a chunk of chunked_cross_entropy: 64 MB in float32
_chunked_mlp = initial("BAILONG_CHUNKED_MLP")
MLP_CHUNK_VALUES = 1 << 24  # the MLP's intermediate values a chunk of ChunkedMLP: 32 MiB in bf16


def use_chunked_loss(flag=True) -> bool:
    """Compute the training loss chunk by chunk (True, ``chunked_cross_entropy``) or from the whole logits
    (False); returns the previous setting, to restore. On by default (``BAILONG_CHUNKED_LOSS=0`` switches it off)."""
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
                logits = head(part.view_as(part))  # not the leaf itself: hooks on the head's input
                if kernels:  # each row's loss, and over the logits their gradient: one launch
                    loss = kernels.cross_entropy_(logits.detach(), targets[i:i + chunk]).sum()
                    outputs, seeds = logits, logits.detach()
                else:
                    loss = F.cross_entropy(logits.float(), targets[i:i + chunk], ignore_index=-100, reduction="sum")
                    outputs, seeds = loss, None
                with autocast_as(h.device.type, None):  # the backward outside autocast, as autograd's own
                    grads = torch.autograd.grad(outputs, wanted, seeds)
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


def chunked_mlp_on() -> bool:
    """Whether the MLP runs chunk by chunk where it can (``use_chunked_mlp``)."""
    return _chunked_mlp


def use_chunked_mlp(flag=True) -> bool:
    """Run the MLP chunk by chunk over the tokens where a gradient is wanted (True, ``ChunkedMLP``) or whole
    (False); returns the previous setting, to restore. Off by default (``BAILONG_CHUNKED_MLP=1``): on an H200
    it saved 2% of a 7B step's peak at 8,192 tokens for 0.81x the tokens/s."""
    global _chunked_mlp
    previous, _chunked_mlp = _chunked_mlp, flag
    return previous


def chunked_mlp(mlp, x, residual, width, params):
    """``residual + mlp(x)`` chunk by chunk over the tokens (``ChunkedMLP``) where switched on
    (``use_chunked_mlp``), a gradient wanted and the tokens more than one chunk of about ``MLP_CHUNK_VALUES``
    intermediate values (``width`` a token); else None, and the caller runs the MLP whole. ``mlp(x, residual)``:
    the MLP on any rows of x, each row of its output from the same row of x alone; ``params``: its parameters."""
    if not (_chunked_mlp and torch.is_grad_enabled()):
        return None
    params = [p for p in params if p.requires_grad]
    tokens, most = x.numel() // x.shape[-1], max(1, MLP_CHUNK_VALUES // width)
    if tokens <= most or not (x.requires_grad or params):
        return None
    chunks = -(-tokens // most)
    return ChunkedMLP.apply(x, residual, mlp, -(-tokens // chunks), *params)  # chunks of equal size


class ChunkedMLP(torch.autograd.Function):
    """``residual + mlp(x)`` (in the residual's dtype), ``chunk`` tokens at a time both ways, so that the MLP's
    intermediate activations and their gradients exist for one chunk at a time: at Llama-2-7B's width each of
    them takes 172 MiB over a sequence of 8,192 in bf16, and SwiGLU's backward holds five at once.

    Kept for the backward: x. The backward runs each chunk's forward again, with the random state (dropout's
    masks) and autocast the forward had, then that chunk's backward, and returns the parameters' gradients summed
    over the chunks through this node (so distributed training sees one gradient a parameter; a hook set on a
    parameter itself, ``Tensor.register_hook``, runs once a chunk and once more on the sum). In a checkpointed
    layer the recomputation, which reads nothing of this node but the x it saves, skips the chunks
    (``bailong.recompute.is_recomputing``): the MLP runs twice a step, as unchunked, and the backward's forward
    skips down's frozen matmul too, whose output nothing reads (``bailong.lora_fused.FrozenAddmm``). Each NF4
    weight is dequantized once for all the chunks of the forward and once for those of the backward
    (``dequantized_once``; the price: the MLP's three weights in the compute dtype held meanwhile, 258 MiB at the
    7B shape in bf16), and the LoRA layers keep their compute-dtype copies across the chunks
    (``bailong.lora_casts.casts_kept``).
    """

    @staticmethod
    def forward(ctx, x, residual, mlp, chunk, *params):
        ctx.save_for_backward(x)
        ctx.mlp, ctx.chunk, ctx.params, ctx.state = mlp, chunk, params, forward_state(x)
        out = residual.new_empty(residual.shape)
        if is_recomputing():  # the layer's recomputation: only what the backward needs is wanted of this node
            return out
        with torch.enable_grad(), dequantized_once(), nothing_saved():  # as the backward will run it
            for x_part, r_part, out_part in zip(_rows(x, chunk), _rows(residual, chunk), _rows(out, chunk)):
                out_part.copy_(mlp(x_part.detach(), r_part.detach()).detach())
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        dx = x.new_empty(x.shape) if want_x else None
        params = [p for p, wanted in zip(ctx.params, ctx.needs_input_grad[4:]) if wanted]
        grads = [None] * len(params)
        with replayed(x, ctx.state), dequantized_once(), casts_kept():
            dx_parts = _rows(dx, ctx.chunk) if want_x else None
            for i, (x_part, g_part) in enumerate(zip(_rows(x, ctx.chunk), _rows(g, ctx.chunk))):
                x_part = x_part.detach().requires_grad_(want_x)
                # y's values are never read: g stands in for the residual (y is linear in it)
                with recomputing(), as_forward(x, ctx.state):
                    y = ctx.mlp(x_part.view_as(x_part), g_part)  # not the leaf itself: hooks on the MLP's input
                parts = torch.autograd.grad(y, [x_part] * want_x + params, g_part, allow_unused=True)
                if want_x:
                    dx_parts[i].copy_(parts[0])
                for j, grad in enumerate(parts[want_x:]):
                    if grad is not None:
                        grads[j] = grad if grads[j] is None else grads[j].add_(grad)
        grads = iter(grads)
        return (dx, g if ctx.needs_input_grad[1] else None, None, None,
                *(next(grads) if wanted else None for wanted in ctx.needs_input_grad[4:]))


def _rows(t, chunk):
    """The rows of t (all its dimensions but the last flattened: a view where t is contiguous), ``chunk`` at a
    time."""
    return t.reshape(-1, t.shape[-1]).split(chunk)


class OffloadedInput(torch.autograd.graph.saved_tensors_hooks):
    """Around a checkpointed layer's forward: its input ``x``, which activation checkpointing keeps for the
    recomputation, waits in (pinned) host memory instead of on the GPU until the backward reaches the layer,
    as Unsloth does; and so does anything else the layer keeps of x's shape and dtype (attention's output and
    x_2, where ``bailong.layer_fused`` keeps them). On CUDA both copies run on a side stream while the GPU goes
    on computing: the copy out as soon as a tensor is complete, and the copy back of the layer before's
    (``before``, its OffloadedInput: the backward needs them next) as soon as one of this layer's comes back, so
    that it overlaps this layer's recomputation and backward. Everything else kept (cos and sin, which every
    layer shares) stays where it is. Saves batch x sequence x hidden values a tensor: 64 MiB a sequence of
    8,192 at hidden 4,096 in bf16."""

    def __init__(self, x, before=None):
        shape, dtype = x.shape, x.dtype  # the hooks live as long as what they saved: they must not keep x itself
        self.saved = []  # weak references to the HostCopy of each tensor packed, for the next layer to fetch

        def pack(t):
            if t.shape != shape or t.dtype != dtype:
                return t
            saved = HostCopy(t)
            self.saved.append(weakref.ref(saved))
            return saved

        def unpack(packed):
            if not isinstance(packed, HostCopy):
                return packed
            packed.fetch()  # its own copy first (a no-op where fetched ahead), then the next ones
            for earlier in before.saved if before is not None else ():
                if (copy := earlier()) is not None:
                    copy.fetch()
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


def offload_embedding(model) -> int:
    """Keep the frozen input embedding's table in (pinned) host memory instead of on the GPU
    (``train.py --offload-embedding``): a step reads only its tokens' rows, so the ids are copied to the host,
    the rows gathered there and copied in (``bailong.quantized.embedding_rows``; a LoRA update is added on the
    device). Saves vocabulary x hidden values: 0.24 GiB at Llama 2's in bf16, 0.45 GiB at Bailong's
    59,241 pieces. Returns the bytes moved. The head cannot share the table (tied embeddings: refused), and
    the table must be frozen."""
    embed = model.model.embed_tokens
    w = embed.weight
    if w is model.lm_head.weight:
        raise ValueError("the embedding is tied to the head, which needs it on the device: it cannot be offloaded")
    if w.requires_grad:
        raise ValueError("the embedding is trained: only a frozen one can be offloaded")
    host = torch.empty(w.shape, dtype=w.dtype, pin_memory=w.is_cuda)  # (on the CPU: a copy, as HostCopy's)
    embed.weight = torch.nn.Parameter(host.copy_(w), requires_grad=False)
    return host.numel() * host.element_size()


class BF16Grads:
    """The projections' LoRA gradients kept in bf16 from the backward to the optimizer's step: 2 bytes a
    trained weight instead of float32's 4 at the backward's end, where every gradient is alive and where a
    step's memory peaks once the LoRA casts are made by layer (``bailong.lora_casts.use_casts_by_layer``) or the
    layer inputs offloaded (``train.py --bf16-grads``).

    Lossless when training runs in bf16 with one micro-batch a step: a projection's LoRA gradients are then
    one bf16 product each (a bf16 matmul's result, widened to the float32 master's dtype, on the fused path
    and through autograd alike), so the bf16 copy holds all of them and the step is the one float32
    gradients give, bit for bit (tests/test_bf16_grads.py). As a gradient lands (a hook after its
    accumulation) it is narrowed and the float32 one let go; ``step`` clips every gradient by their global
    norm as ``torch.nn.utils.clip_grad_norm_`` does, then steps the optimizer a group of weights at a time,
    each group's gradients widened only for its turn. With several micro-batches a step, the running sum is
    rounded to bf16 after each (within 2^-9 of it). The embedding's and the head's LoRA weights (few; the
    head's gradient is a sum over the chunked loss's chunks) keep float32 gradients.
    """
    GROUP_BYTES = 1 << 27  # the float32 gradients widened for one call of the optimizer's step: 128 MiB

    def __init__(self, model):
        from bailong.lora import LoRALinear
        self.params = [p for m in model.modules() if isinstance(m, LoRALinear) and m is not model.lm_head
                       for p in (m.lora_A.weight, m.lora_B.weight) if p.requires_grad]
        self.kept = {}  # parameter -> its gradient in bf16
        self.scale = None  # clip's, for the kept gradients at the step
        self.hooks = [p.register_post_accumulate_grad_hook(self._narrow) for p in self.params]

    @property
    def saved_bytes(self) -> int:
        """What the gradients it keeps take less than in float32: 2 bytes each."""
        return 2 * sum(p.numel() for p in self.params)

    def _narrow(self, p):
        grad, p.grad = p.grad, None
        before = self.kept.get(p)
        self.kept[p] = (grad if before is None else before + grad).to(torch.bfloat16)  # a sum in float32

    def remove(self):
        """Take the hooks off: gradients stay float32 again."""
        for hook in self.hooks:
            hook.remove()

    @torch.no_grad()
    def clip(self, params, max_norm):
        """Clip the gradients of ``params`` (kept here, or in ``.grad``) to the global norm ``max_norm`` as
        ``clip_grad_norm_`` does: those in ``.grad`` now, the kept ones as ``step`` widens them. Returns their norm
        (read it before stepping: a norm that is not finite makes every gradient NaN)."""
        grads = [g for p in params if (g := self.kept.get(p, p.grad)) is not None]
        norms = [None] * len(grads)  # each gradient's, in float32, stacked in the order clip_grad_norm_ does
        for dtype in {g.dtype for g in grads}:
            at = [i for i, g in enumerate(grads) if g.dtype == dtype]
            for i, n in zip(at, torch._foreach_norm([grads[i] for i in at], 2.0, dtype=torch.float32)):
                norms[i] = n
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        self.scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.scale)
        return norm

    @torch.no_grad()
    def step(self, optimizer, params, max_norm=None):
        """Step ``optimizer`` over ``params``' gradients, clipped first to the global norm ``max_norm`` where it is
        given (else as ``clip`` left them, or not at all), a group of weights at a time, and let them all go.
        Returns their norm where ``max_norm`` is given."""
        norm = self.clip(params, max_norm) if max_norm is not None else None
        scale, self.scale = self.scale, None
        narrowed = collections.deque((p, g) for p in params if p.grad is None and (g := self.kept.get(p)) is not None)
        self.kept = {}
        while True:  # the gradients in .grad step in the first call, beside the first group of the narrowed ones
            size = 0
            while narrowed and (size == 0 or size + 4 * narrowed[0][0].numel() <= self.GROUP_BYTES):
                p, g = narrowed.popleft()
                p.grad = g.to(p.dtype) if scale is None else g.to(p.dtype).mul_(scale)
                size += 4 * p.numel()
            optimizer.step()
            for p in params:
                p.grad = None
            if not narrowed:
                return norm
