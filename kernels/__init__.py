"""Triton kernels (NF4 dequantize, fused NF4 dequant-matmul), each beside a PyTorch reference.

Empty until the kernels land: the model runs on plain PyTorch until then.
"""
