"""Triton kernels: NF4 dequantize, the NF4 GEMV and matmul, the fused decoding step, training's layers.

This folder imports as ``bailong_kernels`` (pyproject.toml maps it; PyPI's
``kernels`` package owns the plain name). The kernels live in their modules, and
this package holds only the switches that decide whether the model runs them:

    bailong_kernels.nf4_dequant.nf4_dequantize(q)   is  q.dequantize()
    bailong_kernels.nf4_matmul.nf4_matmul(x, q)     is  bailong.quantized.NF4Matmul.apply(x, q)
    bailong_kernels.decode                          RMSNorm, SwiGLU, RoPE + KV-cache write + attention;
                                                    q/k/v and gate/up + SwiGLU as one GEMV launch each,
                                                    o and down adding the residual in theirs, NF4 or
                                                    bf16 (bailong_kernels.dense_gemv), the head too
    bailong_kernels.layers                          RMSNorm, SwiGLU and RoPE for training, with their backward;
                                                    the chunked loss's cross-entropy
    bailong_kernels.dropout                         the fused LoRA's dropout, its masks drawn again from a seed
                                                    in the backward instead of stored
    bailong_kernels.adamw8bit                       a tensor's step of bailong.optim.AdamW8bit (8-bit moments)

Each has its PyTorch reference beside the code it replaces in ``bailong``. On
the CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``,
set before importing them), which is how the tests check them without a GPU.

NF4 projections (and the 8-bit AdamW's steps) on CUDA run through these
kernels where Triton is installed (it ships for Linux alone: without it the
PyTorch code runs, with a warning); one switch forces the PyTorch reference anywhere:
``BAILONG_NF4_KERNELS=0`` in the environment, or ``use_kernels(False)``. Up
to 4 rows of x (decoding) take the GEMV kernel, which reads the 4-bit weight
once; more rows take the dequantize kernel, then cuBLAS
(``bailong_kernels.nf4_matmul``; the GEMV: ``bailong_kernels.nf4_gemv``).
Measured speeds: docs/BENCHMARKS.md.

The fused decoding-step kernels (``bailong_kernels.decode``: 1.26x the tokens/s
of the unfused step in bf16, 1.37x on NF4, on an H200) and the training layer
kernels (``bailong_kernels.layers``, and with them ``bailong_kernels.dropout``;
with the fused LoRA and the chunked loss 2.2x the tokens/s of autograd) run on
CUDA by default (docs/BENCHMARKS.md). ``BAILONG_DECODE_KERNELS=0`` /
``use_decode_kernels(False)`` switches the first off, ``BAILONG_LAYER_KERNELS=0`` /
``use_layer_kernels(False)`` the second.

``BAILONG_PDL=1`` / ``use_pdl(True)`` launches the GEMV (NF4 and dense) and
``bailong_kernels.decode``'s kernels with programmatic dependent launch on Hopper
and later, under ``torch.inference_mode`` only (decoding; ``nf4_dequant.pdl``):
each kernel starts while the one before it ends and reads its first weights
before waiting for it. Off by default: not yet timed on a GPU.
"""
import warnings

import torch

from bailong.errors import BailongWarning
from bailong.switches import initial, triton_installed

TRITON = triton_installed()  # without it, CUDA runs the PyTorch code
_said_no_triton = False

_kernels = initial("BAILONG_NF4_KERNELS")
_decode_kernels = initial("BAILONG_DECODE_KERNELS")
_layer_kernels = initial("BAILONG_LAYER_KERNELS")
_pdl = initial("BAILONG_PDL")


def use_kernels(flag=True) -> bool:
    """Run NF4 projections on CUDA through the kernels (True) or the PyTorch reference (False);
    returns the previous setting, to restore."""
    global _kernels
    previous, _kernels = _kernels, flag
    return previous


def use_decode_kernels(flag=True) -> bool:
    """Run the decoding step's norms, SwiGLU and attention through ``bailong_kernels.decode`` (True) or
    PyTorch (False); returns the previous setting, to restore."""
    global _decode_kernels
    previous, _decode_kernels = _decode_kernels, flag
    return previous


def use_layer_kernels(flag=True) -> bool:
    """Run the norms, SwiGLU and RoPE of training through ``bailong_kernels.layers`` (True) or PyTorch (False);
    returns the previous setting, to restore. Change it between steps, not between a forward and its backward
    (activation checkpointing recomputes the forward and must find the same operations)."""
    global _layer_kernels
    previous, _layer_kernels = _layer_kernels, flag
    return previous


def use_pdl(flag=True) -> bool:
    """Launch the decoding step's kernels with programmatic dependent launch where the GPU and Triton have it
    (True) or as ordinary launches (False); returns the previous setting, to restore."""
    global _pdl
    previous, _pdl = _pdl, flag
    return previous


def switches() -> tuple:
    """The settings of ``use_kernels``, ``use_decode_kernels``, ``use_layer_kernels`` and ``use_pdl``."""
    return _kernels, _decode_kernels, _layer_kernels, _pdl


def enabled(x) -> bool:
    """Whether the model should run the kernels for tensor ``x``: on CUDA where switched on and Triton is
    installed (without it, the PyTorch code, with a warning the first time)."""
    global _said_no_triton
    if not (x.is_cuda and _kernels):
        return False
    if not TRITON and not _said_no_triton:
        warnings.warn("Triton is not installed: on CUDA the PyTorch code runs instead of the kernels (slower)",
                      BailongWarning)
        _said_no_triton = True
    return TRITON


def decode_enabled(x) -> bool:
    """Whether the model should run the fused inference kernels for tensor ``x`` (no gradient wanted)."""
    return enabled(x) and _decode_kernels and not torch.is_grad_enabled()


def layer_enabled(x) -> bool:
    """Whether the model should run the training layer kernels for tensor ``x`` (a gradient wanted)."""
    return enabled(x) and _layer_kernels and torch.is_grad_enabled()

