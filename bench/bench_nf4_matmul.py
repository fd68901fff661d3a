"""Our NF4 matmul against bf16 cuBLAS, the PyTorch reference and bitsandbytes.

For Llama-2-7B weight shapes (out x in: 4096x4096, 11008x4096, 4096x11008,
59241x4096): the dequantize kernel against the reference and bitsandbytes; then
for M tokens, median times (CUDA events, triton.testing.do_bench) of both ways
our matmul can run (the fused kernel; the dequantize kernel, then cuBLAS: the
model takes whichever it measures faster, "best"), of bf16 ``x @ W.T`` on the
unquantized weight, of the reference (PyTorch dequantize, then matmul) and of
bitsandbytes' ``matmul_4bit`` where it is installed; for M >= 512 also the
input gradient against bf16 ``dy @ W``. Reports TFLOP/s, effective GB/s of
weight traffic (the NF4 bytes: codes, absmax codes and tables) and ratios;
checks each result against the reference first.

    python bench/bench_nf4_matmul.py [--m 1,8,512,4096,8192]
    TRITON_INTERPRET=1 python bench/bench_nf4_matmul.py --tiny      # CPU smoke run of the whole script
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bailong.nf4 import quantize  # noqa: E402
from kernels.nf4_dequant import nf4_dequantize  # noqa: E402
from kernels.nf4_matmul import nf4_matmul_backward, nf4_matmul_forward  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (59241, 4096)]
WAYS = ("fused", "dequant")  # the fused kernel; the dequantize kernel, then cuBLAS


def timer(device):
    if device == "cuda":
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    def wall(fn):  # the interpreter: one run, milliseconds
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,8,512,4096,8192", help="token counts")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (under TRITON_INTERPRET=1)")
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float16 if args.tiny else torch.bfloat16  # the interpreter's bf16 dot is wrong
    shapes, ms = ([(40, 72)], [1, 20]) if args.tiny else (SHAPES, [int(m) for m in args.m.split(",")])
    bench = timer(device)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = None
    name = "CPU (Triton interpreter)" if args.tiny else torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, {dtype}, bitsandbytes {bnb.__version__ if bnb else 'absent'}")
    print(f"{'W (out x in)':>14} {'M':>5} | {'fused ms':>9} {'two-pass':>9} {'best':>8} {'TFLOP/s':>8} "
          f"{'W GB/s':>7} | {'dense':>8} {'best/dense':>10} | {'reference':>9} | {'bnb':>8} {'bnb/best':>8} | "
          f"{'dx fused':>9} {'two-pass':>9} {'dense dx':>8} {'best/dense':>10}")
    for N, K in shapes:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        q = quantize(w)
        wq = q.dequantize(dtype)
        # bitsandbytes' matmul_4bit raised "misaligned address" at 59241x4096 (odd N) in an earlier run,
        # which poisons the CUDA context for every row after it: odd N is left out for it
        with_bnb = bnb and device == "cuda" and N % 2 == 0
        if with_bnb:
            packed, state = bnbf.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
        t_deq, t_deq_ref = bench(lambda: nf4_dequantize(q, dtype)), bench(lambda: q.dequantize(dtype))
        t_deq_bnb = f"{bench(lambda: bnbf.dequantize_4bit(packed, state)):.4f} ms" if with_bnb else "not run"
        print(f"{f'{N}x{K}':>14} dequantize to {str(dtype)[6:]}: kernel {t_deq:.4f} ms "
              f"({(q.nbytes + N * K * wq.element_size()) / t_deq / 1e6:.0f} GB/s read + written), "
              f"reference {t_deq_ref:.4f} ms, bitsandbytes {t_deq_bnb}")
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            ref = F.linear(x.float(), wq.float())
            ways = {way: lambda way=way: nf4_matmul_forward(x, q, way) for way in WAYS}
            t = {way: check_and_time(fn, ref, "forward", bench) for way, fn in ways.items()}
            best = min(t.values())
            t_dense = bench(lambda: x @ w.T)
            t_ref = bench(lambda: F.linear(x, q.dequantize(dtype)))
            flops = 2 * M * N * K
            row = (f"{f'{N}x{K}':>14} {M:5d} | {t['fused']:9.4f} {t['dequant']:9.4f} {min(t, key=t.get):>8} "
                   f"{flops / best / 1e9:8.1f} {q.nbytes / best / 1e6:7.0f} | {t_dense:8.4f} {best / t_dense:10.2f} | "
                   f"{t_ref:9.4f} | ")
            if with_bnb:
                t_bnb = bench(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
                row += f"{t_bnb:8.4f} {t_bnb / best:8.2f} | "
            else:
                row += f"{'-':>8} {'-':>8} | "
            if M >= 512 or args.tiny:
                dy = torch.randn(M, N, device=device, dtype=dtype)
                ref = dy.float() @ wq.float()
                t_dx = {way: check_and_time(lambda way=way: nf4_matmul_backward(dy, q, way), ref, "backward", bench)
                        for way in WAYS}
                t_dx_dense = bench(lambda: dy @ w)
                row += (f"{t_dx['fused']:9.4f} {t_dx['dequant']:9.4f} {t_dx_dense:8.4f} "
                        f"{min(t_dx.values()) / t_dx_dense:10.2f}")
            print(row, flush=True)


def check_and_time(fn, ref, what, bench):
    """Milliseconds of ``fn`` after checking its result against the float32 reference."""
    err = ((fn().float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"{what} disagrees with the reference: relative error {err:.2e}"
    return bench(fn)


if __name__ == "__main__":
    main()
