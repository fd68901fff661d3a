"""Merge a LoRA adapter into its base model and write a complete Hugging Face folder.

    python -m bailong.export --base meta-llama/Llama-2-7b-hf --adapter out/pretrain/adapter --out merged

The base is loaded unquantized, so the merge W + s * B @ A happens on the
original weights (a base that only exists in NF4 is merged onto its dequantized
weights, with a warning). The result (config.json, safetensors shards with an
index, tokenizer files) loads in transformers. It is written to a temporary
folder beside --out and renamed at the end, and an existing --out is never touched.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch

from bailong.adapter import ADAPTER_FILES, read_adapter_config
from bailong.errors import Parser, UsageError, run_cli
from bailong.files import atomic_folder, overlaps
from bailong.lora import merge_lora
from bailong.weights import load, resolve, save

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def export(base, adapter, out, dtype=None, max_shard_bytes=5 << 30):
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: already exists; choose a new folder (nothing is overwritten)")
    base_folder = resolve(str(base))
    adapter_folder = resolve(str(adapter), files=ADAPTER_FILES, weights=False)
    if dtype is None:  # the base checkpoint's own dtype
        config = json.loads((base_folder / "config.json").read_text())
        dtype = DTYPES.get(config.get("torch_dtype") or config.get("dtype"), torch.float32)
    read_adapter_config(adapter_folder)  # the adapter's own problems first, then where it sits
    for what, folder in [("the base model", base_folder), ("the adapter", adapter_folder)]:
        if overlaps(out, folder):
            raise UsageError(f"{out}: lies inside {what} ({folder}); choose a folder apart from the inputs")
    model, _ = load(base_folder, dtype=dtype, device="cpu", adapter=adapter_folder)
    merge_lora(model, dtype)
    with atomic_folder(out) as tmp:
        save(model, tmp, max_shard_bytes)
        for name in TOKENIZER_FILES:  # the adapter's tokenizer (an extended vocabulary) wins
            source = next((f / name for f in (adapter_folder, base_folder) if (f / name).exists()), None)
            if source:
                shutil.copy(source, tmp / name)
    return out


def main(argv=None):
    p = Parser(prog="python -m bailong.export", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="base model folder or Hub repo id")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder or Hub repo id")
    p.add_argument("--out", required=True, help="new folder for the merged model")
    p.add_argument("--dtype", choices=DTYPES, help="default: the base checkpoint's dtype")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    args = p.parse_args(argv)
    if not 0 < args.max_shard_gb < 1e6:
        p.error(f"--max-shard-gb must be a number of gigabytes above 0, not {args.max_shard_gb}")
    out = export(args.base, args.adapter, args.out, DTYPES.get(args.dtype), int(args.max_shard_gb * 2**30))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
