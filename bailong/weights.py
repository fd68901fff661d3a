"""Load a model's safetensors weights (NF4 too) and save them.

The model is built on the meta device (no memory), materialised empty in the
target dtype, and filled one tensor at a time, each shard opened for only as
long as one tensor is read. Peak host memory therefore stays near one copy of
the weights in the target dtype plus the largest single tensor, whatever the
dtype on disk (measured in bench/bench_load_memory.py).
"""
import hashlib
import json
import math
import re
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from bailong.adapter import load_adapter, trained_base
from bailong.config import ModelConfig, preset, torch_dtype
from bailong.errors import BailongError, BailongWarning, check_device, read_json
from bailong.files import atomic_write
from bailong.hub import ADAPTER_FILES, resolve
from bailong.model import Llama, init_weights
from bailong.nf4 import NF4Tensor, quantize
from bailong.outputs import check_not_a_run, training_output
from bailong.progress import BAR_HIDDEN
from bailong.quantized import NF4Linear, ErrorMeter, bnb_quantization_config, memory_report, projections, set_module
from bailong.tokenizer import adapted_tokenizer, byte_tokenizer, check_fits

FLOAT_DTYPES = {"F32", "F16", "BF16"}


def shards(folder: Path) -> dict[Path, list[str] | None]:
    """Each weight file and the tensor names it should hold (None: whatever it holds). A folder holding both
    layouts (files copied in by hand) is read as transformers reads it: model.safetensors."""
    single = folder / "model.safetensors"
    if single.exists():
        if not single.is_file():  # (safetensors says only "No such device")
            raise BailongError(f"{single}: is not a file")
        return {single: None}
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("weight_map is not an object of tensor names and file names")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise BailongError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = {}
        for name, file in weight_map.items():
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise BailongError(f"{index}: names shard {file}, outside its folder")
            files.setdefault(folder / file, []).append(name)
        for file in files:
            if not file.is_file():
                raise BailongError(f"{index}: names shard {file.name}, which is " + ("not a file" if file.exists()
                                                                                     else "missing"))
        return files
    hint = " (pickled .bin weights are not loaded: convert them to safetensors)" \
        if any(folder.glob("*.bin")) else ""
    raise BailongError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


FINGERPRINTED = "model.layers.0.self_attn.q_proj.weight"


def fingerprint(folder) -> str | None:
    """A short hash of the stored bytes of the first layer's q_proj weight: which base an adapter was trained on.
    Any fine-tuning or merged adapter changes it (a copy in another dtype or quantized differs too); None where
    the files lack it."""
    for file, names in shards(Path(folder)).items():
        if names is None or FINGERPRINTED in names:
            with safe_open(file, framework="pt") as f:
                if FINGERPRINTED in f.keys():
                    data = f.get_tensor(FINGERPRINTED).contiguous().flatten().view(torch.uint8)
                    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]
    return None


def stored_tensors(folder: Path) -> dict[str, tuple[Path, list[int], str]]:
    """Each tensor of a checkpoint: its file, shape and dtype, from the files' headers (no tensor is read)."""
    found = {}
    for file in shards(folder):
        try:
            with safe_open(file, framework="pt") as f:
                found |= {k: (file, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
        except SafetensorError as e:
            raise BailongError(f"{file}: not a valid safetensors file ({e})") from None
    return found


def stored_dtype(folder: Path) -> str | None:
    """The floating-point dtype most of a checkpoint's weights are stored in ("bfloat16", "float16", "float32"),
    by their sizes (a 4-bit checkpoint's many small float32 scales do not outvote its bfloat16 embeddings), from
    its files' headers; None where it has none of these."""
    names, sizes = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}, {}
    for _, shape, dtype in stored_tensors(folder).values():
        if dtype in names:
            sizes[names[dtype]] = sizes.get(names[dtype], 0) + math.prod(shape)
    return max(sorted(sizes), key=sizes.get) if sizes else None


def own_dtype(folder: Path) -> torch.dtype | None:
    """A checkpoint folder's own dtype: its config.json's, else most of its weights'; a training output's, its
    base's. None where none of these says."""
    from bailong.config import DTYPES
    if run := training_output(folder):
        return own_dtype(resolve(str(run[0])))
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    name = config.get("torch_dtype") or config.get("dtype") or (stored_dtype(folder) if config else None)
    return getattr(torch, name) if name in DTYPES else None


def check_shapes(model: Llama, stored: dict):
    """The shapes of the checkpoint's float tensors against those of ``model``, built on the meta device: checked
    before memory is taken for it (a mistyped size in config.json asked for terabytes)."""
    params = model.state_dict()
    for name, (file, shape, dtype) in stored.items():
        if name in params and dtype in FLOAT_DTYPES and shape != list(params[name].shape):
            raise BailongError(f"{file}: tensor {name} has shape {shape}, config.json implies "
                               f"{list(params[name].shape)}")


def read_tensors(file: Path, names=None, allow_uint8=False):
    """Yield (name, tensor) from one safetensors file, checking names and dtypes first.

    The file is reopened for each tensor: safetensors memory-maps the whole file,
    and pages read stay resident until it is closed, so a long-open shard would
    add its full size to peak memory.
    """
    try:
        with safe_open(file, framework="pt") as f:
            present = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        for name in names or present:
            if name not in present:
                raise BailongError(f"{file}: the index says it holds {name}, but it does not")
            if present[name] not in FLOAT_DTYPES and not (allow_uint8 and present[name] == "U8"):
                raise BailongError(f"{file}: tensor {name} is {present[name]}; expected float32/16 or bfloat16")
            with safe_open(file, framework="pt") as f:
                tensor = f.get_tensor(name)
            yield name, tensor
    except SafetensorError as e:
        raise BailongError(f"{file}: not a valid safetensors file ({e})") from None


class _MetaShortcuts(TorchFunctionMode):
    """A model built on the meta device, then made on a real one, as loading does: no normal weights drawn (an
    embedding's), which loading replaces, and each empty tensor made directly. On meta, torch draws them and
    copies their layout through Python code that imports torch._dynamo (1.3 s) and sympy's shapes (0.3 s) first:
    half of chat.py's start. A mode, as torch.device's is, holds for this thread only."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.init.normal_:
            return args[0] if args else kwargs["tensor"]
        if func is torch.empty_like and set(kwargs) == {"device"} and args[0].is_meta and args[0].is_contiguous():
            return torch.empty(args[0].shape, dtype=args[0].dtype, device=kwargs["device"])
        return func(*args, **kwargs)


def load_weights(model: Llama, folder: Path, device="cpu", quantize_floats=False, blocksize=64, double_quant=True):
    """Materialise a meta-device ``model`` on ``device`` and fill it from the checkpoint.

    Projections built as empty ``NF4Linear`` take either the bitsandbytes NF4
    tensors the checkpoint holds for them, or, with ``quantize_floats``, the
    quantized form of its float weights, one matrix at a time as it is read. A
    float weight for an NF4 slot without ``quantize_floats`` stays dense.
    """
    with _MetaShortcuts():
        model.to_empty(device=device)
    model.tie_weights()
    params = model.state_dict()  # empty NF4Linear slots contribute nothing
    nf4 = {f"{name}.weight": m for name, m in projections(model) if isinstance(m, NF4Linear)}
    expected = set(params) | set(nf4)
    expected -= {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    loaded, pending, meter, tied_head = set(), {}, ErrorMeter(), None
    bar = tqdm(total=len(expected), desc=f"loading {folder.name}", unit="tensor", disable=BAR_HIDDEN, leave=False)
    for file, names in shards(folder).items():
        for name, tensor in read_tensors(file, names, allow_uint8=bool(nf4)):
            if name.endswith("rotary_emb.inv_freq"):  # older checkpoints store this; we recompute it
                continue
            base = name.split(".weight.")[0] + ".weight" if ".weight." in name else name
            if base in nf4 and (base != name or tensor.dtype == torch.uint8):
                pending.setdefault(base, {"file": file})[name] = tensor  # a part of a bitsandbytes NF4 weight
                continue
            target = nf4.get(name)
            if name not in params and target is None:
                raise BailongError(f"{file}: unexpected tensor {name}, not part of a Llama with this config.json")
            shape = list(params[name].shape) if target is None else [target.out_features, target.in_features]
            if list(tensor.shape) != shape:
                if tensor.dtype == torch.uint8 and target is None:  # packed 4-bit, where a dense weight belongs
                    raise BailongError(f"{file}: {name} is quantized (4-bit), which only the projections may be "
                                       "(quantize with llm_int8_skip_modules=['lm_head'])")
                raise BailongError(f"{file}: tensor {name} has shape {list(tensor.shape)}, config.json implies {shape}")
            if name == "lm_head.weight" and model.config.tie_word_embeddings:  # compared with the embedding below
                tied_head = tensor
            elif target is not None and quantize_floats:
                tensor = tensor.to(device)
                target.weight = quantize(tensor, blocksize, double_quant)
                meter.add(tensor, target.weight)
                bar.set_postfix_str(str(meter))
            else:
                if target is not None:  # a float weight in a quantized checkpoint stays dense
                    dense = torch.nn.Linear(*shape[::-1], bias=False, device=device, dtype=model.lm_head.weight.dtype)
                    set_module(model, name.removesuffix(".weight"), dense)
                    params[name] = dense.weight.detach()
                with torch.no_grad():
                    params[name].copy_(tensor)  # casts to the model's dtype
            loaded.add(name)
            bar.update()
    for base, parts in pending.items():
        file = parts.pop("file")
        q = NF4Tensor.from_bnb_dict(parts, prefix=base.removesuffix("weight"), source=str(file))
        target = nf4[base]
        if list(q.shape) != [target.out_features, target.in_features]:
            raise BailongError(f"{file}: {base} is quantized with shape {list(q.shape)}, config.json implies "
                               f"{[target.out_features, target.in_features]}")
        target.weight = q.to(device)
        loaded.add(base)
        bar.update()
    bar.close()
    if tied_head is not None and not torch.equal(tied_head.to(params["lm_head.weight"]), params["lm_head.weight"]):
        warnings.warn(f"{folder}: config.json ties the head to the embedding, but the checkpoint holds another "
                      "lm_head.weight: both are used, untied, as transformers does", BailongWarning, stacklevel=3)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(tied_head.to(params["lm_head.weight"]))
    missing = sorted(expected - loaded)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BailongError(f"{folder}: the checkpoint lacks tensor {missing[0]}{more}")
    if meter.count:
        print(f"quantized to NF4 while loading: {meter}", file=sys.stderr)
    return model


def bnb_quantized(folder: Path) -> bool:
    """Whether config.json says the weights are bitsandbytes-quantized; refuse what we cannot read."""
    file = folder / "config.json"
    qc = read_json(file).get("quantization_config")
    if not qc:
        return False
    if not isinstance(qc, dict):
        raise BailongError(f"{file}: quantization_config must be an object, not {qc!r}")
    if qc.get("quant_method") != "bitsandbytes":
        raise BailongError(f"{file}: quantization {qc.get('quant_method')!r} is not supported "
                           "(only bitsandbytes 4-bit nf4)")
    if qc.get("load_in_8bit") or not qc.get("load_in_4bit", True):
        raise BailongError(f"{file}: 8-bit bitsandbytes checkpoints are not supported (only 4-bit nf4)")
    kind = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default
    if kind != "nf4":
        raise BailongError(f"{file}: bnb_4bit_quant_type {kind!r} is not supported (only nf4)")
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise BailongError(f"{file}: bnb_4bit_quant_storage {qc['bnb_4bit_quant_storage']!r} is not supported "
                           "(only uint8)")
    return True


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def chosen_device(device):
    """``device``, or the default where None; a CUDA device this machine lacks is said in one line (torch's
    AssertionError came once the first weight moved)."""
    if not device:
        return default_device()
    if (name := str(device)).startswith("cuda"):
        check_device(name, f"device={name!r}")
    return device


def load(path_or_repo_id, dtype=None, device=None, revision=None, quantize=None, blocksize=64,
         double_quant=True, adapter=None):
    """``model, tokenizer = load(folder_or_repo_id)``; tokenizer is None without tokenizer.model or .json.

    dtype (the compute dtype: a torch dtype, or its name, "bfloat16") defaults to bfloat16 on CUDA and float32
    on the CPU.
    ``quantize="nf4"`` stores every projection in NF4 (QLoRA's frozen base),
    quantizing matrix by matrix as they load; checkpoints saved quantized by
    bitsandbytes load as NF4 whatever ``quantize`` says. ``adapter``: a PEFT LoRA
    adapter folder or repo id to apply; its tokenizer, if any, wins. A tokenizer with more pieces than the
    model has embeddings is refused.
    """
    if quantize not in (None, "nf4"):
        raise BailongError(f"quantize={quantize!r} is not supported (None or 'nf4')")
    device = chosen_device(device)
    dtype = torch_dtype(dtype) or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    folder = resolve(str(path_or_repo_id), revision)
    if adapter is None and (run := training_output(folder)):
        return load(run[0], dtype, device, revision, quantize, blocksize, double_quant, adapter=run[1])
    check_not_a_run(folder)
    config = ModelConfig.from_file(folder / "config.json")
    stored = stored_tensors(folder)
    held = 1 + max((int(m[1]) for k in stored if (m := re.match(r"model\.layers\.(\d+)\.", k))), default=-1)
    if not held:  # named otherwise: a LlamaModel's (layers.0...: transformers would give it a random head), a DDP
        # module's (module.model...), a PEFT model's state (base_model.model...)
        name = min(stored, key=lambda k: (".layers." not in f".{k}", k), default="nothing")
        bare = " (a LlamaModel's checkpoint, without the LM head)" if name.startswith("layers.") else ""
        raise BailongError(f"{folder}: holds no tensor named model.layers.0... (it holds {name}){bare}: not a "
                           "LlamaForCausalLM's checkpoint")
    if held < config.num_hidden_layers:  # (a mistyped number built layers for minutes)
        raise BailongError(f"{folder / 'config.json'}: num_hidden_layers is {config.num_hidden_layers}, but the "
                           f"checkpoint holds {held} layers")
    quantized = quantize == "nf4" or bnb_quantized(folder)
    with torch.device("meta"), _MetaShortcuts():
        model = Llama(config).to(dtype)
    if quantized:
        for name, m in projections(model):
            set_module(model, name, NF4Linear(m.in_features, m.out_features))
    check_shapes(model, stored)
    load_weights(model, folder, device, quantize == "nf4", blocksize, double_quant).eval()
    if quantized:
        print(memory_report(model), file=sys.stderr)
    adapter_folder = None
    if adapter is not None:
        adapter_folder = resolve(str(adapter), revision, files=ADAPTER_FILES, weights=False)
        load_adapter(model, adapter_folder)
        if (trained := trained_base(adapter_folder)) and trained != fingerprint(folder):
            warnings.warn(f"{adapter}: trained on another base than {path_or_repo_id} (the stored weights of its "
                          "first layer differ: another model, or this one in another dtype); its answers may make no "
                          "sense", BailongWarning, stacklevel=2)
        model.eval()
    tokenizer = adapted_tokenizer(folder, adapter_folder)
    check_fits(tokenizer, model)
    return model, tokenizer


def not_finite(model) -> str | None:
    """The name of the first of ``model``'s floating-point tensors holding NaN or an infinity; None where none
    does."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() and not all(map(math.isfinite, map(float, torch.aminmax(t)))):
            return name  # (a NaN is both extremes; aminmax reads the tensor once and copies nothing)
    return None


def save(model: Llama, folder, max_shard_bytes=5 << 30):
    """Write config.json and safetensors weights (sharded with an index past ``max_shard_bytes``).

    Files are written under temporary names and renamed, so an interrupted save
    never leaves a half-written checkpoint under the real name.
    """
    from safetensors.torch import save_file
    folder = Path(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    if lora := next((k for k in state if ".lora_" in k), None):  # transformers would load the bare base
        raise BailongError(f"{folder}: the model carries LoRA ({lora}); merge it first (bailong.lora.merge_lora), or "
                           "save the adapter alone (bailong.adapter.save_adapter)")
    if folder.exists() and not folder.is_dir():
        raise BailongError(f"{folder}: is a file; a model is saved into a folder")
    folder.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += nbytes
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, group in zip(names, groups):
        atomic_write(folder / file, lambda tmp: save_file({k: state[k] for k in group}, tmp, metadata={"format": "pt"}))
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: file for file, group in zip(names, groups) for k in group}}
        atomic_write(folder / "model.safetensors.index.json", json.dumps(index, indent=2))
    written = {*names, "model.safetensors.index.json"} if len(names) > 1 else set(names)
    for old in folder.iterdir():  # an earlier save's weights in the other layout: a loader would read them
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", old.name) and old.name not in written:
            old.unlink()
    hf = {**model.config.to_hf(), "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")}
    if quantization := bnb_quantization_config(model):
        hf["quantization_config"] = quantization
    atomic_write(folder / "config.json", json.dumps(hf, indent=2))


def load_preset(name, dtype=None, device=None, seed=0):
    """A randomly initialised model of a named preset, with the byte-level tokenizer.

    The vocabulary is the tokenizer's (260), so every id the model emits decodes.
    For demos and tests: the weights carry no knowledge. They are drawn from ``seed`` alone, on the
    CPU, and the caller's random state is left as it was.
    """
    device = chosen_device(device)
    tokenizer = byte_tokenizer()
    config = preset(name)
    config.vocab_size = tokenizer.vocab_size
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # drawn on the CPU, whatever the default device
        torch.default_generator.manual_seed(seed)
        model = init_weights(Llama(config))
    return model.to(device=device, dtype=torch_dtype(dtype) or torch.float32).eval(), tokenizer
