"""Peak host memory while loading a checkpoint, against the size of the loaded model.

Writes a random float32 checkpoint in several shards, then loads it in a fresh
process and reports how far peak resident memory rose over the resident memory
just before loading. The peak is the kernel's VmHWM, reset through
/proc/self/clear_refs right before loading; it counts memory-mapped file pages
too. Compared with the simple way: read each whole shard with
safetensors.torch.load_file, then load_state_dict into a model built normally.

    python bench/bench_load_memory.py [--layers 8] [--hidden 1024]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import sys, json, torch
from pathlib import Path
sys.path.insert(0, {root!r})
import bailong

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

dtype = getattr(torch, {dtype!r})
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
before = status("VmRSS")
if {simple!r}:
    from safetensors.torch import load_file
    model = bailong.Llama(bailong.ModelConfig.from_file(Path({folder!r}, "config.json"))).to(dtype)
    for shard in sorted(Path({folder!r}).glob("*.safetensors")):
        model.load_state_dict(load_file(shard), strict=False)
else:
    model, _ = bailong.load({folder!r}, dtype=dtype, device="cpu")
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(peak_growth=status("VmHWM") - before, model_bytes=size)))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    args = p.parse_args()
    import bailong
    from bailong.config import ModelConfig
    config = ModelConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, vocab_size=32000)
    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        model = bailong.model.init_weights(bailong.Llama(config))
        disk = sum(p.numel() * 4 for p in model.parameters())
        largest = max(p.numel() * 4 for p in model.parameters())
        bailong.save(model, tmp, max_shard_bytes=disk // 3 + 1)
        del model
        shards = len(list(Path(tmp).glob("*.safetensors")))
        print(f"checkpoint: {disk / mib:.0f} MiB float32 in {shards} shards; largest tensor {largest / mib:.0f} MiB")
        for simple in [False, True]:
            for dtype in ["bfloat16", "float32"]:
                code = CHILD.format(root=str(ROOT), folder=tmp, dtype=dtype, simple=simple)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                how = "load_file + load_state_dict" if simple else "bailong.load"
                print(f"{how:28s} as {dtype:8s}: model {r['model_bytes'] / mib:6.0f} MiB, peak growth "
                      f"{r['peak_growth'] / mib:6.0f} MiB = {r['peak_growth'] / r['model_bytes']:.2f}x the model, "
                      f"{(r['peak_growth'] - r['model_bytes'] - largest) / mib:+5.0f} MiB beyond model + largest tensor")


if __name__ == "__main__":
    main()
