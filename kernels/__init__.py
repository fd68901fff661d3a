"""Triton kernels for NF4: dequantize, and the fused dequant-matmul used by every NF4 projection.

Each kernel has a PyTorch reference in ``bailong`` with the same meaning:
``nf4_dequantize(q)`` is ``q.dequantize()`` and ``nf4_matmul(x, q)`` is
``bailong.quantized.NF4Matmul``. The model uses the kernels for CUDA tensors and
the references elsewhere; ``BAILONG_REFERENCE=1`` in the environment, or
``use_reference(True)``, forces the references everywhere. On the CPU the
kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set before
importing this package), which is how the tests check them without a GPU.
"""
import os

from kernels.nf4_dequant import nf4_dequantize
from kernels.nf4_matmul import nf4_matmul

_reference = os.environ.get("BAILONG_REFERENCE", "") not in ("", "0")


def use_reference(flag=True):
    """Force (or stop forcing) the PyTorch references instead of the kernels."""
    global _reference
    _reference = flag


def enabled(x) -> bool:
    """Whether the model should run the kernels for tensor ``x``."""
    return x.is_cuda and not _reference


__all__ = ["nf4_dequantize", "nf4_matmul", "use_reference", "enabled"]
