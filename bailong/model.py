"""Llama 2 in plain PyTorch.

Attribute names follow Hugging Face's layout (``model.layers.0.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``model.embed_tokens``, ``lm_head``), so
``state_dict()`` is the checkpoint format itself: loading is a copy, PEFT adapter
keys are a fixed prefix away, and export is a save.

    x = embed_tokens(ids)
    for each layer:
        x = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
        x = x + down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))
    logits = lm_head(norm(x))
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from bailong.config import ModelConfig
from bailong.layer_fused import attention_kernels, fused_layer
from bailong.lora import LoRAEmbedding, frozen_matmul_skipped
from bailong.lora_casts import let_casts_go, new_forward
from bailong.memory import OffloadedInput, chunked_mlp, summed_loss
from bailong.quantized import embedding_rows
from bailong.recompute import checkpoint, mask_seeds


def decode_kernels(x):
    """The module ``bailong_kernels.decode`` where ``x`` takes the fused inference kernels (CUDA, no
    gradient, switched on: ``bailong_kernels.decode_enabled``), else None: then the PyTorch code beside
    each call runs."""
    if not x.is_cuda:
        return None
    import bailong_kernels  # Triton is imported only where it runs
    if not bailong_kernels.decode_enabled(x):
        return None
    from bailong_kernels import decode
    return decode


def layer_kernels(x):
    """The module ``bailong_kernels.layers`` where ``x`` takes the training layer kernels (CUDA, a gradient
    wanted, switched on: ``bailong_kernels.layer_enabled``), else None: then the PyTorch code beside each
    call runs."""
    if not x.is_cuda:
        return None
    import bailong_kernels  # Triton is imported only where it runs
    if not bailong_kernels.layer_enabled(x):
        return None
    from bailong_kernels import layers
    return layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if (fused := decode_kernels(x)) is not None:
            return fused.rms_norm(x, self.weight, self.eps)
        if not self.weight.requires_grad and (fused := layer_kernels(x)) is not None:  # QLoRA: a frozen norm
            return fused.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 whatever the compute dtype, then scale: as Llama does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(config: ModelConfig, device=None):
    """The rotary frequencies theta^(-2i/d), i < d/2, as ``config.rope_scaling`` rescales them.

    "linear" divides them all by the factor (positions / factor). "llama3" divides
    only the slow ones, whose wavelength exceeds the original context divided by
    low_freq_factor; keeps the fast ones (wavelength under context / high_freq_factor);
    and blends the two in between.
    """
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d)
    scaling = config.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / inv_freq
        kept = ((scaling["original_max_position_embeddings"] / wavelength - low) / (high - low)).clamp(0, 1)
        return (1 - kept) * inv_freq / scaling["factor"] + kept * inv_freq
    return inv_freq


def rope_cos_sin(config: ModelConfig, positions, dtype):
    """cos and sin of the rotary angles for integer ``positions`` (T,), each (T, head_dim).

    Frequencies are duplicated ([f0..f_{d/2-1}, f0..f_{d/2-1}]) because Hugging Face
    checkpoints permute q/k weights so that dimension i pairs with i + d/2 (Meta's original
    layout pairs 2i with 2i+1).
    """
    angles = positions.float()[:, None] * rope_frequencies(config, positions.device)  # (T, d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by the position's angle. x: (B, H, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of past positions for every layer, preallocated to ``max_len``.

    Each call writes positions [pos, pos + T) and attends to positions [0, pos + T):
    the attention sees exactly the positions written so far.
    """
    pos = 0  # positions written so far

    def __init__(self, config: ModelConfig, batch, max_len, device, dtype):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def prepare(self, T):
        """Positions (T,) of the next T tokens and their attention mask (None: causal, or one token)."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos} + {T} do not fit")
        # SDPA's is_causal aligns the mask top-left, which is right only without a past;
        # one new token may see everything; a chunk after a past needs an explicit mask.
        mask = None
        if self.pos and T > 1:
            mask = torch.ones(T, self.pos + T, dtype=torch.bool, device=self.k.device).tril(diagonal=self.pos)
        return torch.arange(self.pos, self.pos + T, device=self.k.device), mask

    def layer(self, layer):
        """This layer's keys and values that a one-token step reads and writes (B, KV, pos + 1, D): the fused
        decoding attention writes the new token's and attends over those before it."""
        return self.k[layer, :, :, :self.pos + 1], self.v[layer, :, :, :self.pos + 1]

    def update(self, layer, positions, k, v):
        """Store this call's keys/values; return all keys/values so far, (B, KV, pos + T, D)."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T):
        self.pos += T


class StaticKVCache(KVCache):
    """A KV cache whose position lives on the device: every call of the same length runs
    the same kernels on tensors of the same shapes at the same addresses, whatever the
    position, so a decoding step can be captured once in a CUDA graph and replayed.

    The price: attention runs over the first ``window`` positions of the buffer (all of
    them unless the caller narrows it to what the positions written so far need),
    masking those not yet written, and nothing checks for overflow (the caller
    sizes ``max_len`` and ``window``).
    """

    def __init__(self, config: ModelConfig, batch, max_len, device, dtype):
        super().__init__(config, batch, max_len, device, dtype)
        self.next = torch.zeros((), dtype=torch.long, device=device)  # the next position to write
        self.window = max_len  # the positions attended over, written or not

    @property
    def pos(self):
        return int(self.next)  # waits for the device: for callers, never inside a step

    def prepare(self, T):
        positions = self.next + torch.arange(T, device=self.k.device)  # (T,)
        return positions, torch.arange(self.window, device=self.k.device) <= positions[:, None]  # (T, window)

    def layer(self, layer):
        return self.k[layer, :, :, :self.window], self.v[layer, :, :, :self.window]

    def update(self, layer, positions, k, v):
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.layer(layer)

    def advance(self, T):
        self.next += T  # on the device: replaying a captured step moves it too


def project(x, *layers):
    """``m(x)`` for each of the linear layers, which read the same x; LoRA layers may answer together
    (``LoRALinear.shared``: x read once for all of them, one gradient for it), and so may NF4 layers when
    decoding with the fused kernels (one GEMV launch). Their forward hooks, if anyone set some, then do not run."""
    shared = getattr(layers[0], "shared", None)
    if shared and (ys := shared(x, layers)):
        return ys
    if (fused := decode_kernels(x)) is not None and (ys := fused.projections(x, layers)):
        return ys
    return tuple(m(x) for m in layers)


def add_projection(residual, layer, x, last=False):
    """``residual + layer(x)`` (no residual: ``layer(x)``), the add inside the projection where it can be: in a
    fused LoRA layer's base matmul (``LoRALinear.added``; ``last``: the layer's last projection), or, decoding
    with the fused kernels, on the way out of an NF4 layer's GEMV launch. The layer's forward hooks, if anyone
    set some, then do not run."""
    if residual is None:
        return layer(x)
    if (added := getattr(layer, "added", None)) and (y := added(residual, x, last)) is not None:
        return y
    if (fused := decode_kernels(x)) is not None and (y := fused.added_projection(residual, layer, x)) is not None:
        return y
    return residual + layer(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.cudnn_first = False  # SDPA tries cuDNN's kernel first (``Llama.cudnn_attention``)

    def forward(self, x, cos, sin, positions, mask, cache: KVCache | None = None, residual=None):
        """The attention output, plus ``residual`` where one is given."""
        B, T, _ = x.shape
        if T == 1 and cache is not None and (fused := decode_kernels(x)) is not None:
            # one new token: RoPE, the cache write and attention over the filled positions in one kernel
            y = fused.decode_attention(*project(x, self.q_proj, self.k_proj, self.v_proj), cos, sin, positions,
                                       *cache.layer(self.layer_idx))
            return add_projection(residual, self.o_proj, y)
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        fused = layer_kernels(x) if cache is None else None
        if fused is not None:  # training: RoPE in one launch each way, before the heads are split
            q, k = fused.rope(q, cos, sin, self.head_dim), fused.rope(k, cos, sin, self.head_dim)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        if fused is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, positions, k, v)  # (B, KV, S, D)
        with attention_kernels(self.cudnn_first):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D)
        return add_projection(residual, self.o_proj, y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, residual=None):
        """The MLP's output, plus ``residual`` where one is given: in training, switched on, chunk by chunk over
        the tokens (``bailong.memory.chunked_mlp``)."""
        if residual is not None and (y := chunked_mlp(self.unchunked, x, residual, self.gate_proj.out_features,
                                                      self.parameters())) is not None:
            return y
        return self.unchunked(x, residual)

    def unchunked(self, x, residual=None):
        decode = decode_kernels(x)
        h = decode and decode.gated_projection(x, self.gate_proj, self.up_proj)  # gate, up, SwiGLU: one launch
        if h is None:
            gate, up = project(x, self.gate_proj, self.up_proj)
            fused = decode or layer_kernels(x)
            h = fused.swiglu(gate, up) if fused is not None else F.silu(gate) * up  # SwiGLU
        return add_projection(residual, self.down_proj, h, last=True)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, mask, cache=None):
        x = self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, cache, residual=x)  # x + attention
        return self.mlp(self.post_attention_layernorm(x), residual=x)  # x + MLP


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """A Llama causal language model: ``model(input_ids)`` gives logits (B, T, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.checkpointing = False  # recompute each layer in the backward instead of keeping its activations
        self.offload = False  # with checkpointing: each layer's input kept in host memory (``OffloadedInput``)
        self.keep_dequantized = False  # with checkpointing: the recomputation's NF4 copies serve the backward too
        self.keep_attention = False  # with checkpointing: attention's output kept (``bailong.layer_fused``)
        self.tie_weights()

    @property
    def cudnn_attention(self) -> bool:
        """Whether every layer's attention tries SDPA's cuDNN kernel first (``train.py --cudnn-attention``), then
        torch's others where cuDNN's cannot take the call (``bailong.layer_fused.attention_kernels``)."""
        return all(layer.self_attn.cudnn_first for layer in self.model.layers)

    @cudnn_attention.setter
    def cudnn_attention(self, on: bool):
        for layer in self.model.layers:
            layer.self_attn.cudnn_first = on

    def tie_weights(self):
        """Share the input embedding with the output head where the config asks for it.

        Called again after the parameters are materialised (``to_empty`` unties them).
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch=1, max_len=None, static=False) -> KVCache:
        """An empty KV cache; ``static`` keeps its position on the device (for CUDA graphs)."""
        p = self.lm_head.weight
        kind = StaticKVCache if static else KVCache
        return kind(self.config, batch, max_len or self.config.max_position_embeddings, p.device, p.dtype)

    def hidden_states(self, input_ids, cache: KVCache | None = None):
        """Final-norm hidden states (B, T, hidden), writing to and advancing ``cache`` if given."""
        if input_ids.dim() != 2:  # (one prompt's ids alone: input_ids[None] makes a batch of one)
            raise ValueError(f"input_ids must be (batch, tokens), not of shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if torch.is_grad_enabled():  # LoRA's compute-dtype copies made again (``bailong.lora_casts``), kept for the
            new_forward()  # recomputation; without a gradient none are used (a teacher's forward leaves them)
        embed = self.model.embed_tokens  # a plain one's table may be in host memory (``offload_embedding``)
        x = embed(input_ids) if isinstance(embed, LoRAEmbedding) else embedding_rows(embed.weight, input_ids)
        if cache is None:
            positions, mask = torch.arange(T, device=input_ids.device), None
        else:
            positions, mask = cache.prepare(T)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)  # (T, D) each
        offloaded = None  # the layer before's OffloadedInput: its input is fetched back as this layer's comes back
        for layer in self.model.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                offloaded = OffloadedInput(x, offloaded) if self.offload else None
                with offloaded or contextlib.nullcontext():  # bailong.layer_fused, else bailong.recompute
                    y = fused_layer(layer, x, cos, sin, mask, cache, layer_kernels(x), self.keep_dequantized,
                                    self.keep_attention)
                    x = y if y is not None else checkpoint(layer, x, (cos, sin, positions, mask, cache),
                                                           self.keep_dequantized,
                                                           own=frozen_matmul_skipped(layer.mlp.down_proj))
                let_casts_go(layer)  # where they are made by layer: again in the recomputation
            else:
                x = layer(x, cos, sin, positions, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def forward(self, input_ids, cache: KVCache | None = None, last_only=False, targets=None):
        """Logits (B, T, vocab); with ``last_only``, only the last position's (B, 1, vocab). With ``targets``
        (B, T; already shifted, unlike transformers' labels: ``targets[:, t]`` is the token after
        ``input_ids[:, t]``; -100 where nothing is learned), the training loss instead: the mean cross-entropy over the
        targeted positions, from float32 logits. LoRA dropout's kernels key this forward's masks from one seed
        (``bailong.recompute.MaskSeeds``)."""
        with mask_seeds():
            h = self.hidden_states(input_ids, cache)
            if targets is None:
                h = h[:, -1:] if last_only else h
                if (fused := decode_kernels(h)) is not None and (logits := fused.projections(h, (self.lm_head,))):
                    return logits[0]  # decoding: the head by the GEMV kernel (its forward hooks, if any, not run)
                return self.lm_head(h)
            targets = targets.flatten()
            total = summed_loss(h.flatten(0, 1), self.lm_head, targets, layer_kernels(h))
        return total / (targets != -100).sum().clamp(min=1)


def init_weights(model: Llama, std=0.02):
    """Random weights as Llama's initialiser draws them (normal(0, std), norms at one)."""
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=std)
    return model
