"""Bailong: teach a Llama 2 model a new language with QLoRA and zip-tie embeddings.

    model, tokenizer = bailong.load("meta-llama/Llama-2-7b-hf")   # or a local folder
    logits = model(input_ids)                                     # (B, T, vocab)

The names below load on first use (PEP 562): importing a torch-free module such as
``bailong.training`` does not import torch, so train.py answers a bad option at once.
"""
import importlib

MODULES = {"PRESETS": "config", "ModelConfig": "config", "BailongError": "errors", "BailongWarning": "errors",
           "Sampling": "generation", "generate": "generation", "KVCache": "model", "Llama": "model",
           "Tokenizer": "tokenizer", "load": "weights", "load_preset": "weights", "save": "weights"}
__all__ = list(MODULES)


def __getattr__(name):
    if name not in MODULES:  # a submodule, as after ``import bailong`` before (bailong.lora, ...)
        try:
            return importlib.import_module(f"bailong.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"bailong.{name}":
                raise
            raise AttributeError(f"module 'bailong' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"bailong.{MODULES[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(MODULES))
