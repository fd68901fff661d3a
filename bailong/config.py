"""Model configuration: one dataclass, read from a Hugging Face config.json or a preset; and how the next token
is sampled (read before torch loads: chat.py checks its options first)."""
import math
from numbers import Integral
from dataclasses import asdict, dataclass, field, fields, replace

from bailong.errors import BailongError, read_json

# the float dtypes config.json's torch_dtype and the --dtype options name, by torch's names (getattr(torch, name));
# names rather than dtypes, so that reading a config does not import torch
DTYPES = ("float32", "bfloat16", "float16")
# How zip_tie starts the embedding rows of added pieces (bailong/zip_tie.py explains each); named here, beside
# the other choices, so that train.py checks --init-method without torch.
INIT_METHODS = ("zip-tie", "zip-tie-first", "mean-all", "random")
# The most pieces a vocabulary extension adds (Bailong's 27,241; Llama 3's whole vocabulary 128,256): SentencePiece's
# trainer reads a size past 2**31 as no number, and a size far past the corpus is a slip of the keyboard
MAX_NEW_PIECES = 1_000_000
# The RoPE scalings we compute, and the settings each needs from config.json.
ROPE_SCALING = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
SWITCHES = ("tie_word_embeddings", "attention_bias", "mlp_bias")  # read as true or false
# what transformers' LlamaConfig takes where config.json is silent (the presets' Llama 2 values differ)
HF_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}


@dataclass
class ModelConfig:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ...}: see model.rope_frequencies
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    bos_token_id: int = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.num_attention_heads % self.num_key_value_heads:
            raise BailongError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise BailongError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf(cls, hf: dict, source="config.json"):
        """Read a Hugging Face Llama config; refuse what this model would get wrong."""
        arch = hf.get("architectures") or ["LlamaForCausalLM"]
        if hf.get("model_type", "llama") != "llama" or arch[0] != "LlamaForCausalLM":
            raise BailongError(
                f"{source}: unsupported architecture {arch[0]} (model_type "
                f"{hf.get('model_type')!r}); only LlamaForCausalLM is supported")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # one function, by two names
            raise BailongError(f"{source}: unsupported hidden_act {hf['hidden_act']!r}; Llama uses silu")
        for k in SWITCHES:
            if hf.get(k) is not None and not isinstance(hf[k], bool):
                raise BailongError(f"{source}: {k} must be true or false, not {hf[k]!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise BailongError(f"{source}: {flag}=true is not supported")
        # transformers >= 5 writes rope settings as rope_parameters; older ones as rope_theta/rope_scaling
        for k in ("rope_parameters", "rope_scaling"):
            if hf.get(k) is not None and not isinstance(hf[k], dict):
                raise BailongError(f"{source}: {k} must be an object ({{\"rope_type\": ..., \"factor\": ...}}) "
                                   f"or null, not {hf[k]!r}")
        # both (rope_scaling added to a newer config by hand): rope_scaling, as transformers reads it, and its theta
        # where it gives one, else the top level's
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if not isinstance(kind, str) or kind not in ROPE_SCALING:
            raise BailongError(f"{source}: unsupported rope scaling type {kind!r} (supported: "
                               f"{', '.join(ROPE_SCALING)})")
        for k in ROPE_SCALING[kind]:
            if isinstance(rope.get(k), bool) or not isinstance(rope.get(k), (int, float)) or rope[k] <= 0:
                raise BailongError(f"{source}: rope scaling {kind!r} needs {k}, a number above 0, not {rope.get(k)!r}")
        if kind == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
            raise BailongError(f"{source}: rope scaling 'llama3' needs high_freq_factor above low_freq_factor")
        if missing := [k for k in REQUIRED if k not in hf]:
            raise BailongError(f"{source}: missing {missing[0]} (a Llama config.json gives {', '.join(REQUIRED)})")
        for k in REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            if hf.get(k) is not None and (not isinstance(hf[k], int) or isinstance(hf[k], bool) or hf[k] < 1):
                raise BailongError(f"{source}: {k} must be a positive integer, not {hf[k]!r}")
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        for k, v in (("rms_norm_eps", hf.get("rms_norm_eps")), ("rope_theta", theta)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise BailongError(f"{source}: {k} must be a number above 0, not {v!r}")
        known = {f.name for f in fields(cls)}
        args = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if k in known and v is not None}}
        args["rope_theta"] = cls.rope_theta if theta is None else theta
        args["rope_scaling"] = {"rope_type": kind, **{k: rope[k] for k in ROPE_SCALING[kind]}} \
            if ROPE_SCALING[kind] else None
        try:
            return cls(**args)
        except BailongError as e:  # __post_init__'s checks of the values together (heads, head_dim)
            raise BailongError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path):
        hf = read_json(path, "no such file (a model folder needs config.json)")
        try:
            return cls.from_hf(hf, source=str(path))
        except TypeError as e:  # a field of the wrong type
            raise BailongError(f"{path}: {e}") from None

    def to_hf(self) -> dict:
        """The config.json that transformers reads for this model."""
        hf = {k: v for k, v in asdict(self).items() if v is not None or k != "rope_scaling"}
        hf["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **hf}


PRESETS = {
    # Runs in seconds on a CPU; grouped-query attention like the larger Llamas.
    "tiny": ModelConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                        max_position_embeddings=256),
    "llama2-7b": ModelConfig(),
    "llama2-13b": ModelConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40),
    "tinyllama-1.1b": ModelConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                  num_attention_heads=32, num_key_value_heads=4,
                                  max_position_embeddings=2048),
}


def torch_dtype(dtype):
    """A dtype given as torch's, or by the name the commands' --dtype takes ("bfloat16"); None stays None."""
    import torch
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}, or a torch dtype")
    return getattr(torch, dtype)


def preset(name) -> ModelConfig:
    try:
        return replace(PRESETS[name])  # a copy: callers may change it
    except KeyError:
        raise BailongError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


@dataclass
class Sampling:
    """How the next token is chosen. Defaults are those Bailong-instruct's model card gives."""
    temperature: float = 0.6  # 0 means greedy (argmax)
    top_k: int = 40  # keep the k most likely tokens; 0 keeps all
    top_p: float = 0.9  # keep the smallest set whose probability reaches p; 1.0 keeps all
    repetition_penalty: float = 1.1  # 1.0 is off
    seed: int | None = None  # set for reproducible sampling

    def __post_init__(self):
        """Refuse values that would sample something other than what they say (ValueError, naming the field)."""
        for name, ok, what in [("temperature", lambda v: v >= 0, "0 (greedy) or more"),
                               ("top_k", lambda v: v >= 0, "0 (all tokens) or more"),
                               ("top_p", lambda v: 0 < v <= 1, "above 0 and at most 1"),
                               ("repetition_penalty", lambda v: v > 0, "above 0 (1 is off)")]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value) or (name == "top_k" and value != int(value)):
                raise ValueError(f"{name} must be {what}, not {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise ValueError(f"seed must be a whole number or None, not {self.seed!r}")
        self.top_k = int(self.top_k)  # a generation_config.json may say 50.0


SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty")


# transformers' values for what a generation_config.json leaves out, or sets to null (GenerationConfig's defaults)
HF_SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
