"""Peak host memory and time while loading a checkpoint, against the size of the model.

Writes a random checkpoint in several shards, then loads it in a fresh process
per method and reports how far peak resident memory rose over the resident
memory just before loading. The peak is the kernel's VmHWM, reset through
/proc/self/clear_refs right before loading; it counts memory-mapped file pages
too, and is read after every weight has been touched once (transformers leaves
float32 weights memory-mapped until they are used). Methods: ``bailong.load``; the simple way (each whole shard read with
safetensors.torch.load_file, then load_state_dict into a model built normally);
and transformers' ``from_pretrained`` where it is installed.

    python bench/bench_load_memory.py [--hidden 2048 --layers 8]
    python bench/bench_load_memory.py --preset llama2-7b --disk-dtype float16 --methods bailong,transformers
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


CHILD = """
import sys, json, time, torch
from pathlib import Path
import bailong
method, folder, dtype, quantize = {method!r}, Path({folder!r}), getattr(torch, {dtype!r}), {quantize!r}
if method == "transformers":
    from transformers import LlamaForCausalLM

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
before, start = status("VmRSS"), time.perf_counter()
if method == "bailong":
    model, _ = bailong.load(folder, dtype=dtype, device="cpu", quantize=quantize)
elif method == "simple":
    from safetensors.torch import load_file
    model = bailong.Llama(bailong.ModelConfig.from_file(folder / "config.json")).to(dtype)
    for shard in sorted(folder.glob("*.safetensors")):
        model.load_state_dict(load_file(shard), strict=False)
else:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
seconds = time.perf_counter() - start
for p in model.parameters():  # read every weight: memory-mapped ones become resident, as in use
    p.sum()
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(dict(peak_growth=status("VmHWM") - before, model_bytes=size, seconds=seconds)))
"""


def write_checkpoint(config, folder, dtype):
    """Random weights (normal(0, 0.02)) made straight in ``dtype``: no float32 copy of a 7B model."""
    import torch

    import bailong
    with torch.device("meta"):
        model = bailong.Llama(config).to(dtype)
    model.to_empty(device="cpu")
    model.tie_weights()
    bailong.model.init_weights(model)
    disk = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    bailong.save(model, folder, max_shard_bytes=min(disk // 3 + 1, 5 << 30))
    return disk, largest


def measure(folder, method, dtype, quantize=None) -> dict:
    """Run one load in a fresh process: peak_growth and model_bytes (bytes), seconds."""
    code = CHILD.format(folder=str(folder), dtype=dtype, method=method, quantize=quantize)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help="model shape (default: --hidden/--layers with vocabulary 32000)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--disk-dtype", default="float32")
    p.add_argument("--dtypes", default="bfloat16,float32", help="dtypes to load as")
    p.add_argument("--methods", default="bailong,simple,transformers")
    args = p.parse_args()
    import torch

    from bailong.config import ModelConfig, preset
    config = preset(args.preset) if args.preset else ModelConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, vocab_size=32000)
    methods = args.methods.split(",")
    try:
        import transformers  # noqa: F401
    except ImportError:
        methods = [m for m in methods if m != "transformers"]
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        disk, largest = write_checkpoint(config, Path(tmp), getattr(torch, args.disk_dtype))
        shards = len(list(Path(tmp).glob("*.safetensors")))
        print(f"checkpoint: {disk / mib:.0f} MiB {args.disk_dtype} in {shards} shards, largest tensor "
              f"{largest / mib:.0f} MiB (written in {time.perf_counter() - start:.0f} s)")
        for dtype in args.dtypes.split(","):
            for method in methods:
                try:
                    r = measure(tmp, method, dtype)
                except RuntimeError as e:
                    print(f"{method} as {dtype}: failed: {e}")
                    continue
                extra = r["peak_growth"] - r["model_bytes"] - largest
                print(f"{method:12s} as {dtype:8s}: model {r['model_bytes'] / mib:7.0f} MiB, peak growth "
                      f"{r['peak_growth'] / mib:7.0f} MiB = {r['peak_growth'] / r['model_bytes']:.2f}x the model "
                      f"({extra / mib:+6.0f} MiB beyond model + largest tensor), {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
