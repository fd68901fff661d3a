"""Bailong: teach a Llama 2 model a new language with QLoRA and zip-tie embeddings.

    model, tokenizer = bailong.load("meta-llama/Llama-2-7b-hf")   # or a local folder
    logits = model(input_ids)                                     # (B, T, vocab)
"""
from bailong.config import PRESETS, ModelConfig
from bailong.errors import BailongError
from bailong.generate import Sampling, generate
from bailong.model import KVCache, Llama
from bailong.tokenizer import Tokenizer
from bailong.weights import load, load_preset, save

__all__ = ["PRESETS", "ModelConfig", "BailongError", "Sampling", "generate", "KVCache", "Llama",
           "Tokenizer", "load", "load_preset", "save"]
