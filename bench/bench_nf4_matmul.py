"""Our NF4 matmul at decoding sizes (M = 1..16 rows) against bf16 cuBLAS, dequantize + cuBLAS and bitsandbytes.

For Llama-2-7B weight shapes (out x in: 4096x4096, 11008x4096, 4096x11008) and
M rows of x: the GEMV kernel with the tile ``gemv_tile`` picks, the best of
every tile ``gemv_tiles`` offers (``--sweep``), the dequantize kernel then cuBLAS
(what M > 16 runs), bf16 ``x @ W.T`` on the unquantized weight, and
bitsandbytes' ``matmul_4bit`` where it is installed. Each result is checked
against the float32 reference first. Times are GPU time per call, as a decoder
sees them: each way is captured in a CUDA graph (no launch overhead) over enough
copies of the weight that they do not fit in the L2 cache, and the graph is
replayed; median of the replays. GB/s counts the weight bytes each way reads
(NF4: codes, absmax codes and tables; bf16: 2 bytes a weight), against the
card's measured copy bandwidth (bytes read plus written). The sweep reports the
best tile of each GEMV loop (summing across threads at every step, or once at
the end: ``at_end``), and the best at-end tile again with its codes read from
the L1 cache instead of taken from other lanes by shuffles (``SHUFFLES``).
Then the launches the fused decoding step makes: q, k and v of Llama-2-7B in
one launch against three, and gate and up with SwiGLU in one launch against two
GEMVs and the SwiGLU kernel, with the default tile and with the sweep's best.
Then the GEMV's dense loop on the bf16 weights themselves (a bf16 model's
decoding step, and the head), against cuBLAS, up to GEMV_MAX_M rows.
Then programmatic dependent launch (``bailong_kernels.use_pdl``): the default
GEMV back to back with and without it, and a decoder layer's chain of launches
(RMSNorm, q/k/v, o + residual, RMSNorm, gate/up + SwiGLU, down + residual: the
fused step without its attention) over layers of weights, with and without it.
Last, the two dequantize kernels (byte by byte, and word by word, the default):
each alone, and before cuBLAS at a training step's rows of x (``--train-m``),
against bf16 cuBLAS.

    python bench/bench_nf4_matmul.py [--m 1,2,4,8,16] [--sweep 1,2,4,8,16] [--train-m 2048]
    TRITON_INTERPRET=1 python bench/bench_nf4_matmul.py --tiny      # CPU smoke run of the whole script
"""
import argparse
import time

import torch

import bailong_kernels
from bailong.nf4 import quantize
from bailong_kernels.nf4_dequant import nf4_dequantize, pdl_possible
from bailong_kernels.decode import rms_norm, swiglu
from bailong_kernels import nf4_gemv
from bailong_kernels.dense_gemv import dense_tile, dense_tiles
from bailong_kernels.nf4_gemv import GEMV_MAX_M, gemv, gemv_group, gemv_swiglu, gemv_tile, gemv_tiles
from bailong_kernels.nf4_matmul import dequant_matmul
from bench_model_gpu import need_gpu

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
L2_BYTES = 256 << 20  # copies of a weight fill at least this much: several times any GPU's L2


def graph_ms(calls, replays=20):
    """GPU milliseconds per call of ``calls`` (one per weight copy), captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up outside the capture: compilation, cuBLAS handles
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return sorted(times)[len(times) // 2]


def wall_ms(calls):
    """The interpreter: one run of the first call, milliseconds."""
    start = time.perf_counter()
    calls[0]()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth():
    """Bytes read plus written per second by the faster of two 2 GiB device-to-device copies, each printed:
    cudaMemcpy (a uint8 ``copy_``, which read 2.7 TB/s on an H200 where other copies reached 4.2-4.3) and an
    elementwise kernel (float32 ``add``: 16-byte loads and stores)."""
    x = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    xf, yf = x.view(torch.float32), y.view(torch.float32)
    copies = {"cudaMemcpy": lambda: y.copy_(x), "elementwise": lambda: torch.add(xf, 0.0, out=yf)}
    rates = {name: 2 * x.numel() / (graph_ms([copy], replays=10) / 1e3) for name, copy in copies.items()}
    print("copy bandwidth (read + written): " + ", ".join(f"{name} {rate / 1e12:.2f} TB/s"
                                                          for name, rate in rates.items()))
    return max(rates.values())


def checked(fn, ref):
    err = ((fn().float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"relative error {err:.2e} against the float32 reference"
    return fn


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,2,4,8,16", help="rows of x")
    p.add_argument("--sweep", default="1,2,4,8,16", help="row counts at which every tile is tried")
    p.add_argument("--train-m", type=int, default=2048, help="rows of x for dequantize + cuBLAS (a training "
                   "step's tokens)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (under TRITON_INTERPRET=1)")
    args = p.parse_args()
    need_gpu("bench_nf4_matmul.py", args.tiny)
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float16 if args.tiny else torch.bfloat16
    shapes, ms = ([(40, 128)], [1, 3]) if args.tiny else (SHAPES, [int(m) for m in args.m.split(",")])
    sweep = {1} if args.tiny else {int(m) for m in args.sweep.split(",") if m}
    timed = wall_ms if args.tiny else graph_ms
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = None
    name = "CPU (Triton interpreter)" if args.tiny else torch.cuda.get_device_name()
    bandwidth = None if args.tiny else copy_bandwidth()
    print(f"{name}, torch {torch.__version__}, {dtype}, bitsandbytes {bnb.__version__ if bnb else 'absent'}"
          + (f", copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)" if bandwidth else ""))
    print(f"{'W (out x in)':>12} {'M':>3} | {'gemv us':>8} {'GB/s':>5} {'of copy':>7} | {'best each-step':>17} "
          f"{'us':>7} | {'best at-end':>17} {'us':>7} {'GB/s':>5} {'L1 codes':>8} | {'deq+cuBLAS':>10} | "
          f"{'bf16':>7} {'GB/s':>5} | {'bnb':>7} | {'gemv/bf16':>9} {'bnb/gemv':>8} {'deq/gemv':>8}")
    best_tiles = {}  # M -> the fastest tile at 4096x4096
    for N, K in shapes:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        q = quantize(w)
        copies = max(1, L2_BYTES // q.nbytes) if device == "cuda" else 1
        qs = [q] + [quantize(w) for _ in range(copies - 1)]
        ws = [w] + [w.clone() for _ in range(max(1, L2_BYTES // (2 * w.numel())) - 1)] if device == "cuda" else [w]
        with_bnb = bnb is not None and device == "cuda"
        if with_bnb:
            bnb_weights = [bnbf.quantize_4bit(w, compress_statistics=True, quant_type="nf4") for _ in range(copies)]
        wq = q.dequantize(torch.float32)
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            ref = x.float() @ wq.T
            checked(lambda: gemv(x, q), ref)
            t_gemv = timed([lambda q=q: gemv(x, q) for q in qs])
            best = {False: (None, float("nan")), True: (None, float("nan"))}  # by loop: at the end or not
            best[gemv_tile(M)[3]] = (gemv_tile(M), t_gemv)  # the default tile, under its own loop
            for tile in gemv_tiles(M) if M in sweep else []:
                checked(lambda: gemv(x, q, tile), ref)
                t = timed([lambda q=q: gemv(x, q, tile) for q in qs])
                if best[tile[3]][0] is None or t < best[tile[3]][1]:
                    best[tile[3]] = (tile, t)
            t_cache = float("nan")  # the best at-end tile with its codes from the L1 cache
            if best[True][0]:
                nf4_gemv.SHUFFLES = False
                try:
                    checked(lambda: gemv(x, q, best[True][0]), ref)
                    t_cache = timed([lambda q=q: gemv(x, q, best[True][0]) for q in qs])
                finally:
                    nf4_gemv.SHUFFLES = True
            if (N, K) == SHAPES[0] and M in sweep:
                best_tiles[M] = min(best.values(), key=lambda b: b[1] if b[0] else float("inf"))[0]
            checked(lambda: dequant_matmul(x, q), ref)
            t_deq = timed([lambda q=q: dequant_matmul(x, q) for q in qs])
            t_dense = timed([lambda w=w: x @ w.T for w in ws])
            t_bnb = None
            if with_bnb:
                try:
                    t_bnb = timed([lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in bnb_weights])
                except Exception as e:  # e.g. not capturable in a CUDA graph
                    print(f"bitsandbytes at M={M}: {type(e).__name__}: {str(e).splitlines()[0]}")
            gbs = lambda nbytes, ms: nbytes / ms / 1e6  # noqa: E731
            share = f"{gbs(q.nbytes, t_gemv) * 1e9 / bandwidth:7.0%}" if bandwidth else f"{'-':>7}"
            tile_name = lambda tile: ",".join(map(str, tile[:3])) if tile else "-"  # noqa: E731
            print(f"{f'{N}x{K}':>12} {M:3d} | {t_gemv * 1e3:8.2f} {gbs(q.nbytes, t_gemv):5.0f} {share} | "
                  f"{tile_name(best[False][0]):>17} {best[False][1] * 1e3:7.2f} | "
                  f"{tile_name(best[True][0]):>17} {best[True][1] * 1e3:7.2f} "
                  f"{gbs(q.nbytes, best[True][1]):5.0f} {t_cache * 1e3:8.2f} | {t_deq * 1e3:10.2f} | "
                  f"{t_dense * 1e3:7.2f} {gbs(2 * w.numel(), t_dense):5.0f} | "
                  f"{t_bnb * 1e3 if t_bnb else float('nan'):7.2f} | {t_gemv / t_dense:9.2f} "
                  f"{(t_bnb or float('nan')) / t_gemv:8.2f} {t_deq / t_gemv:8.2f}", flush=True)
    one_launch(device, dtype, timed, ms, best_tiles, (40, 128) if args.tiny else SHAPES[0],
               (48, 128) if args.tiny else SHAPES[1])
    dense_gemv(device, dtype, timed, bandwidth, shapes if args.tiny else SHAPES + [(32000, 4096)],
               [m for m in ms if m <= GEMV_MAX_M], sweep)
    if args.tiny or pdl_possible(torch.empty(1, device="cuda")):
        dependent_launch(device, dtype, timed, [m for m in ms if m <= GEMV_MAX_M],
                         (40, 128) if args.tiny else SHAPES[0], (64, 128) if args.tiny else SHAPES[1])
    dequantize_kernels(device, dtype, timed, bandwidth, shapes, 8 if args.tiny else args.train_m)


def one_launch(device, dtype, timed, ms, best_tiles, qkv_shape, gate_shape):
    """q, k, v in one launch against three; gate and up with SwiGLU in one launch against three."""
    torch.manual_seed(0)

    def weights(shape, n):
        return [quantize((torch.randn(*shape, device=device) * 0.02).to(dtype)) for _ in range(n)]
    def copies(shape, n):  # enough copies of n weights of this shape to fill more than the L2
        return max(1, L2_BYTES // (n * weights(shape, 1)[0].nbytes)) if device == "cuda" else 1
    qkvs = [weights(qkv_shape, 3) for _ in range(copies(qkv_shape, 3))]
    gate_ups = [weights(gate_shape, 2) for _ in range(copies(gate_shape, 2))]
    print("one launch against several: us per layer's projections (a CUDA graph over weight copies)")
    for M in ms:
        x = torch.randn(M, qkv_shape[1], device=device, dtype=dtype)
        for tile in [t for t in dict.fromkeys([gemv_tile(M), best_tiles.get(M)]) if t]:
            ref = [x.float() @ w.dequantize(torch.float32).T for w in qkvs[0]]
            for out, r in zip(gemv_group(x, qkvs[0], tile), ref):
                checked(lambda: out, r)
            three = timed([lambda ws=ws: [gemv(x, w, tile) for w in ws] for ws in qkvs])
            one = timed([lambda ws=ws: gemv_group(x, ws, tile) for ws in qkvs])
            gate, up = gate_ups[0]
            ref = torch.nn.functional.silu(x.float() @ gate.dequantize(torch.float32).T) * \
                (x.float() @ up.dequantize(torch.float32).T)
            checked(lambda: gemv_swiglu(x, gate, up, tile), ref)
            apart = timed([lambda g=g, u=u: swiglu(gemv(x, g, tile), gemv(x, u, tile)) for g, u in gate_ups])
            fused = timed([lambda g=g, u=u: gemv_swiglu(x, g, u, tile) for g, u in gate_ups])
            print(f"  M={M} tile {','.join(map(str, tile))}: q, k, v {three * 1e3:.2f} -> {one * 1e3:.2f} us "
                  f"({three / one:.2f}x); gate, up, SwiGLU {apart * 1e3:.2f} -> {fused * 1e3:.2f} us "
                  f"({apart / fused:.2f}x)", flush=True)


def dependent_launch(device, dtype, timed, ms, square, wide):
    """us per call without and with programmatic dependent launch: the default GEMV back to back (each waits
    for the one before, as in a decoding step), and a decoder layer's chain of launches over copies of a
    layer's weights (q, k, v and o ``square``, gate, up and down ``wide``). On the CPU (interpreted) PDL is
    never on: both columns run the same launches."""
    torch.manual_seed(0)
    H, F = square[1], wide[0]

    def nf4(n, k):
        return quantize((torch.randn(n, k, device=device) * 0.02).to(dtype))

    def layer():
        return dict(norm=torch.ones(H, device=device, dtype=dtype), qkv=[nf4(H, H) for _ in range(3)], o=nf4(H, H),
                    gate=nf4(F, H), up=nf4(F, H), down=nf4(H, F))

    def step(x, w):  # the fused decoding step's launches for a layer, attention left out (o reads the norm's h)
        h = rms_norm(x, w["norm"], 1e-5)
        gemv_group(h, w["qkv"])
        x = gemv(h, w["o"], residual=x)
        return gemv(gemv_swiglu(rms_norm(x, w["norm"], 1e-5), w["gate"], w["up"]), w["down"], residual=x)

    def both(calls):
        times = []
        for on in (False, True):
            previous = bailong_kernels.use_pdl(on)
            try:
                with torch.inference_mode():  # where PDL runs (decoding)
                    times.append(timed(calls))
            finally:
                bailong_kernels.use_pdl(previous)
        return times

    one = layer()
    per_layer = sum(t.nbytes for t in [*one["qkv"], one["o"], one["gate"], one["up"], one["down"]])
    layers = [one] + [layer() for _ in range(max(1, L2_BYTES // per_layer) - 1 if device == "cuda" else 0)]
    print("programmatic dependent launch: us per call, without -> with (a CUDA graph over weight copies)")
    for M in ms:
        x = torch.randn(M, H, device=device, dtype=dtype)
        ws = [w for layer_ in layers for w in layer_["qkv"]]
        plain, pdl = both([lambda w=w: gemv(x, w) for w in ws])
        print(f"  M={M} GEMV {square[0]}x{square[1]} back to back: {plain * 1e3:.2f} -> {pdl * 1e3:.2f} us "
              f"({plain / pdl:.2f}x)", flush=True)
        plain, pdl = both([lambda w=w: step(x, w) for w in layers])
        print(f"  M={M} a layer's 6 launches (attention left out): {plain * 1e3:.2f} -> {pdl * 1e3:.2f} us "
              f"({plain / pdl:.2f}x)", flush=True)


def dense_gemv(device, dtype, timed, bandwidth, shapes, ms, sweep):
    """The GEMV's dense loop on the unquantized weight (a bf16 model's decoding step with the fused kernels,
    and a bf16 head) against cuBLAS: the default tile and the best of ``dense_tiles``; GB/s of the
    weight read."""
    print("bf16 weights: the GEMV's dense loop against cuBLAS (us, GB/s of the weight)")
    for N, K in shapes:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        ws = [w] + [w.clone() for _ in range(max(1, L2_BYTES // (2 * w.numel())) - 1)] if device == "cuda" else [w]
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            ref = x.float() @ w.float().T
            t_cublas = timed([lambda w=w: x @ w.T for w in ws])
            times = {}
            for tile in dict.fromkeys([dense_tile(M)] + (dense_tiles(M) if M in sweep else [])):
                checked(lambda: gemv(x, w, tile), ref)
                times[tile] = timed([lambda w=w: gemv(x, w, tile) for w in ws])
            best = min(times, key=times.get)
            gbs = lambda t: 2 * w.numel() / t / 1e6  # noqa: E731
            share = lambda t: f" ({gbs(t) * 1e9 / bandwidth:.0%} of copy)" if bandwidth else ""  # noqa: E731
            print(f"{f'{N}x{K}':>12} {M:3d} | cuBLAS {t_cublas * 1e3:8.2f} {gbs(t_cublas):5.0f}{share(t_cublas)} | "
                  f"ours {times[dense_tile(M)] * 1e3:8.2f} {gbs(times[dense_tile(M)]):5.0f} | best "
                  f"{','.join(map(str, best[:3]))} {times[best] * 1e3:8.2f} {gbs(times[best]):5.0f}{share(times[best])}"
                  f" | ours/cuBLAS {times[dense_tile(M)] / t_cublas:.2f}, best/cuBLAS {times[best] / t_cublas:.2f}",
                  flush=True)
            if len(times) > 1:  # every tile, so that one tile a row count can be chosen over all shapes
                print(" " * 18 + "tiles: " + ", ".join(f"{','.join(map(str, t[:3]))} {v * 1e3:.2f}"
                                                          for t, v in times.items()), flush=True)


def dequantize_kernels(device, dtype, timed, bandwidth, shapes, m):
    """The byte and the word dequantize kernel, each checked for the reference's bits, then timed alone (GB/s
    read + written, share of the copy bandwidth) and before cuBLAS at m rows of x (a training step's
    projections, each three times a step), against bf16 cuBLAS on the unquantized weight."""
    print(f"dequantize kernels (us, GB/s read + written), and dequantize + cuBLAS at M = {m} (us)")
    for N, K in shapes:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        moved = quantize(w).nbytes + w.numel() * w.element_size()
        qs = [quantize(w) for _ in range(max(1, L2_BYTES // moved) if device == "cuda" else 1)]
        x = torch.randn(m, K, device=device, dtype=dtype)
        alone, before = {}, {}
        for by_words in (False, True):
            assert torch.equal(nf4_dequantize(qs[0], dtype, by_words=by_words), qs[0].dequantize(dtype))
            alone[by_words] = timed([lambda q=q: nf4_dequantize(q, dtype, by_words=by_words) for q in qs])
            before[by_words] = timed([lambda q=q: x @ nf4_dequantize(q, dtype, by_words=by_words).T for q in qs])
        dense = timed([lambda: x @ w.T])
        share = lambda t: f" ({moved / t * 1e3 / bandwidth:.0%} of copy)" if bandwidth else ""  # noqa: E731
        print(f"{f'{N}x{K}':>12} | bytes {alone[False] * 1e3:8.2f} {moved / alone[False] / 1e6:5.0f}"
              f"{share(alone[False])} | words {alone[True] * 1e3:8.2f} {moved / alone[True] / 1e6:5.0f}"
              f"{share(alone[True])} | bytes/words {alone[False] / alone[True]:.2f} | + cuBLAS: bytes "
              f"{before[False] * 1e3:8.2f}, words {before[True] * 1e3:8.2f}, bf16 cuBLAS alone {dense * 1e3:8.2f} "
              f"({before[False] / dense:.2f}x, {before[True] / dense:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
