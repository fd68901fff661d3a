"""Triton kernels for NF4: dequantize, and the fused dequant-matmul for NF4 projections.

Each kernel has a PyTorch reference in ``bailong`` with the same meaning:
``nf4_dequantize(q)`` is ``q.dequantize()`` and ``nf4_matmul(x, q)`` is
``bailong.quantized.NF4Matmul``. On the CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``, set before importing this package), which
is how the tests check them without a GPU.

NF4 projections on CUDA run through these kernels; one switch forces the
PyTorch reference anywhere: ``BAILONG_NF4_KERNELS=0`` in the environment, or
``use_kernels(False)``. Each matmul takes the faster of the fused kernel and
the dequantize kernel followed by cuBLAS, timed once per shape on the GPU in
use (``kernels.nf4_matmul.choose_way``): never slower than writing the weight
out and multiplying it with cuBLAS. They pass the interpreter tests and
compile for sm_90 and sm_80 without spills (bench/check_kernels_compile.py);
this version has not been timed on a GPU yet (docs/BENCHMARKS.md).
"""
import os

from kernels.nf4_dequant import nf4_dequantize
from kernels.nf4_matmul import nf4_matmul

_kernels = os.environ.get("BAILONG_NF4_KERNELS", "1") not in ("", "0")


def use_kernels(flag=True) -> bool:
    """Run NF4 projections on CUDA through the kernels (True) or the PyTorch reference (False);
    returns the previous setting, to restore."""
    global _kernels
    previous, _kernels = _kernels, flag
    return previous


def enabled(x) -> bool:
    """Whether the model should run the kernels for tensor ``x``."""
    return x.is_cuda and _kernels


__all__ = ["nf4_dequantize", "nf4_matmul", "use_kernels", "enabled"]
