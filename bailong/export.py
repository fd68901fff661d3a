"""Merge a LoRA adapter into its base model; write a Hugging Face folder or a GGUF file.

    python -m bailong.export --base meta-llama/Llama-2-7b-hf --adapter out/pretrain/adapter --out merged
    python -m bailong.export --base out/sft --out bailong.gguf --type q8_0    # llama.cpp, Ollama, LM Studio

--base is a model folder or Hub repo id (with --adapter, or alone), or a
training output (its base/ and adapter/). The base is loaded unquantized, so the
merge W + s * B @ A happens on the original weights (a base that only exists in
NF4 is merged onto its dequantized weights, with a warning). A folder (config.json,
safetensors weights, in shards with an index above --max-shard-gb, tokenizer files)
loads in transformers; a .gguf file (bailong/export_gguf.py) in llama.cpp and the
tools built on it. Either is
written under a temporary name beside --out and renamed at the end: an existing
folder is never touched, an existing GGUF file is replaced only with --overwrite.
"""
import os
import shutil
import warnings
from pathlib import Path

from bailong.errors import BailongError, BailongWarning, Parser, UsageError, loading, run_cli

with loading(__name__):  # Ctrl-C meanwhile (torch and the modules loading): answered once they have
    import torch
    from bailong.adapter import read_adapter_config
    from bailong.chat_template import LLAMA2_JINJA, llama2_jinja, template_in
    from bailong.config import DTYPES, torch_dtype
    from bailong.files import (as_checked, atomic_folder, atomic_write, check_not_in_a_run, check_output_file,
                               check_writable, overlaps, own_file)
    from bailong.generation import GENERATION_CONFIG, model_sampling
    from bailong.hub import ADAPTER_FILES, resolve
    from bailong.lora import merge_lora
    from bailong.outputs import check_not_a_run, training_output
    from bailong.tokenizer import CHAT_TEMPLATE_FILE, adapted_tokenizer, tokenizer_found, tokenizer_settings
    from bailong.weights import load, not_finite, own_dtype, save

TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", CHAT_TEMPLATE_FILE,
                   "special_tokens_map.json", GENERATION_CONFIG]
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def is_gguf(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def run_of(path) -> Path | None:
    """The training run whose output, or checkpoint, ``path`` is (an export inside it would be in its way), or
    None."""
    folder = Path(path).expanduser()
    if not training_output(folder):
        return None
    return folder.resolve().parent.parent if folder.resolve().parent.name == "checkpoints" else folder


def export(base, adapter, out, dtype=None, max_shard_bytes=5 << 30, format=None, gguf_type=None, overwrite=False):
    """Write ``base`` (+ ``adapter``, merged) to ``out``: a Hugging Face folder, or with ``format="gguf"``
    (the default for a name ending in .gguf) a GGUF file of ``gguf_type`` (default: f16, or bf16 for a
    bfloat16 model)."""
    dtype = torch_dtype(dtype)
    if format not in (None, "hf", "gguf"):
        raise ValueError(f"format={format!r}: 'hf' (a folder) or 'gguf'")
    if gguf_type not in (None, *GGUF_TYPES):
        raise ValueError(f"gguf_type={gguf_type!r}: one of {', '.join(GGUF_TYPES)}")
    gguf_name = str(out).rstrip("/" + os.sep).lower().endswith(".gguf")  # E5.GGUF too
    if format is None and gguf_name and str(out).endswith(("/", os.sep)):
        raise UsageError(f"{out}: ends in .gguf and a slash; name the .gguf file, or pass --format hf for a folder")
    out = Path(out)
    format = format or ("gguf" if gguf_name else "hf")
    if format == "hf" and (gguf_type or overwrite):  # (the command's options are checked before torch loads)
        raise ValueError("gguf_type and overwrite are for a GGUF file: a folder's weights take dtype, and an "
                         "existing folder is never replaced")
    if format == "gguf":
        run = run_of(base) if adapter is None else None
        inputs = {f"the {what} ({path})": path for what, path in [("training output", run), ("base model", not run
                                                                   and base), ("adapter", adapter)] if path}
        check = check_output_file(out, inputs, overwrite, is_gguf, "GGUF file")
        try:
            import gguf  # noqa: F401  (a dependency of this command only)
        except ImportError:
            raise BailongError("writing GGUF needs the gguf package (pip install gguf)") from None
    elif out.exists():  # an empty folder too: the new one is made beside it and renamed into place, which a
        # mount point or the working folder (--out .) cannot be
        raise UsageError(f"{out}: already exists; choose a new folder (nothing is overwritten)")
    else:
        check_writable(out)
        check = as_checked(out)
    base_folder, run_folder = resolve(str(base)), None
    if adapter is None and (run := training_output(base_folder)):
        (base, adapter), run_folder = run, run_of(base_folder)
        base_folder = resolve(str(base))
    check_not_a_run(base_folder)
    adapter_folder = resolve(str(adapter), files=ADAPTER_FILES, weights=False) if adapter else None
    dtype = dtype or own_dtype(base_folder) or torch.float32  # the base's own: its config's, else its weights'
    if adapter_folder:
        read_adapter_config(adapter_folder)  # the adapter's own problems first, then where it sits
    folders = [f for f in (adapter_folder, base_folder) if f]  # the adapter's tokenizer (an extended vocabulary) wins
    for folder in folders:  # copied out, or (a chat template) into a GGUF file: none linked from elsewhere
        for name in TOKENIZER_FILES:
            if (folder / name).exists():
                own_file(folder / name)
    for what, folder in [("the base model", base_folder), ("the adapter", adapter_folder),
                         ("the training output", run_folder)]:  # in a run: read as its base, or in its way
        if folder and overlaps(out, folder):
            raise UsageError(f"{out}: lies inside {what} ({folder}); choose a folder apart from the inputs")
    if format == "hf":  # (a GGUF file's check_output_file checked)
        check_not_in_a_run(out)  # another run's
    if format == "gguf":  # a tokenizer llama.cpp would read differently is refused before minutes of loading
        from bailong.export_gguf import check_tokenizer
        tokenizer = tokenizer_found(adapted_tokenizer(base_folder, adapter_folder), base_folder,
                                    "a GGUF file carries the model's tokenizer")
        check_tokenizer(tokenizer)
        if getattr(tokenizer, "legacy", True) is False:  # (every GGUF file of such a model reads so: said, not refused)
            warnings.warn(f"{tokenizer.path}: read as legacy false, as the model's tokenizer_config.json says (chat "
                          "text after a special token begins without SentencePiece's space, as Bailong trains and "
                          "chats), which no GGUF setting gives: llama.cpp puts the space there, a token more after "
                          "each special token of a chat prompt", BailongWarning)
    model, _ = load(base_folder, dtype=dtype, device="cpu", adapter=adapter_folder)  # its tokenizer is the one above
    merge_lora(model, dtype)
    if broken := not_finite(model):  # a run that diverged, or weights past float16's range
        why = "past float16's largest, 65504 (--dtype bfloat16 holds them), or " \
            if model.model.norm.weight.dtype == torch.float16 else ""
        raise BailongError(f"{adapter_folder}: merged, {broken} holds NaN or infinite values ({why}weights a run "
                           "that diverged left)" if adapter_folder else f"{base_folder}: {broken} holds NaN or "
                           f"infinite values ({why}damaged weights)")
    if format == "gguf":
        from bailong.export_gguf import write_gguf
        folder = next((f for f in folders if any((f / n).exists() for n in TOKENIZER_FILES[2:4])), None)
        settings = tokenizer_settings(folder) if folder else {}
        template = template_in(settings, folder and folder / TOKENIZER_FILES[2])  # one that does not parse: refused
        sampling, _ = model_sampling(next((f for f in folders if (f / GENERATION_CONFIG).exists()), None))
        gguf_type = gguf_type or ("bf16" if dtype == torch.bfloat16 else "f16")
        atomic_write(out, lambda tmp: write_gguf(
            tmp, model, tokenizer, gguf_type, out.stem, template[0] if template else llama2_jinja(tokenizer),
            bool(settings.get("add_bos_token", True)), bool(settings.get("add_eos_token", False)), sampling),
            check=check)
        return out
    # the tokenizer itself from one folder (an adapter's extended tokenizer.model must not sit beside the
    # base's tokenizer.json, which transformers would read first), the other files each where found first
    tokenizer_folder = next((f for f in folders if any((f / n).exists() for n in TOKENIZER_FILES[:2])), None)
    with atomic_folder(out, check=check) as tmp:  # (a folder made there meanwhile is not replaced)
        save(model, tmp, max_shard_bytes)
        for name in TOKENIZER_FILES:
            source = next((f / name for f in ([tokenizer_folder] if name in TOKENIZER_FILES[:2] else folders)
                           if f and (f / name).exists()), None)
            if source:
                shutil.copyfile(source, tmp / name)
        if (tmp / "tokenizer.model").exists() and not (tmp / "tokenizer_config.json").exists():
            llama2_settings(tmp)
    return out


def llama2_settings(folder: Path):
    """A tokenizer_config.json for the tokenizer.model in ``folder`` that came without one (the embedded
    default's, or a base's that had none): without it transformers begins no text with bos and knows no chat
    format, where Bailong trains and chats with both (Llama 2's format, as in a GGUF file)."""
    import json

    from bailong.tokenizer import Tokenizer
    tokenizer = Tokenizer(folder / "tokenizer.model")
    piece = {i: tokenizer.sp.id_to_piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.sp.unk_id())
             if i >= 0}
    settings = {"tokenizer_class": "LlamaTokenizer", "legacy": True,  # a space after <s>, as Meta's tokenization
                "add_bos_token": tokenizer.adds_bos, "add_eos_token": False,
                "bos_token": piece.get(tokenizer.bos_id), "eos_token": piece.get(tokenizer.eos_id),
                "unk_token": piece.get(tokenizer.sp.unk_id()), "chat_template": LLAMA2_JINJA}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")


def main(argv=None):
    p = Parser(prog="python -m bailong.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model folder or Hub repo id, or a training output")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder or Hub repo id to merge")
    p.add_argument("--out", required=True, help="new folder, or a .gguf file")
    p.add_argument("--format", choices=["hf", "gguf"], help="default: gguf when --out ends in .gguf, else hf")
    p.add_argument("--type", choices=GGUF_TYPES, help="GGUF weight type; default: f16, or bf16 for a bfloat16 model")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the merge and of a folder's weights; "
                                                   "default: the base checkpoint's dtype")
    p.add_argument("--max-shard-gb", type=float, help="largest safetensors shard of a folder (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file at --out")
    args = p.parse_args(argv)
    gguf = (args.format or ("gguf" if args.out.lower().endswith(".gguf") else "hf")) == "gguf"
    if args.type and not gguf:
        p.error("--type is for a GGUF file (--format gguf); a folder's weights take --dtype")
    if gguf and args.max_shard_gb is not None:
        p.error("--max-shard-gb is for a folder; a GGUF file is written whole")
    if args.overwrite and not gguf:
        p.error("--overwrite is for a GGUF file; an existing folder is never replaced (choose a new --out)")
    shard_gb = 5.0 if args.max_shard_gb is None else args.max_shard_gb
    if not 0 < shard_gb < 1e6:
        p.error(f"--max-shard-gb must be a number of gigabytes above 0, not {shard_gb}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export(args.base, args.adapter, args.out, dtype, int(shard_gb * 2**30), args.format, args.type,
                 args.overwrite)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
