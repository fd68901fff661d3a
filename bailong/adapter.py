"""LoRA adapters in PEFT's format, so that PEFT users can load ours and we theirs.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
whose keys are ours behind the prefix ``base_model.model.``:

    model.layers.0.self_attn.q_proj.lora_A.weight   ->  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    model.embed_tokens.lora_embedding_A             ->  base_model.model.model.embed_tokens.lora_embedding_A

When the embedding or the head carries LoRA, PEFT also stores their full
(possibly resized) weights as ``<module>.base_layer.weight``; we do the same.
"""
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from bailong.errors import BailongError, read_json
from bailong.files import atomic_write
from bailong.hub import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, resolve
from bailong.lora import LoRAConfig, LoRAEmbedding, LoRALinear, add_lora, lora_state_dict
from bailong.lora_casts import group_casts
from bailong.tokenizer import open_tokenizer
from bailong.zip_tie import resize_vocab

PREFIX = "base_model.model."
VOCABULARY_ROWS = ("model.embed_tokens", "lm_head")  # the modules a grown vocabulary grows
BASE_KEY = "bailong.base"  # the adapter file's metadata: the fingerprint of the base it was trained on
# PEFT options that change what an adapter computes; we refuse them rather than ignore them
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "modules_to_save": None, "layers_to_transform": None, "trainable_token_indices": None,
               "target_parameters": None, "layer_replication": None,
               # activated LoRA (from its invocation tokens on only), and variants that change the update's form
               "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "arrow_config": None,
               "kasa_config": None, "monteclora_config": None}
# PEFT initialisations whose adapter is an update onto a base PEFT makes from the model as it loads it (PiSSA,
# OLoRA, CorDA subtract the initial B A from W; LoftQ quantizes it; LoRA-GA needs the gradients it was made with)
BASE_CHANGING = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# the fields the scaling and the dropout are computed from, what each must be, and the test
FIELDS = {"r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
          "lora_alpha": ("a number", _number),
          "lora_dropout": ("a number at least 0 and below 1", lambda v: _number(v) and 0 <= v < 1),
          "use_rslora": ("true or false", lambda v: isinstance(v, bool))}


def save_adapter(model, folder, config: LoRAConfig, base_model_name_or_path=None):
    """Write the model's LoRA weights and config as a PEFT adapter folder (atomically per file). The embedding
    and head go whole with it where they carry LoRA (as PEFT saves them), and where the model's vocabulary grew
    (``zip_tie.extend_model``, ``resize_vocab``) or ``config.save_embedding_layers`` asks (as PEFT's
    ``save_embedding_layers``): a grown model's new rows are in no LoRA weight. Its tokenizer, with the new
    pieces, is saved there too (``tokenizer.save(folder)``): loading takes the grown vocabulary's size from it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + k: v.contiguous() for k, v in lora_state_dict(model).items()}
    grown = getattr(model, "vocab_grown_from", None) is not None
    targets = set()
    for name, m in model.named_modules():
        wrapped = isinstance(m, (LoRALinear, LoRAEmbedding))
        if wrapped:
            targets.add(name.rsplit(".", 1)[-1])
        if name.endswith(("embed_tokens", "lm_head")) and wrapped:  # as PEFT: the full weight, resized or not
            tensors[f"{PREFIX}{name}.base_layer.weight"] = m.weight.detach().contiguous()
        elif name.endswith("embed_tokens") and (config.save_embedding_layers or grown) or (
                name.endswith("lm_head") and grown and not model.config.tie_word_embeddings):  # PEFT's keys
            tensors[f"{PREFIX}{name}.weight"] = m.weight.detach().contiguous()
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.alpha,
                   "lora_dropout": config.dropout, "use_rslora": config.rslora, "target_modules": sorted(targets),
                   "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
                   "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, **UNSUPPORTED}
    metadata = {"format": "pt"} | ({BASE_KEY: config.base_fingerprint} if config.base_fingerprint else {})
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(folder / ADAPTER_CONFIG, json.dumps(peft_config, indent=2))


def trained_base(folder: Path) -> str | None:
    """The fingerprint of the base an adapter folder was trained on (``weights.fingerprint``); None where it
    does not say (PEFT's adapters, Bailong's of before)."""
    try:
        with safe_open(folder / ADAPTER_WEIGHTS, framework="pt") as f:
            return (f.metadata() or {}).get(BASE_KEY)
    except (OSError, SafetensorError):
        return None  # loading it says what is wrong


def read_adapter_config(folder: Path) -> dict:
    file = folder / ADAPTER_CONFIG
    if not file.exists() and (folder / "adapter" / ADAPTER_CONFIG).is_file():  # a training output, or checkpoint
        raise BailongError(f"{folder}: a training output, not an adapter folder; name its adapter "
                           f"({folder / 'adapter'}), or give the output itself as the model")
    config = read_json(file, f"no such file (an adapter folder needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    if config.get("peft_type") != "LORA":
        raise BailongError(f"{file}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, [], {}):
            raise BailongError(f"{file}: {key}={config[key]!r} is not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING):  # as PEFT compares them
        convert = " (save it with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...), " \
            "which makes it a plain LoRA adapter)" if not init.lower().startswith("loftq") else ""
        raise BailongError(f"{file}: init_lora_weights={init!r} is not supported: PEFT makes such an adapter's base "
                           f"from the model as it loads it, which Bailong does not{convert}")
    if missing := [k for k in ("r", "lora_alpha") if k not in config]:
        raise BailongError(f"{file}: missing {missing[0]} (a LoRA adapter config gives r and lora_alpha)")
    for key, (what, ok) in FIELDS.items():
        if key in config and not ok(config[key]):
            raise BailongError(f"{file}: {key} must be {what}, not {json.dumps(config[key])}")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict) or not all(_number(v) for v in patterns.values()):
        raise BailongError(f"{file}: alpha_pattern must map module names to numbers, not {json.dumps(patterns)}")
    return config


def load_adapter(model, path_or_repo_id, revision=None, complete=False) -> LoRAConfig:
    """Wrap the modules a PEFT LoRA adapter names and load its weights; returns its config.

    A module already wrapped in LoRA (a run being resumed) takes the weights as they are. With
    ``complete``, every LoRA weight of the model must be in the adapter. Everything is checked before
    anything is loaded, so a refused adapter leaves the model as it was.
    """
    folder = resolve(str(path_or_repo_id), revision, files=ADAPTER_FILES, weights=False)
    peft = read_adapter_config(folder)
    config = LoRAConfig(r=peft["r"], alpha=peft["lora_alpha"], dropout=peft.get("lora_dropout", 0.0),
                        rslora=peft.get("use_rslora", False), targets=tuple(peft.get("target_modules") or ()))
    file = folder / ADAPTER_WEIGHTS
    if not file.exists():
        raise BailongError(f"{file}: no such file (pickled adapter_model.bin is not loaded)")
    try:
        with safe_open(file, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in sorted(f.keys())}
    except SafetensorError as e:
        raise BailongError(f"{file}: not a valid safetensors file ({e})") from None
    modules = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                             r"lora_embedding_B|base_layer\.weight)", key)
        whole = re.fullmatch(re.escape(PREFIX) + r"(.*(?:embed_tokens|lm_head))\.weight", key)  # no LoRA on it
        if not (match or whole):
            raise BailongError(f"{file}: key {key} is not a LoRA weight in PEFT's layout")
        name, part = (match[1], match[2]) if match else (whole[1], "base_layer.weight")
        modules.setdefault(name, {})[part] = (key, tensor)
    vocab = _grown_vocabulary(model, modules, folder)
    for name, parts in modules.items():
        _check_fits(model, name, parts, file, vocab)
    if complete and (missing := sorted(set(lora_state_dict(model)) - {
            f"{name}.{part}" for name, parts in modules.items() for part in parts})):
        raise BailongError(f"{file}: does not fit this model (it lacks {missing[0]})")
    if vocab:
        resize_vocab(model, vocab)  # the rows themselves are loaded below
    for name, parts in modules.items():
        lora_key = "lora_A.weight" if "lora_A.weight" in parts else "lora_embedding_A"
        if lora_key not in parts:  # only a base_layer weight
            with torch.no_grad():
                model.get_submodule(name).weight.copy_(parts["base_layer.weight"][1])
            continue
        r = parts[lora_key][1].shape[0]
        scaling = config.scaling(r, _pattern(peft.get("alpha_pattern"), name, config.alpha))
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, (LoRALinear, LoRAEmbedding)):
            wrapper = add_lora(model, name, r, scaling, config.dropout)
        with torch.no_grad():
            for part, (_, tensor) in parts.items():
                target = wrapper.weight if part == "base_layer.weight" else wrapper.get_parameter(part)
                target.copy_(tensor)
    group_casts(model)  # the LoRA layers added here cast together
    return config


def _grown_vocabulary(model, modules, folder) -> int | None:
    """An adapter trained on an extended vocabulary ships its tokenizer and the grown embedding and
    head rows: the vocabulary the base grows to before they are loaded, where it is larger than the base's."""
    tokenizer = open_tokenizer(folder)
    if tokenizer is None:
        return None
    vocab = tokenizer.vocab_size
    rows = {parts["base_layer.weight"][1].shape[0] for name, parts in modules.items()
            if name in VOCABULARY_ROWS and "base_layer.weight" in parts}
    return vocab if rows == {vocab} and vocab > model.config.vocab_size else None


def _pattern(patterns, name, default):
    """PEFT's per-module override: the first pattern matching the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):  # as PEFT matches: a pattern "q_proj|v_proj" takes both
            return value
    return default


def _check_fits(model, name, parts, file, vocab=None):
    """Every tensor of one module must fit the base, its embedding and head grown to ``vocab`` rows where given;
    the error names the first key that does not."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        key = min(k for k, _ in parts.values())
        raise BailongError(f"{file}: {key} names module {name}, which the base model lacks") from None
    if model.config.tie_word_embeddings and name.endswith(("embed_tokens", "lm_head")) and set(parts) - {
            "base_layer.weight"}:  # one weight for both: LoRA on one would change the other (add_lora refuses)
        raise BailongError(f"{file}: LoRA on {name}, but the base ties its embedding and head "
                           "(tie_word_embeddings): not supported")
    if isinstance(module, (nn.Embedding, LoRAEmbedding)):
        (rows, dim), kind = module.weight.shape, "embedding"
        shapes = {"lora_embedding_A": lambda r: [r, rows], "lora_embedding_B": lambda r: [dim, r]}
        rank_key = "lora_embedding_A"
    elif hasattr(module, "in_features"):
        rows, dim, kind = module.out_features, module.in_features, "linear"
        shapes = {"lora_A.weight": lambda r: [r, dim], "lora_B.weight": lambda r: [rows, r]}
        rank_key = "lora_A.weight"
    else:
        raise BailongError(f"{file}: {min(k for k, _ in parts.values())} targets {name}, "
                           f"a {type(module).__name__} that LoRA cannot wrap")
    if vocab and name in VOCABULARY_ROWS:
        rows = vocab
    if len(lora := [p for p in shapes if p in parts]) == 1:  # half an update (a damaged file): PEFT warns
        missing = next(p for p in shapes if p not in parts)
        raise BailongError(f"{file}: holds {parts[lora[0]][0]} but not {PREFIX}{name}.{missing}")
    r = parts[rank_key][1].shape[0] if rank_key in parts else None
    shapes["base_layer.weight"] = lambda r: [rows, dim]
    for part, (key, tensor) in sorted(parts.items(), key=lambda item: item[1][0]):
        if part not in shapes:
            raise BailongError(f"{file}: {key} does not fit {name}, a {kind} layer")
        expected = shapes[part](r)
        if isinstance(module, (LoRALinear, LoRAEmbedding)) and part != "base_layer.weight":  # already wrapped
            expected = list(module.get_parameter(part).shape)
        if list(tensor.shape) != expected:
            grown = "; an adapter trained on an extended vocabulary carries its tokenizer in its folder (save it " \
                "there: tokenizer.save(folder))" if name in VOCABULARY_ROWS and tensor.shape[0] > rows else ""
            raise BailongError(f"{file}: {key} has shape {list(tensor.shape)}, but the base's {name} "
                               f"({kind}, {rows} x {dim}) needs {expected}{grown}")
