"""The environment's switches, each with its default, in one place (no torch: train.py checks them before torch
loads). Each module that runs what a switch picks reads it here once, at import; its ``use_...`` function changes
it afterwards.

    BAILONG_NF4_KERNELS=0      NF4 projections on CUDA by the PyTorch reference, not the Triton kernels
    BAILONG_DECODE_KERNELS=0   the decoding step unfused
    BAILONG_PDL=1              the decoding step's kernels with programmatic dependent launch (Hopper and later)
    BAILONG_LAYER_KERNELS=0    training's RMSNorm, SwiGLU, RoPE and cross-entropy by PyTorch, not Triton
    BAILONG_FUSED_LORA=0       LoRA projections as plain modules, not one autograd node with the frozen matmul
    BAILONG_FUSED_LAYER=0      a checkpointed layer through autograd, not written out by hand
    BAILONG_CHUNKED_LOSS=0     the training loss over the whole logits
    BAILONG_CHUNKED_MLP=1      the MLP chunk by chunk over the tokens in training
"""
import os

DEFAULTS = {"BAILONG_NF4_KERNELS": True, "BAILONG_DECODE_KERNELS": True, "BAILONG_PDL": False,
            "BAILONG_LAYER_KERNELS": True, "BAILONG_FUSED_LORA": True, "BAILONG_FUSED_LAYER": True,
            "BAILONG_CHUNKED_LOSS": True, "BAILONG_CHUNKED_MLP": False}


def switched_on(name: str) -> bool:
    """Whether switch ``name`` is on: its default where the environment leaves it unset; "" and "0" are off,
    anything else on."""
    value = os.environ.get(name)
    return DEFAULTS[name] if value is None else value not in ("", "0")
