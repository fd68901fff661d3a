"""Counting what one decoding step launches: aten operations that run a kernel, plus Triton launches.

Views, reshapes and allocations launch nothing and are not counted; an operation
that writes new memory or writes in place is. The kernels run under the Triton
interpreter on the CPU, so the count is that of the path a GPU takes. One
operation launches two kernels there: ``addmm`` whose result is not its input
``self`` copies ``self`` into the result before the GEMM
(``addmm_out_cuda_impl`` in ATen's cuda/Blas.cpp: ``at::native::copy_(result,
self)``, short of a 1-d bias the Lt path adds in the GEMM, or beta = 0); counted
as two. ``self.addmm_(...)`` writes into ``self``: one.
"""
import contextlib
import importlib

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from conftest import WITHOUT_TRITON

TRITON_MODULES = ("bailong_kernels.nf4_gemv", "bailong_kernels.nf4_dequant", "bailong_kernels.decode",
                  "bailong_kernels.layers", "bailong_kernels.dropout")  # every module with a kernel


class Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten, self.triton = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        if not name.startswith(("aten::empty", "aten::new_empty", "aten::lift_fresh")):  # allocations
            inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if func._schema.is_mutable or any(t.untyped_storage().data_ptr() not in inputs for t in outputs):
                self.aten.append(name)
                if _copies_self(name, args, kwargs or {}, out):
                    self.aten.append(f"{name}: copy of self")
        return out


def _copies_self(name, args, kwargs, out) -> bool:
    """Whether CUDA's kernel for this ``addmm`` first copies its ``self`` into the result (above)."""
    if name.split(".")[0] != "aten::addmm":
        return False
    self, result = args[0], kwargs.get("out", out)
    beta = args[3] if len(args) > 3 else kwargs.get("beta", 1)
    same = self.data_ptr() == result.data_ptr() and self.stride() == result.stride()
    return beta != 0 and self.dim() > 1 and not same


class Counted:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches it and records the launch. Each launch must
    say whether a * b + c compiles into one FMA (``bailong_kernels.nf4_dequant.FMA``; Triton's default changes in
    3.10): with, but for the dequantize kernels, which give the reference's bits without."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fusion = kwargs.get("enable_fp_fusion")
            assert fusion is (not self.name.startswith("_nf4_dequant")), f"{self.name}: enable_fp_fusion={fusion}"
            self.launches.triton.append(self.name)
            with _disable_current_modes():  # the interpreter's own copies are not the GPU's work
                return self.kernel[grid](*args, **kwargs)
        return launch


def triton_kernels():
    """(module, name, kernel) for every Triton kernel, as the launchers find them: module attributes."""
    pytest.importorskip("triton", reason=WITHOUT_TRITON)
    for module in map(importlib.import_module, TRITON_MODULES):
        for name, kernel in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(kernel, "fn"):
                yield module, name, kernel


@contextlib.contextmanager
def count_launches(monkeypatch):
    """Inside: ``launches.aten`` and ``launches.triton`` list what ran, in order."""
    launches = Launches()
    with monkeypatch.context() as patch:
        for module, name, kernel in triton_kernels():
            patch.setattr(module, name, Counted(kernel, name, launches))
        with launches:
            yield launches


def step_launches(monkeypatch, layers, dropout, keep, keep_attention=False) -> int:
    """What a training step of ``tiny_nf4(layers)`` (bf16, LoRA r = 8, checkpointing; the recomputation's
    dequantized weights kept, attention kept) launches, on the path the caller set."""
    import torch.nn.functional as F
    from test_layer_kernels import tiny_nf4

    from bailong import lora
    model = tiny_nf4(layers)
    lora.mark_only_lora_trainable(lora.inject_lora(model.to(torch.bfloat16), lora.LoRAConfig(r=8, dropout=dropout)))
    model.checkpointing, model.keep_dequantized, model.keep_attention = True, keep, keep_attention  # as on CUDA
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(0))
    with count_launches(monkeypatch) as launches:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as train.py on CUDA: the compute dtype
            logits = model(ids[:, :-1])
        targets = ids[:, 1:]  # train.py's loss: summed over the batch's tokens, divided by their count
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               reduction="sum") / (targets != -100).sum().clamp(min=1)
        loss.backward()
    return len(launches.aten) + len(launches.triton)
