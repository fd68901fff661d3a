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

1, true, on and yes switch one on; 0, false, off, no and nothing off; any other value is refused.
"""
import importlib.util
import os

DEFAULTS = {"BAILONG_NF4_KERNELS": True, "BAILONG_DECODE_KERNELS": True, "BAILONG_PDL": False,
            "BAILONG_LAYER_KERNELS": True, "BAILONG_FUSED_LORA": True, "BAILONG_FUSED_LAYER": True,
            "BAILONG_CHUNKED_LOSS": True, "BAILONG_CHUNKED_MLP": False}


OFF, ON = ("", "0", "false", "off", "no"), ("1", "true", "on", "yes")


def switched_on(name: str) -> bool:
    """Whether switch ``name`` is on: its default where the environment leaves it unset; 0, false, off, no or
    nothing is off, and 1, true, on or yes on (any case); another value is refused, not guessed."""
    value = os.environ.get(name)
    if value is None:
        return DEFAULTS[name]
    if mistake := _mistake(name):
        raise ValueError(mistake)
    return value.strip().lower() in ON


def initial(name) -> bool:
    """``switched_on`` for a module's state at import, before a command has run: a value no switch takes reads as
    the default here, and the command refuses it in one line before anything runs (``switch_mistake``)."""
    return DEFAULTS[name] if _mistake(name) else switched_on(name)


def _mistake(name) -> str | None:
    value = os.environ.get(name)
    if value is not None and value.strip().lower() not in OFF + ON:
        return f"{name}={value}: a switch is 1 (or true, on, yes) or 0 (or false, off, no)"
    return None


def triton_installed() -> bool:
    """Whether Triton is installed, which the kernels need: requirements.txt installs it on Linux alone, where it
    ships (found, not imported: it takes seconds to load)."""
    return importlib.util.find_spec("triton") is not None


def switch_mistake() -> str | None:
    """What is wrong with the first switch the environment sets to a value no switch takes (for the commands to
    refuse at once, whether or not they read that switch); None when nothing is."""
    return next(filter(None, map(_mistake, DEFAULTS)), None)
