"""Triton kernels for NF4: dequantize, and the fused dequant-matmul for NF4 projections.

Each kernel has a PyTorch reference in ``bailong`` with the same meaning:
``nf4_dequantize(q)`` is ``q.dequantize()`` and ``nf4_matmul(x, q)`` is
``bailong.quantized.NF4Matmul``. On the CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``, set before importing this package), which
is how the tests check them without a GPU.

One switch chooses what NF4 projections run on CUDA: ``BAILONG_NF4_KERNELS=1``
in the environment, or ``use_kernels(True)``. It is off by default for now: the
first version of these kernels was correct on an H200 but 45-100x slower than
bf16 cuBLAS (docs/BENCHMARKS.md); this version (a code-pair table, one dot per
tile, a GEMV kernel for one row) passes the interpreter tests and compiles for
sm_90 and sm_80 without spills (bench/check_kernels_compile.py) but has not been
timed on a GPU yet. Until it has, the PyTorch reference (dequantize, then
cuBLAS) is the faster known choice.
"""
import os

from kernels.nf4_dequant import nf4_dequantize
from kernels.nf4_matmul import nf4_matmul

_kernels = os.environ.get("BAILONG_NF4_KERNELS", "0") not in ("", "0")


def use_kernels(flag=True):
    """Run NF4 projections on CUDA through the fused kernels (True) or the PyTorch reference (False)."""
    global _kernels
    _kernels = flag


def enabled(x) -> bool:
    """Whether the model should run the kernels for tensor ``x``."""
    return x.is_cuda and _kernels


__all__ = ["nf4_dequantize", "nf4_matmul", "use_kernels", "enabled"]
