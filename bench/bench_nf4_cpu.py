"""NF4 on the CPU: quantize/dequantize throughput against bitsandbytes, and the peak
memory of loading a Llama-2-7B-shaped checkpoint with quantization on the fly.

Throughput: a 4096 x 11008 bfloat16 matrix (Llama 2 7B's MLP), double quantization,
median of several runs, elements per second; bitsandbytes' CPU functions where
installed. Memory: random float16 checkpoints with the 7B layer shape and full
vocabulary but fewer layers, loaded as bfloat16 with quantize="nf4" in a fresh
process (see bench_load_memory.py for how the peak is read). The model grows
by the same bytes each layer; the peak's excess over the model (transient
buffers of the largest matrix, allocator slack) is measured at each depth and
the largest one added to the 32-layer model size.

    python bench/bench_nf4_cpu.py [--layers 2,4] [--repeat 5]
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_load_memory import measure, write_checkpoint

from bailong.config import preset
from bailong.nf4 import quantize


def median_seconds(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(repeat):
    torch.manual_seed(0)
    w = (torch.randn(4096, 11008) * 0.02).bfloat16()
    q = quantize(w)
    rows = [("bailong quantize", median_seconds(lambda: quantize(w), repeat)),
            ("bailong dequantize", median_seconds(lambda: q.dequantize(torch.bfloat16), repeat))]
    try:
        import bitsandbytes.functional as bnb
        packed, state = bnb.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
        rows += [("bitsandbytes quantize_4bit",
                  median_seconds(lambda: bnb.quantize_4bit(w, compress_statistics=True, quant_type="nf4"), repeat)),
                 ("bitsandbytes dequantize_4bit", median_seconds(lambda: bnb.dequantize_4bit(packed, state), repeat))]
        assert torch.equal(packed, q.data) and torch.equal(bnb.dequantize_4bit(packed, state), q.dequantize())
    except ImportError:
        print("bitsandbytes is not installed: ours only")
    print(f"4096 x 11008 bfloat16, double quantization, {torch.get_num_threads()} threads:")
    for name, seconds in rows:
        print(f"  {name:30s} {seconds * 1e3:8.1f} ms  {w.numel() / seconds / 1e6:8.1f} M elements/s")


def memory(depths):
    config = preset("llama2-7b")
    peaks = {}
    for layers in depths:
        config.num_hidden_layers = layers
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(config, Path(tmp), torch.float16)
            r = measure(tmp, "bailong", "bfloat16", quantize="nf4")
        peaks[layers] = r
        print(f"  {layers} layers: loaded model {r['model_bytes'] / 2**30:.2f} GiB, peak growth "
              f"{r['peak_growth'] / 2**30:.2f} GiB, {r['seconds']:.1f} s")
    (a, ra), (b, rb) = sorted(peaks.items())[:2]
    per_layer = (rb["model_bytes"] - ra["model_bytes"]) / (b - a)
    model32 = ra["model_bytes"] + (32 - a) * per_layer
    excess = max(r["peak_growth"] - r["model_bytes"] for r in peaks.values())
    print(f"  model: {per_layer / 2**20:.0f} MiB per layer; peak over model at most {excess / 2**20:.0f} MiB")
    print(f"  32 layers (extrapolated): model {model32 / 2**30:.2f} GiB, peak growth about "
          f"{(model32 + excess) / 2**30:.2f} GiB (the same model in bfloat16: 12.55 GiB)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="2,4", help="two depths to measure and extrapolate from")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    throughput(args.repeat)
    print("Loading a Llama-2-7B-shaped float16 checkpoint with quantize='nf4', as bfloat16:")
    memory([int(x) for x in args.layers.split(",")])


if __name__ == "__main__":
    main()
