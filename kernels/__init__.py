"""Triton kernels for NF4: dequantize, and the fused dequant-matmul for NF4 projections.

Each kernel has a PyTorch reference in ``bailong`` with the same meaning:
``nf4_dequantize(q)`` is ``q.dequantize()`` and ``nf4_matmul(x, q)`` is
``bailong.quantized.NF4Matmul``. On the CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``, set before importing this package), which
is how the tests check them without a GPU.

NF4 projections on CUDA run through these kernels; one switch forces the
PyTorch reference anywhere: ``BAILONG_NF4_KERNELS=0`` in the environment, or
``use_kernels(False)``. Up to 4 rows of x (decoding) take the GEMV kernel,
which reads the 4-bit weight once; more rows take the dequantize kernel, then
cuBLAS (``kernels.nf4_matmul``). Measured speeds: docs/BENCHMARKS.md.

The fused decoding-step kernels (``kernels.decode``: RMSNorm, SwiGLU, and RoPE +
KV-cache write + attention over the filled positions in one launch) are off
until they are timed on a GPU: ``BAILONG_DECODE_KERNELS=1`` or
``use_decode_kernels(True)`` switches them on for inference on CUDA.
"""
import os

import torch

from kernels.decode import decode_attention, rms_norm, swiglu
from kernels.nf4_dequant import nf4_dequantize
from kernels.nf4_matmul import nf4_matmul

_kernels = os.environ.get("BAILONG_NF4_KERNELS", "1") not in ("", "0")
_decode_kernels = os.environ.get("BAILONG_DECODE_KERNELS", "0") not in ("", "0")


def use_kernels(flag=True) -> bool:
    """Run NF4 projections on CUDA through the kernels (True) or the PyTorch reference (False);
    returns the previous setting, to restore."""
    global _kernels
    previous, _kernels = _kernels, flag
    return previous


def use_decode_kernels(flag=True) -> bool:
    """Run the decoding step's norms, SwiGLU and attention through ``kernels.decode`` (True) or
    PyTorch (False); returns the previous setting, to restore."""
    global _decode_kernels
    previous, _decode_kernels = _decode_kernels, flag
    return previous


def switches() -> tuple:
    """The settings of ``use_kernels`` and ``use_decode_kernels``."""
    return _kernels, _decode_kernels


def enabled(x) -> bool:
    """Whether the model should run the kernels for tensor ``x``."""
    return x.is_cuda and _kernels


def decode_enabled(x) -> bool:
    """Whether the model should run the fused inference kernels for tensor ``x`` (no gradient wanted)."""
    return enabled(x) and _decode_kernels and not torch.is_grad_enabled()


__all__ = ["nf4_dequantize", "nf4_matmul", "rms_norm", "swiglu", "decode_attention", "use_kernels",
           "use_decode_kernels", "switches", "enabled", "decode_enabled"]
