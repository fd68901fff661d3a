"""The frozen NF4 base of QLoRA: a quantized linear layer and the model-level helpers.

Every attention and MLP projection becomes an ``NF4Linear``; the embedding and
``lm_head`` stay in the compute dtype, as in QLoRA (the embedding's table may wait
in host memory: ``embedding_rows``), and so do the norms' weights, where QLoRA's
script keeps them in float32 (ours normalise in float32, then scale by the weight
in its dtype, as transformers' Llama does). An ``NF4Linear``'s state
dict holds exactly what bitsandbytes writes (``weight``, ``weight.absmax``, ...),
so saving a quantized model is saving its state dict plus a
``quantization_config`` that transformers understands.
"""
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from bailong.errors import BailongError
from bailong.nf4 import NF4Tensor, quantize
from bailong.recompute import dequantized

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def embedding_rows(table, ids):
    """``F.embedding(ids, table)`` on ids' device, from a frozen table in host memory too
    (``bailong.memory.offload_embedding``): gathered there, and only the rows copied in."""
    if table.device == ids.device:
        return F.embedding(ids, table)
    return F.embedding(ids.to(table.device), table).to(ids.device)


class NF4Matmul(torch.autograd.Function):
    """y = x @ W.T for a frozen NF4 weight W, with a gradient for x only.

    Nothing but the packed weight is kept for the backward, which dequantizes
    again for dx = dy @ W: no weight gradient is formed and no dequantized copy
    of W stays alive between forward and backward (but from a checkpointed
    layer's recomputation to its backward, where asked: ``bailong.recompute``).
    """

    @staticmethod
    def forward(ctx, x, weight: NF4Tensor, keep=False):
        ctx.weight = weight
        return F.linear(x, nf4_dequantized(weight, x.dtype, keep or ctx.needs_input_grad[0]))

    @staticmethod
    def backward(ctx, dy):
        return dy @ nf4_dequantized(ctx.weight, dy.dtype), None, None  # (..., out) @ (out, in)


def nf4_linear(x, weight: NF4Tensor | tuple, keep=False):
    """x @ W.T: the Triton kernels for CUDA tensors (``kernels_take``), the PyTorch reference otherwise; under
    autocast in its dtype, W dequantized straight to it, as ``F.linear`` would compute. ``keep``: a backward will
    want dL/dx though this call forms no graph (a fused LoRA node's forward: ``bailong.recompute``). For a tuple
    of weights that read x (q, k, v), no graph formed, the tuple of x @ W_i.T: through the kernels views of one
    output, the weights dequantized in one launch into one matrix and multiplied by in one matmul."""
    if kernels_take(x):
        from bailong_kernels.nf4_matmul import nf4_matmul
        return nf4_matmul(x, weight, keep)
    x = x.to(compute_dtype(x))
    if isinstance(weight, tuple):
        return tuple(NF4Matmul.apply(x, w, keep) for w in weight)
    return NF4Matmul.apply(x, weight, keep)


def kernels_take(t: torch.Tensor) -> bool:
    """Whether the NF4 work on tensor t runs through the Triton kernels: on CUDA, unless switched off
    (``BAILONG_NF4_KERNELS=0`` or ``bailong_kernels.use_kernels(False)``)."""
    if not t.is_cuda:
        return False
    import bailong_kernels  # Triton is imported only where it runs
    return bailong_kernels.enabled(t)


def compute_dtype(x):
    """The dtype the projections of x compute in: autocast's, else x's (also on a device without autocast,
    the meta device)."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.get_autocast_dtype(device) if autocast else x.dtype


def nf4_dequantized(weight: NF4Tensor | tuple, dtype, keep=False):
    """W in ``dtype``, by the dequantize kernel where ``nf4_linear`` takes the kernels, else the reference; or
    the copy a checkpointed layer's recomputation kept for this backward (``bailong.recompute.dequantized``,
    whose ``keep`` this is). For a tuple of weights of one K, the tuple of them: through the kernels the row
    blocks of one matrix, made in one launch (and kept as one), as ``nf4_linear`` multiplies by them."""
    if not isinstance(weight, tuple):
        return dequantized(weight, dtype, _dequantize, keep)
    if kernels_take(weight[0].data):
        return dequantized(weight, dtype, _dequantize, keep).split([q.shape[0] for q in weight])
    return tuple(dequantized(w, dtype, _dequantize, keep) for w in weight)


def _dequantize(weight: NF4Tensor | tuple, dtype) -> torch.Tensor:
    if isinstance(weight, tuple) or kernels_take(weight.data):  # a tuple comes only where the kernels take it
        from bailong_kernels.nf4_matmul import dequantize
        return dequantize(weight, dtype)
    return weight.dequantize(dtype)


def load_nf4(module, state_dict, prefix, local_metadata, missing_keys, error_msgs) -> set:
    """``module.weight`` (an NF4Linear's, or a LoRA layer's on NF4) from the tensors ``NF4Tensor.to_bnb_dict``
    saved under ``prefix`` in a state dict: so that ``load_state_dict`` takes back what ``state_dict`` gave
    (bitsandbytes' keys). As torch loads a parameter: copied into the weight's own tensors where they fit (a
    captured CUDA graph reads those), the weight keeping its dtype, else into new ones on its device (never the
    state dict's, which another model may hold); with ``assign=True``, the state dict's own. Returns the keys it
    read; what is wrong goes to torch's lists."""
    keys = {k for k in state_dict if k == f"{prefix}weight" or k.startswith(f"{prefix}weight.")}
    if not keys:
        missing_keys.append(f"{prefix}weight")
        return keys
    try:
        q = NF4Tensor.from_bnb_dict({k: state_dict[k] for k in keys}, prefix, source="the state dict")
    except BailongError as e:
        error_msgs.append(str(e))
        return keys
    if list(q.shape) != [module.out_features, module.in_features]:
        error_msgs.append(f"size mismatch for {prefix}weight: NF4 of shape {list(q.shape)}, the layer's is "
                          f"{[module.out_features, module.in_features]}")
        return keys
    old = module.weight
    if local_metadata.get("assign_to_params_buffers", False):
        module.weight = q
    elif old is None:  # an empty layer, built to be loaded
        module.weight = replace(q, **{k: t.clone() for k, t in q.tensors().items()})
    elif {k: (t.dtype, t.shape) for k, t in old.tensors().items()} == {
            k: (t.dtype, t.shape) for k, t in q.tensors().items()}:
        with torch.no_grad():
            for k, t in old.tensors().items():
                t.copy_(q.tensors()[k])
        old.blocksize = q.blocksize
    else:  # another blocksize, or double quantization where the model has none
        module.weight = replace(q, dtype=old.dtype, **{k: t.to(old.data.device, copy=True)
                                                        for k, t in q.tensors().items()})
    return keys


class NF4Linear(nn.Module):
    """A frozen, bias-free linear layer whose weight is stored in NF4: ``y = x @ W.T``.

    The weight is expanded for each call: inside the Triton kernels on CUDA,
    by the PyTorch reference elsewhere. It is no ``nn.Parameter``: nothing
    here is trained, and ``model.to(dtype)`` must not cast the float32 absmax.
    """

    def __init__(self, in_features, out_features, weight: NF4Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight  # filled by the loader when built empty

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize=64, double_quant=True):
        return cls(linear.in_features, linear.out_features, quantize(linear.weight, blocksize, double_quant))

    def forward(self, x):
        return nf4_linear(x, self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.weight is not None:
            destination.update(self.weight.to_bnb_dict(prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        taken = load_nf4(self, state_dict, prefix, local_metadata, missing_keys, error_msgs)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in taken)

    def _apply(self, fn, recurse=True):
        # Follow device moves only: fn leaves integer tensors' dtype alone, so applying
        # it to the packed uint8 codes tells the target device without casting anything.
        if self.weight is not None:
            self.weight = self.weight.to(fn(self.weight.data).device)
        return self

    def extra_repr(self):
        q = self.weight
        detail = f", blocksize={q.blocksize}, double_quant={q.double_quant}" if q is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{detail}"


def projections(model):
    """(name, module) of every attention and MLP projection, dense or quantized."""
    return [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS]


def set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_model(model, blocksize=64, double_quant=True):
    """Replace every dense projection of a loaded model by its NF4 version, in place."""
    for name, m in projections(model):
        if isinstance(m, nn.Linear):
            set_module(model, name, NF4Linear.from_linear(m, blocksize, double_quant).train(m.training))
    return model


def nf4_weights(model) -> list[NF4Tensor]:
    """Every NF4 weight in the model, bare (NF4Linear) or under LoRA."""
    return [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Tensor)]


def bnb_quantization_config(model) -> dict | None:
    """config.json's quantization_config for a model with NF4 projections (None if none)."""
    quantized = nf4_weights(model)
    if not quantized:
        return None
    # the dense projections (merged ones): by their last name where every one of that name is dense, else by
    # their full names (transformers would read a last name as every module of it: q_proj of every layer)
    kinds = {}  # last name -> [(full name, dense)]
    for name, m in projections(model):
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((name, isinstance(m, nn.Linear)))
    dense = []
    for kind, found in sorted(kinds.items()):
        dense += [kind] if all(d for _, d in found) else [name for name, d in found if d]
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": quantized[0].double_quant,
            "bnb_4bit_compute_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": ["lm_head", *dense]}


def memory_report(model) -> str:
    """Bytes the model holds, against the same model in bfloat16."""
    nf4 = nf4_weights(model)
    quantized_bytes = sum(q.nbytes for q in nf4)
    dense = {id(p): p for p in model.parameters()}.values()  # tied weights once
    dense_bytes = sum(p.numel() * p.element_size() for p in dense)
    bf16_bytes = 2 * (sum(q.numel for q in nf4) + sum(p.numel() for p in dense))
    total = quantized_bytes + dense_bytes
    gib = 2 ** 30
    bits = 8 * quantized_bytes / max(1, sum(q.numel for q in nf4))
    return (f"model memory: {total / gib:.3f} GiB ({quantized_bytes / gib:.3f} GiB in {len(nf4)} NF4 matrices "
            f"at {bits:.3f} bits/weight, {dense_bytes / gib:.3f} GiB dense) vs {bf16_bytes / gib:.3f} GiB "
            f"in bfloat16: {total / bf16_bytes:.1%}")


class ErrorMeter:
    """Running mean and max of |W - dequantize(quantize(W))| over all weights quantized so far."""

    def __init__(self):
        self.total, self.count, self.max = 0.0, 0, 0.0

    def add(self, weight, q: NF4Tensor):
        err = q.dequantize(torch.float32).sub_(weight).abs_()
        self.total += err.sum().item()
        self.count += err.numel()
        self.max = max(self.max, err.max().item())

    def __str__(self):
        return f"mean |error| {self.total / max(1, self.count):.3g}, max |error| {self.max:.3g}"
