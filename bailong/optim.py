"""AdamW with its two moments in 8 bits: 2 bytes of optimizer state a trained parameter instead of 8.

QLoRA keeps the frozen base in 4 bits, so with a large rank what a step holds is
mostly the trained LoRA weights' float32 state: the weight, its gradient and
AdamW's two moments, 16 bytes a parameter (4.9 GiB of Bailong's recipe on
Llama 2 7B: r = 128 on the seven projections, embedding and head). Kept in 8
bits, as bitsandbytes' 8-bit optimizers keep them (Dettmers et al., "8-bit
Optimizers via Block-wise Quantization"), the moments take 2 bytes a parameter
and the state 10: 1.8 GiB less there.

How: each moment is cut into blocks of 256 consecutive values; a block stores
its absolute maximum (float32) and each value the index of the code nearest to
value / absmax (a value exactly between two codes takes the lower). The 256
codes are bitsandbytes' "dynamic" ones (``bailong.nf4.dynamic_code``): like a
float, dense near zero where most of a moment's values lie; signed for the
first moment, unsigned (all 256 on [0, 1]) for the second, which is never
negative. A step expands the codes, does the update of ``torch.optim.AdamW`` in
float32 with the moments as they come out of it (the rounding is only in what
is stored), then stores the new moments against their blocks' new absmax.

One departure from nearest rounding: a positive second moment is stored as at
least the smallest positive code (3.25e-7 of its block's absmax), never as 0.
Its square root divides the step, and a gradient 1e-4 of its block's largest
has a second moment 1e-8 of it, nearest to 0: the next steps would divide by
the root of that one step's square alone and move that weight up to ~30 times
too far. Stored too large instead, it moves it too little (in the tests' case
0.033 over 200 steps where float32 AdamW moves it 0.20, and nearest rounding
1.65): the safe side.

Tensors of fewer than ``min_8bit_size`` values (bitsandbytes' default, 4096)
keep float32 moments, updated as ``torch.optim.AdamW`` does (bit for bit for
float32 weights): their state costs nothing, and they would round the most.

A NaN or infinite gradient spoils the moments of its whole block of 256 (in
``torch.optim.AdamW`` only its own); train.py stops at a loss that is not
finite, and clipping by the global norm would have spread it to every
gradient anyway.

On CUDA one Triton kernel does a tensor's step in one launch
(``bailong_kernels.adamw8bit``; ``BAILONG_NF4_KERNELS=0`` keeps the PyTorch
below, which the tests hold it to).
"""
import functools
import math
from itertools import chain

import torch
import torch.nn.functional as F

from bailong.nf4 import dynamic_code

BLOCK = 256  # values sharing one absmax
CHUNK = 1 << 18  # values the PyTorch step expands at a time (a whole number of blocks)


@functools.cache
def tables(device) -> dict:
    """The codes of the two moments and the midpoints between neighbouring codes, on ``device``."""
    codes = {"exp_avg": dynamic_code(signed=True).to(device), "exp_avg_sq": dynamic_code(signed=False).to(device)}
    return {**codes, **{name + "_midpoints": (c[:-1] + c[1:]) * 0.5 for name, c in codes.items()}}


@functools.cache
def zero_code(name) -> int:
    """The index of the code 0.0 of a moment (``exp_avg``: 127, signed; ``exp_avg_sq``: 0, unsigned)."""
    return int((dynamic_code(signed=name == "exp_avg") == 0).nonzero())


def quantize_blocks(x, midpoints, positive_not_zero=False):
    """Float32 values (1-D) -> (uint8 index of each one's nearest code, float32 absmax per block of 256);
    ``positive_not_zero``: a value above 0 takes at least code 1 (the unsigned code's smallest above 0)."""
    n = x.numel()
    blocks = F.pad(x, (0, -n % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    codes = torch.searchsorted(midpoints, scaled)
    if positive_not_zero:
        codes = torch.where(scaled > 0, codes.clamp(min=1), codes)
    return codes.to(torch.uint8).view(-1)[:n], absmax


def quantize_moment(values, name):
    """A moment's float32 values (1-D) -> its codes and block maxima, the second moment never at code 0 and
    stored at most float32's largest (a gradient near 1e20 or more squares to infinity, which as a block's absmax
    would make every value of the block NaN; torch's AdamW keeps the infinity and steps that weight by 0 from then
    on, as a first moment of 0 beside float32's largest does: ``step_8bit``)."""
    if name == "exp_avg_sq":
        values = values.clamp(max=torch.finfo(torch.float32).max)
    return quantize_blocks(values, tables(values.device)[name + "_midpoints"], positive_not_zero=name == "exp_avg_sq")


def dequantize_blocks(q, absmax, code):
    """uint8 indices (1-D) and absmax per block of 256 -> their float32 values."""
    n = q.numel()
    blocks = F.pad(code[q.long()], (0, -n % BLOCK)).view(-1, BLOCK)
    return (blocks * absmax[:, None]).view(-1)[:n]


def adamw_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """One step of torch.optim.AdamW on float32 tensors, in place (``m`` and ``v``: the two moments), in its order
    of operations."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


def step_8bit(p, g, state, step, lr, beta1, beta2, eps, weight_decay):
    """The PyTorch of a tensor's step with 8-bit moments: expand them, update, store them again; CHUNK values
    at a time, so that its float32 temporaries stay small beside the memory the 8-bit moments save."""
    t = tables(p.device)
    weights, gradients = p.detach().reshape(-1), g.reshape(-1)  # views of a contiguous p and g
    for start in range(0, p.numel(), CHUNK):
        part, blocks = slice(start, start + CHUNK), slice(start // BLOCK, (start + CHUNK) // BLOCK)
        m = dequantize_blocks(state["exp_avg"][part], state["exp_avg_absmax"][blocks], t["exp_avg"])
        v = dequantize_blocks(state["exp_avg_sq"][part], state["exp_avg_sq_absmax"][blocks], t["exp_avg_sq"])
        w = weights[part].float()
        adamw_update(w, gradients[part].float(), m, v, step, lr, beta1, beta2, eps, weight_decay)
        m.masked_fill_(v == math.inf, 0.0)  # torch steps a weight whose second moment overflowed by 0 from then on
        weights[part] = w
        for name, values in (("exp_avg", m), ("exp_avg_sq", v)):
            codes, absmax = quantize_moment(values, name)
            state[name][part] = codes
            state[name + "_absmax"][blocks] = absmax
    if not p.is_contiguous():  # reshape copied it
        p.detach().copy_(weights.view_as(p))


class AdamW8bit(torch.optim.Optimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, bias-corrected moments) with the moments in 8 bits.

    Its state dict holds, for each tensor of ``min_8bit_size`` values or more, the moments' uint8 codes
    (``exp_avg``, ``exp_avg_sq``) and float32 block maxima (``exp_avg_absmax``, ``exp_avg_sq_absmax``); for
    smaller ones, float32 moments under torch's names; ``step`` counts each tensor's steps.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096):
        for what, value, ok in [("lr", lr, lr >= 0), ("eps", eps, eps >= 0), ("weight_decay", weight_decay,
                                weight_decay >= 0), ("betas", betas, all(0 <= b < 1 for b in betas))]:
            if not ok:
                raise ValueError(f"AdamW8bit: {what} {value} is out of range")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size

    def _init_state(self, p):
        state = self.state[p]
        state["step"] = 0
        if p.numel() < self.min_8bit_size:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            return state
        for name in ("exp_avg", "exp_avg_sq"):
            state[name] = torch.full((p.numel(),), zero_code(name), dtype=torch.uint8, device=p.device)
            state[name + "_absmax"] = torch.zeros(-(-p.numel() // BLOCK), dtype=torch.float32, device=p.device)
        return state

    def _adopt(self, p, state):
        """Moments another AdamW saved (torch's: in the weight's dtype, the step a tensor), kept as this one
        keeps them: float32 for a small tensor, else in 8 bits."""
        state["step"] = int(state["step"])
        if "exp_avg_absmax" in state:
            return
        for name in ("exp_avg", "exp_avg_sq"):
            values = state[name].float()
            if p.numel() < self.min_8bit_size:
                state[name] = values
            else:
                state[name], state[name + "_absmax"] = quantize_moment(values.reshape(-1), name)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        import bailong_kernels  # Triton is imported only where it runs
        for group in self.param_groups:
            (beta1, beta2), lr, eps, decay = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not take sparse gradients")
                state = self.state[p] or self._init_state(p)
                state["step"] += 1
                if "exp_avg_absmax" not in state:  # a small tensor: float32 moments
                    p32 = p if p.dtype == torch.float32 else p.float()
                    adamw_update(p32, p.grad.float(), state["exp_avg"], state["exp_avg_sq"], state["step"], lr,
                                 beta1, beta2, eps, decay)
                    if p32 is not p:
                        p.copy_(p32)
                elif bailong_kernels.enabled(p) and p.is_contiguous() and p.grad.is_contiguous():
                    from bailong_kernels.adamw8bit import adamw8bit_step
                    adamw8bit_step(p, p.grad, state, tables(p.device), state["step"], lr, beta1, beta2, eps, decay,
                                   BLOCK)
                else:
                    step_8bit(p, p.grad, state, state["step"], lr, beta1, beta2, eps, decay)
        return loss

    def load_state_dict(self, state_dict):
        """As torch's, but the moments keep their dtypes (torch's would cast every tensor of a parameter's state
        to the parameter's dtype: the 8-bit codes too); torch.optim.AdamW's state is taken over (its moments
        stored in 8 bits), so a run can move to this optimizer."""
        kept = {i: {k: v for k, v in s.items() if k != "step"} for i, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": {i: {"step": s["step"]} for i, s in
                                                         state_dict["state"].items()}})
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for i, p in zip(ids, params):
            if i in kept:
                self.state[p].update({k: t.to(p.device) for k, t in kept[i].items()})
                self._adopt(p, self.state[p])


def build_optimizer(params, name="adamw", lr=1e-3, weight_decay=0.0):
    """train.py's optimizer: ``adamw`` (torch's, float32 moments; fused on CUDA, as transformers' Trainer defaults
    to: one kernel, and no float32 temporaries the size of the state) or ``adamw8bit`` (moments in 8 bits)."""
    params = list(params)
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if params[0].is_cuda else None)
