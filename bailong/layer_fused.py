"""A checkpointed decoder layer whose forward and backward are written out by hand, as one autograd node.

On the GPU's fastest training path (fused LoRA, the training layer kernels,
activation checkpointing) a layer's work is some 110 kernels a step, and at
batch 1 the host's time to issue them, not the GPU's to run them, sets the
pace (docs/BENCHMARKS.md, "The host's share"). Much of that time is autograd's
own: a node built for every projection, norm and RoPE in the forward, again in
the recomputation, and the engine walking them in the backward. Here the layer
is one node (``FusedLayer``), as ``bailong.recompute.Recomputed`` makes it,
but inside it nothing is recorded: the forward calls each node's own forward
(``LoRAShared``, ``LoRAProjection``, the kernels' ``RMSNormFunction`` and
``SwiGLUFunction``; RoPE in place, ``rope_``) with a plain context (``Ctx``), and
the backward runs the recomputation the same way, then calls their backwards in
reverse order, the norms' kernels adding the residual stream's gradients. Only
attention goes through autograd, one node (whichever SDPA kernel torch picks,
with its own backward), unless its output is kept (``keep_attention``: SDPA's
flash or cuDNN kernel and its backward called by hand, ``FusedLayer``). The kernels are
the same: the values are those of the autograd path, to rounding
(tests/test_layer_fused.py: 1e-5 in float32).

Taken where everything it writes out applies (``fused_layer``): a layer
whose seven projections are fused LoRA layers (q, k, v and gate, up each
shareable) adding the residual in their matmuls (the model in the compute
dtype: a bf16 model under bf16 autocast, not a float32 one), frozen norms, no
mask or cache (training), the MLP whole (not ``BAILONG_CHUNKED_MLP``), and no
forward hooks on the layer, its attention, MLP or norms, nor on every module
(those would not run; the projections' own are skipped on the fused LoRA path
anyway: ``bailong.model.project``). Switched off with ``BAILONG_FUSED_LAYER=0``.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as nn_module

from bailong.lora import LoRALinear
from bailong.lora_fused import LoRAProjection, LoRAShared, frozen_addmm
from bailong.memory import chunked_mlp_on
from bailong.recompute import as_forward, forward_state, keeping, nothing_saved, recomputing, replayed
from bailong.switches import initial

_fused_layer = initial("BAILONG_FUSED_LAYER")
_FLASH, _CUDNN = int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.CUDNN_ATTENTION)  # as ``_fused_sdp_choice`` names them
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(cudnn_first=False):
    """A context for one attention call: SDPA's kernels in torch's own order, or (``cudnn_first``:
    ``Llama.cudnn_attention``) cuDNN's tried first, then flash, memory-efficient and math, each where it can take
    the call. Entered at each call, so that a checkpointed layer's recomputation picks as its forward did."""
    return sdpa_kernel(CUDNN_FIRST, set_priority=True) if cudnn_first else contextlib.nullcontext()


def training_attention(model, batch, seq_len, dtype, device) -> str:
    """A line for train.py: which of SDPA's kernels a training step of ``model`` takes for attention (q, k and v
    as the layers have them: views of one output, wanting gradients; ``model.cudnn_attention`` heeded) and, with
    ``model.keep_attention``, whether its output is kept (``_kept_attention``: flash's or cuDNN's only)."""
    config, names = model.config, {int(SDPBackend.MATH): "math", _FLASH: "flash", _CUDNN: "cuDNN",
                                   int(SDPBackend.EFFICIENT_ATTENTION): "memory-efficient"}
    sizes = [n * config.head_dim for n in (config.num_attention_heads, *[config.num_key_value_heads] * 2)]
    qkv = torch.empty(batch, seq_len, sum(sizes), device=device, dtype=dtype)
    choice, kept = _sdpa_choice(*(t.view(batch, seq_len, -1, config.head_dim).transpose(1, 2)
                                  for t in qkv.split(sizes, -1)), model.cudnn_attention)
    line = f"attention: SDPA's {names.get(choice, choice)} kernel" + (
        " (cuDNN's tried first: --cudnn-attention)" if model.cudnn_attention else "")
    if model.keep_attention:
        line += ("; its output kept for the backward" if kept else
                 "; --keep-attention keeps nothing with it: attention is recomputed")
    return line


def use_fused_layer(flag=True) -> bool:
    """Switch the hand-written layer on or off where it applies (on: only with the fused LoRA and the layer
    kernels, both on by default on CUDA); returns the previous setting."""
    global _fused_layer
    previous, _fused_layer = _fused_layer, flag
    return previous


def fused_layer(layer, x, cos, sin, mask, cache, kernels, keep=False, keep_attention=False):
    """``layer(x, cos, sin, positions, mask, cache)`` checkpointed as one hand-written node (``FusedLayer``)
    where that applies, else None. ``kernels``: ``bailong_kernels.layers`` (``bailong.model.layer_kernels``);
    ``keep``: as ``bailong.recompute.checkpoint``'s; ``keep_attention``: attention's output kept for the
    backward, which then skips attention and o in the recomputation (``FusedLayer``)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)]
    if not (_fused_layer and kernels is not None and mask is None and cache is None and not chunked_mlp_on()
            and not _hooked(layer, attn, mlp, layer.input_layernorm, layer.post_attention_layernorm)
            and all(LoRALinear.shares(group) for group in groups)
            # o and down add the residual x (x2) to an input of x's dtype and device (attention's, SwiGLU's)
            and all(isinstance(m, LoRALinear) and m.adds(x, x) for m in (attn.o_proj, mlp.down_proj))
            and not any(n.weight.requires_grad for n in (layer.input_layernorm, layer.post_attention_layernorm))):
        return None
    projections = (*groups[0], attn.o_proj, *groups[1], mlp.down_proj)
    params = [p for m in projections for p in (m.lora_A.weight, m.lora_B.weight)]
    return FusedLayer.apply(layer, kernels, keep, keep_attention, cos, sin, x, *params)


def _hooked(*modules) -> bool:
    """Whether a forward hook would run on any of ``modules``: its own, or one set on every module."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class Ctx:
    """Stands in for the context autograd gives a node's forward and backward, to call them by hand."""

    def __init__(self, *needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


class Unsaved(Ctx):
    """A context for a forward that no backward follows: what it would save is let go at once."""

    def save_for_backward(self, *tensors):
        pass


class FusedLayer(torch.autograd.Function):
    """A checkpointed decoder layer as one node, its insides written out (``fused_layer``): kept for the
    backward only x (and the random state and autocast the forward ran under); the backward runs the forward
    again with them, keeping each part's context (``Ctx``), then each part's backward in reverse:

        x_2 = x + o(attention(rope(q), rope(k), v)) with q, k, v = qkv(norm_1(x))
        y = x_2 + down(swiglu(gate_up(norm_2(x_2))))
        dL/dx_2 = g + norm_2'(gate_up'(swiglu'(down'(g))))
        dL/dx = dL/dx_2 + norm_1'(qkv'(rope'(attention'(o'(dL/dx_2)))))

    With ``keep_attention`` (``train.py --keep-attention``), where SDPA takes its flash or cuDNN kernel
    (``_kept_attention``), the forward keeps attention's output a and x_2 too, each as large as x, and
    attention's log-sum-exp (a float a head and position): the recomputation then skips attention's forward,
    which grows with the square of the sequence, and o's matmul (o's LoRA part only, for its backward), and
    attention's backward is that kernel's, from a and the log-sum-exp. The same values, bit for bit.

    The LoRA gradients come back through this node, as from ``Recomputed`` (and with the same caveats: a
    hook on a parameter itself runs twice; ``torch.autograd.grad`` of some forms all)."""

    @staticmethod
    def forward(ctx, layer, kernels, keep, keep_attention, cos, sin, x, *params):
        ctx.layer, ctx.kernels, ctx.keep, ctx.cos, ctx.sin = layer, kernels, keep, cos, sin
        ctx.state = forward_state(x)
        y, kept = _forward(layer, kernels, x, cos, sin, keep_attention=keep_attention)
        ctx.attention_backward = kept.pop() if kept else None  # the kernel's backward, its extra arguments bound
        ctx.save_for_backward(x, *(kept or ()))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, *kept = ctx.saved_tensors
        want_x = ctx.needs_input_grad[6]  # x's
        with replayed(x, ctx.state), as_forward(x, ctx.state), recomputing(), keeping(ctx.keep), torch.no_grad():
            _, parts = _forward(ctx.layer, ctx.kernels, x, ctx.cos, ctx.sin, want_x, recompute=True,
                                kept=[*kept, ctx.attention_backward] if kept else None)
        return None, None, None, None, None, None, *_backward(ctx.kernels, parts, g, want_x)


def _forward(layer, kernels, x, cos, sin, want_x=True, recompute=False, keep_attention=False, kept=None):
    """The layer's output and, in the ``recompute`` (whose output no one reads: None), the contexts its parts
    leave for ``_backward``, in order; ``want_x``: dL/dx is wanted. Outside it nothing is kept (``Unsaved``)
    but, with ``keep_attention`` where SDPA's flash or cuDNN kernel takes attention, ``kept``: [x_2, a,
    attention's log-sum-exp, that kernel's backward], which the recomputation is given back."""
    Context = Ctx if recompute else Unsaved

    def context(args, want_input):  # for a node of inputs args: gradients wanted for the first as want_input,
        # and for each other that wants one (the trained LoRA weights; a residual's, handed on by
        # LoRAProjection, is left unused: _backward adds the residual stream's gradients in the norms')
        return Context(want_input, *(getattr(a, "requires_grad", False) for a in args[1:]))

    attn, mlp = layer.self_attn, layer.mlp
    B, T, _ = x.shape
    norm_1 = Context(want_x, False, False)
    h = kernels.RMSNormFunction.forward(norm_1, x, layer.input_layernorm.weight, layer.input_layernorm.eps)
    args = LoRALinear.shared_args(h, (attn.q_proj, attn.k_proj, attn.v_proj))
    qkv = context(args, want_x)
    q, k, v = LoRAShared.forward(qkv, *args)
    rope = Context()  # q and k rotated in place: nothing reads them before
    rope.save_for_backward(cos, sin)
    rope.head_dim = attn.head_dim
    for t in _side_by_side(q, k):  # in one launch where k's columns follow q's in one output
        kernels.rope_(t, cos, sin, attn.head_dim)
    q, k, v = (t.view(B, T, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    if kept:  # attention as the forward kept it: its output a (B, T, heads * D), its log-sum-exp
        x2, a, lse, backward = kept
        out = a.view(B, T, -1, attn.head_dim).transpose(1, 2)
        attention = functools.partial(_kept_backward, q, k, v, out, lse, backward)
    elif keep_attention and (kernel := _kept_attention(q, k, v, attn.cudnn_first)) is not None:
        out, lse, backward = kernel
        a = out.transpose(1, 2).reshape(B, T, -1)  # a view: the kernels write (B, T, heads, D)
        kept, attention = [a, lse, backward], None  # x_2 put first below; no backward here
    else:  # attention through autograd's node, with gradients on in the forward too: SDPA picks its kernel by them
        with torch.enable_grad(), contextlib.nullcontext() if recompute else nothing_saved(), \
                attention_kernels(attn.cudnn_first):
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                                 enable_gqa=attn.n_kv_heads != attn.n_heads)
        attention = functools.partial(_autograd_backward, q, k, v, out)
        a = out.detach().transpose(1, 2).reshape(B, T, -1)
    skip_o = recompute and kept  # x_2 kept: o's LoRA part only, for its backward, which forms g W as down's does
    args = attn.o_proj.projection_args(a, x, base=not skip_o)
    o = context(args, True)
    y = LoRAProjection.forward(o, *args)
    if skip_o:
        o.weight = attn.o_proj.weight
    else:
        x2 = y  # x + attention
    norm_2 = Context(True, False, False)
    h = kernels.RMSNormFunction.forward(norm_2, x2, layer.post_attention_layernorm.weight,
                                        layer.post_attention_layernorm.eps)
    args = LoRALinear.shared_args(h, (mlp.gate_proj, mlp.up_proj))
    gate_up = context(args, True)
    gate, up = LoRAShared.forward(gate_up, *args)
    swiglu = Context()
    h = kernels.SwiGLUFunction.forward(swiglu, gate, up)
    # down as on the autograd path: the update onto x2, then + h W^T (``FrozenAddmm``), neither formed in the
    # recomputation; its backward forms g W with the update's dL/dh, in one matmul
    args = mlp.down_proj.projection_args(h, x2, base=False)
    down = context(args, True)
    y = LoRAProjection.forward(down, *args)
    down.weight = mlp.down_proj.weight
    if recompute:
        return None, [norm_1, qkv, rope, attention, o, norm_2, gate_up, swiglu, down]
    return frozen_addmm(y, h, down.weight, in_place=True), kept and [x2, *kept]  # x2 + MLP, into y: ours


def _backward(kernels, parts, g, want_x):
    """dL/dx (None unless ``want_x``) and the LoRA gradients, in ``FusedLayer``'s order of the parameters, from
    the parts' contexts (``_forward``: taken from the end of the list, each let go once its backward has run,
    as autograd lets a node's saved tensors go) and dL/dy = g."""
    dh, _, *down_grads = LoRAProjection.backward(parts.pop(), g)[:4]  # with g W, down's weight
    dgate, dup = kernels.SwiGLUFunction.backward(parts.pop(), dh)
    dh, *gate_up_grads = LoRAShared.backward(parts.pop(), dgate, dup)
    dx2 = kernels.rms_norm_backward(parts.pop(), dh, g)  # + g: y = x2 + ...
    da, _, *o_grads = LoRAProjection.backward(parts.pop(), dx2)[:4]
    dq, dk, dv = parts.pop()(da)  # attention's backward
    rope = parts.pop()
    dq, dk = (kernels.rope_(t, *rope.saved_tensors, rope.head_dim, -1.0) for t in (dq, dk))  # ours: in place
    dh, *qkv_grads = LoRAShared.backward(parts.pop(), dq, dk, dv)
    dx = kernels.rms_norm_backward(parts.pop(), dh, dx2) if want_x else None  # + dx2: x2 = x + ...
    return dx, *qkv_grads[6:], *o_grads, *gate_up_grads[6:], *down_grads  # LoRAShared's: 6 Nones, then A, B, ...


def _side_by_side(a, b):
    """(a and b as one tensor,) where b's columns follow a's in rows of one buffer (q and k, views of q/k/v's
    one output on the NF4 kernels' path: ``bailong_kernels.nf4_matmul``), else (a, b)."""
    if (a.shape[:-1] == b.shape[:-1] and a.stride() == b.stride() and a.stride(-1) == 1
            and b.data_ptr() == a.data_ptr() + a.shape[-1] * a.element_size()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()):
        return (a.as_strided((*a.shape[:-1], a.shape[-1] + b.shape[-1]), a.stride()),)
    return a, b


def _autograd_backward(q, k, v, out, da):
    """dL/dq, dL/dk, dL/dv, each (B, T, heads * D), through autograd from the recomputation's attention
    out = SDPA(q, k, v) (B, heads, T, D) and dL/da, given as (B, T, heads * D)."""
    B, T, _ = da.shape
    grads = torch.autograd.grad(out, (q, k, v), da.view(B, T, -1, q.shape[-1]).transpose(1, 2))
    return [t.transpose(1, 2).reshape(B, T, -1) for t in grads]


def _sdpa_choice(q, k, v, cudnn_first=False):
    """The kernel SDPA takes for causal attention of q, k, v (B, heads, T, D) in training (asked with gradients
    wanted, under ``attention_kernels``), and whether a layer can keep its output (``_kept_attention``): flash's or
    cuDNN's, on CUDA at a head size neither pads (a multiple of 8)."""
    wanting = [t.detach().requires_grad_() for t in (q, k, v)]
    with attention_kernels(cudnn_first):
        choice = torch._fused_sdp_choice(*wanting, is_causal=q.shape[2] > 1, enable_gqa=k.shape[1] != q.shape[1])
    return choice, choice in (_FLASH, _CUDNN) and not (q.is_cuda and q.shape[-1] % 8)


def _kept_attention(q, k, v, cudnn_first=False):
    """Causal attention of q, k, v (B, heads, T, D) by the kernel SDPA would take for them, called as SDPA calls it,
    where a layer can keep its output (``_sdpa_choice``: flash's, or on CUDA cuDNN's): the output (B, heads, T, D),
    its log-sum-exp and the kernel's backward, (dL/dout, q, k, v, out, lse) -> dL/dq, dL/dk, dL/dv; else None."""
    choice, keeps = _sdpa_choice(q, k, v, cudnn_first)
    if not keeps:
        return None
    causal, aten = q.shape[2] > 1, torch.ops.aten
    if not q.is_cuda:  # the CPU's flash kernel (no cuDNN there)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse, lambda *grad_in: aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *grad_in, 0.0, causal)
    if choice == _FLASH:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal)
        return out, lse, lambda *grad_in: aten._scaled_dot_product_flash_attention_backward(
            *grad_in, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset)
    # cuDNN's, with its log-sum-exp (B, heads, T, 1) and no bias
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal)
    return out, lse, lambda *grad_in: aten._scaled_dot_product_cudnn_attention_backward(
        *grad_in, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal)


def _kept_backward(q, k, v, out, lse, backward, da):
    """``_autograd_backward``'s gradients by the kernel's own backward (``_kept_attention``), from its output and
    log-sum-exp, as autograd calls it after SDPA."""
    B, T, _ = da.shape
    grads = backward(da.view(B, T, -1, q.shape[-1]).transpose(1, 2), q, k, v, out, lse)
    return [t.transpose(1, 2).reshape(B, T, -1) for t in grads]
