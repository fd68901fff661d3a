"""Tiny random Hugging Face Llama checkpoints, the oracle for parity tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def hf_model(kind="gqa", seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, vocab_size=300,
                max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)
    config = LlamaConfig(**{**args, **CONFIGS[kind], **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so a missed norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_hf(tmp_path, kind="gqa", shard_size=None, **overrides):
    """Save a random model with save_pretrained; returns (folder, hf_model)."""
    model = hf_model(kind, **overrides)
    folder = tmp_path / kind
    model.save_pretrained(folder, max_shard_size=shard_size or "1GB")
    return folder, model
