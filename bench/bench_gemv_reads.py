"""Where the NF4 GEMV's time goes at one row of x: the GEMV against its own reads without its work.

At one row of x the GEMV (``bailong_kernels.nf4_gemv``) reads its 4-bit weight
at about 1 TB/s on an H200, where a copy reaches 4.3; its second loop, with
5.1 instructions a weight against the first loop's 12.7 (as Triton 3.6, the
H200 run's, compiles them), made it only 1.24x faster (docs/BENCHMARKS.md).
So what sets its time? This script takes the work away and keeps the reads:
``_reads_kernel`` has the at-end loop's grid, tile and loads (a program BLOCK_N
rows of W and all of K; a thread a chunk of 4 words a row a step, one 16-byte
load; the chunk's absmax byte; the next step asked for before this one is used)
and only adds up what it reads (an int32 sum a row, checked against torch's).

For each Llama-2-7B shape and each at-end tile of ``gemv_tiles(1)``: the GEMV's
time and its reads' time (us; GB/s of the NF4 bytes); the reads alone at three
bigger programs (8 and 16 rows of W on 4 and 8 warps, the same 4 chunks a
thread a step; 32 rows on 8 warps, twice that). At the default tile also:
the reads by a fixed number of programs (2, 4, 8 and 16 a multiprocessor), each
streaming its row tiles (``_streamed_reads_kernel``: the next step asked for
ahead across tiles too, so its reads never stop between them); the reads
without the absmax bytes, the reads without the step ahead (each step asked for
when used), and torch's sum of the same words (a library reduction over the
same bytes). From the two shapes with K = 4,096 each way's
time is split into a fixed part and a rate (a line through two points).

How to read it: where the GEMV takes about its reads' time, the reads (the
grid, the bytes a program has in flight) set it, and fewer instructions will
not help; where it takes much longer, the loop's work does (its instructions,
their latency at the registers' occupancy). Times as bench_nf4_matmul.py takes
them: a CUDA graph over copies of the weight that do not fit in the L2, replayed.

    python bench/bench_gemv_reads.py
    TRITON_INTERPRET=1 python bench/bench_gemv_reads.py --tiny      # CPU smoke run of the whole script
"""
import argparse

import torch
import triton
import triton.language as tl

from bailong.nf4 import quantize
from bailong_kernels.nf4_dequant import FMA, cdiv, launch_device
from bailong_kernels.nf4_gemv import gemv, gemv_tile, gemv_tiles
from bailong_kernels.nf4_gemv_at_end import _step_addresses, _step_words
from bench_model_gpu import need_gpu
from bench_nf4_matmul import L2_BYTES, SHAPES, checked, copy_bandwidth, graph_ms, wall_ms


@triton.jit
def _step_reads(words_at, absmax_ptr, blocks, chunk, k0, K, C: tl.constexpr, BLOCKSIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, SCALES: tl.constexpr, MASKED: tl.constexpr):
    """A step's words from column k0, each chunk's 4 summed, plus its absmax byte 4 times (with ``SCALES``): (BN,
    C) int32, the words and bytes asked for as ``_gemv_rows_at_end`` asks for them (``_step_addresses``)."""
    words = _step_words(words_at, k0, K, C, MASKED)  # the last, partial step (MASKED): whole chunks
    sums = tl.sum(tl.reshape(words, (BLOCK_N, C, 4)), axis=2)  # in the thread: its chunk's 4 words
    if SCALES:
        if MASKED:
            scale = tl.load(absmax_ptr + blocks + k0 // BLOCKSIZE, mask=k0 // 32 + chunk < K // 32, other=0)
        else:
            scale = tl.load(absmax_ptr + blocks + k0 // BLOCKSIZE)
        sums += 4 * tl.reshape(scale.to(tl.int32), (BLOCK_N, C))
    return sums


@triton.jit
def _reads_kernel(w_ptr, absmax_ptr, out_ptr, N, K, BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, AHEAD: tl.constexpr, SCALES: tl.constexpr):
    """out[n] = the sum (int32, wrapping) of row n's words, plus each chunk's absmax byte 4 times (once a word,
    with ``SCALES``): ``_gemv_rows_at_end``'s loads in its order, the work left out. ``AHEAD``: the next step
    asked for before this one is used, as there."""
    C: tl.constexpr = BLOCK_K // 32  # chunks of 4 words a step
    words_at, blocks, chunk = _step_addresses(w_ptr, tl.program_id(0) * BLOCK_N, N, K, C, BLOCKSIZE, BLOCK_N)
    acc = tl.zeros((BLOCK_N, C), dtype=tl.int32)
    whole = K - K % BLOCK_K
    sums = _step_reads(words_at, absmax_ptr, blocks, chunk, 0, K, C, BLOCKSIZE, BLOCK_N, SCALES, False)
    for k0 in range(0, whole, BLOCK_K):
        if AHEAD:  # the next whole step (the last: itself again, cached), then this one used
            ahead = k0 + tl.where(k0 + BLOCK_K < whole, BLOCK_K, 0)
            next_sums = _step_reads(words_at, absmax_ptr, blocks, chunk, ahead, K, C, BLOCKSIZE, BLOCK_N, SCALES,
                                    False)
            acc += sums
            sums = next_sums
        else:  # each step asked for when it is used
            acc += _step_reads(words_at, absmax_ptr, blocks, chunk, k0, K, C, BLOCKSIZE, BLOCK_N, SCALES, False)
    if whole < K:
        acc += _step_reads(words_at, absmax_ptr, blocks, chunk, whole, K, C, BLOCKSIZE, BLOCK_N, SCALES, True)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + n, tl.sum(acc, axis=1), mask=n < N)


@triton.jit
def _streamed_reads_kernel(w_ptr, absmax_ptr, out_ptr, N, K, BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """``_reads_kernel``'s sums by a fixed number of programs G (the grid), each taking the row tiles pid, pid +
    G, ...: every step of every tile of a program in one loop, the next step (of this tile or of the next)
    asked for before this one is used, so that a program's reads do not stop between its tiles."""
    C: tl.constexpr = BLOCK_K // 32
    pid, programs = tl.program_id(0), tl.num_programs(0)
    steps = tl.cdiv(K, BLOCK_K)  # a step a program's loop turn; the last of a tile may be partial
    turns = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, programs) * steps
    acc = tl.zeros((BLOCK_N, C), dtype=tl.int32)
    sums = _turn_reads(w_ptr, absmax_ptr, pid, programs, 0, steps, N, K, C, BLOCKSIZE, BLOCK_N, BLOCK_K)
    for turn in range(turns):
        next_sums = _turn_reads(w_ptr, absmax_ptr, pid, programs, tl.minimum(turn + 1, turns - 1), steps, N, K, C,
                                BLOCKSIZE, BLOCK_N, BLOCK_K)
        acc += sums
        if turn % steps == steps - 1:  # the tile's last step: its sums out, the next tile's begin
            n = (pid + turn // steps * programs) * BLOCK_N + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + n, tl.sum(acc, axis=1), mask=n < N)
            acc = tl.zeros((BLOCK_N, C), dtype=tl.int32)
        sums = next_sums


@triton.jit
def _turn_reads(w_ptr, absmax_ptr, pid, programs, turn, steps, N, K, C: tl.constexpr, BLOCKSIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The sums of ``_streamed_reads_kernel``'s turn: step turn % steps of the program's tile turn // steps,
    masked past K."""
    words_at, blocks, chunk = _step_addresses(w_ptr, (pid + turn // steps * programs) * BLOCK_N, N, K, C,
                                              BLOCKSIZE, BLOCK_N)
    return _step_reads(words_at, absmax_ptr, blocks, chunk, turn % steps * BLOCK_K, K, C, BLOCKSIZE, BLOCK_N, True,
                       True)


def _sums(kernel, q, tile, programs=None, **meta):
    """(N,) int32: a reads kernel over NF4 weight q at a GEMV tile (BLOCK_N, BLOCK_K, num_warps, at_end), a
    program a row tile, or ``programs`` programs."""
    (N, K), (block_n, block_k, warps, _) = q.shape, tile
    assert q.double_quant and q.absmax.dtype == torch.uint8 and K % q.blocksize == 0
    out = torch.empty(N, dtype=torch.int32, device=q.data.device)
    with launch_device(out):
        kernel[(min(programs or N, cdiv(N, block_n)),)](
            q.data.view(-1).view(torch.int32), q.absmax, out, N, K, BLOCKSIZE=q.blocksize, BLOCK_N=block_n,
            BLOCK_K=min(block_k, 1 << (K.bit_length() - 1)), num_warps=warps, **meta, **FMA)
    return out


def reads(q, tile, ahead=True, scales=True):
    """The sums of ``_reads_kernel``: a program a row tile, as the GEMV."""
    return _sums(_reads_kernel, q, tile, AHEAD=ahead, SCALES=scales)


def streamed_reads(q, tile, programs):
    """The same sums by ``_streamed_reads_kernel``'s ``programs`` programs."""
    return _sums(_streamed_reads_kernel, q, tile, programs)


def reads_reference(q, scales=True):
    """What ``reads`` returns, by torch: each row's words summed, plus its absmax bytes 4 times a chunk."""
    N, K = q.shape
    total = q.data.view(-1).view(torch.int32).view(N, K // 8).long().sum(1)
    if scales:
        total += 4 * (q.blocksize // 32) * q.absmax.view(N, -1).long().sum(1)
    return ((total + 2**31) % 2**32 - 2**31).int()  # int32, wrapped


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (under TRITON_INTERPRET=1)")
    args = p.parse_args()
    need_gpu("bench_gemv_reads.py", args.tiny)
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float16 if args.tiny else torch.bfloat16
    # tiny: K a step and a partial one at the interpreter's 128 columns a step, rows past a whole tile
    shapes = [(42, 192), (74, 192)] if args.tiny else SHAPES
    tiles = [t for t in gemv_tiles(1) if t[3]]
    default = tiles[0] if args.tiny else gemv_tile(1)
    if not default[3]:
        raise SystemExit(f"the default tile at one row, {default}, is not the at-end loop: the reads mirror that loop")
    wider = [(8, 2048, 4, True), (16, 2048, 8, True), (32, 2048, 8, True)]  # for the reads alone
    if args.tiny:
        tiles, wider = [default, tiles[-1]], wider[:1]
    timed = wall_ms if args.tiny else graph_ms
    sms = 2 if args.tiny else torch.cuda.get_device_properties().multi_processor_count
    stream_programs = [sms * k for k in (1, 2) if args.tiny] or [sms * k for k in (2, 4, 8, 16)]
    name = "CPU (Triton interpreter)" if args.tiny else torch.cuda.get_device_name()
    bandwidth = None if args.tiny else copy_bandwidth()
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}, {dtype}, one row of x; "
          f"default tile {','.join(map(str, default[:3]))}"
          + (f"; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)" if bandwidth else ""))
    rate = lambda nbytes, ms: f"{ms * 1e3:8.2f} us {nbytes / ms / 1e6:5.0f} GB/s"  # noqa: E731
    lines = {}  # way -> [(bytes, ms)] at the shapes with the first shape's K
    for N, K in shapes:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        qs = [quantize(w) for _ in range(max(1, L2_BYTES // quantize(w).nbytes) if device == "cuda" else 1)]
        q, x = qs[0], torch.randn(1, K, device=device, dtype=dtype)
        ref = x.float() @ q.dequantize(torch.float32).T
        print(f"{N}x{K}: {q.nbytes / 1e6:.1f} MB of NF4 a weight, {len(qs)} copies")

        def way(label, call, nbytes=q.nbytes):
            t = timed([lambda q=q: call(q) for q in qs])
            if K == shapes[0][1]:
                lines.setdefault(label, []).append((nbytes, t))
            return t
        for tile in tiles:
            mark = " (default)" if tile == default else ""
            checked(lambda: gemv(x, q, tile), ref)
            for ahead in (True, False) if tile == default else (True,):
                for scales in (True, False) if tile == default and ahead else (True,):
                    assert torch.equal(reads(q, tile, ahead, scales).cpu(), reads_reference(q, scales).cpu())
            t_gemv = way(f"GEMV {','.join(map(str, tile[:3]))}{mark}", lambda q: gemv(x, q, tile))
            t_reads = way(f"its reads {','.join(map(str, tile[:3]))}{mark}", lambda q: reads(q, tile))
            print(f"  tile {','.join(map(str, tile[:3])):>9}{mark:10} | GEMV {rate(q.nbytes, t_gemv)} | its reads "
                  f"{rate(q.nbytes, t_reads)} | GEMV / reads {t_gemv / t_reads:5.2f}", flush=True)
        for tile in wider:  # bigger programs (more warps, the same 4 chunks a thread, or twice that at 32 rows)
            assert torch.equal(reads(q, tile).cpu(), reads_reference(q).cpu())
            t_reads = way(f"reads only {','.join(map(str, tile[:3]))}", lambda q: reads(q, tile))
            print(f"  tile {','.join(map(str, tile[:3])):>9}{'':10} | {'(not a GEMV tile)':27} | its reads "
                  f"{rate(q.nbytes, t_reads)}", flush=True)
        streamed = []
        for programs in stream_programs:
            assert torch.equal(streamed_reads(q, default, programs).cpu(), reads_reference(q).cpu())
            streamed.append(way(f"reads streamed by {programs} programs",
                                lambda q: streamed_reads(q, default, programs)))
        print("  at the default tile, the reads streamed by a fixed number of programs: " + " | ".join(
            f"{programs} {rate(q.nbytes, t)}" for programs, t in zip(stream_programs, streamed)), flush=True)
        words_bytes = q.data.numel()
        t_words = way("its words alone", lambda q: reads(q, default, scales=False), words_bytes)
        t_late = way("its reads, no step ahead", lambda q: reads(q, default, ahead=False))
        t_sum = way("torch sum of the words", lambda q: q.data.view(-1).view(torch.int32).sum(), words_bytes)
        print(f"  at the default tile: words alone (no absmax) {rate(words_bytes, t_words)} | reads with no step "
              f"ahead {rate(q.nbytes, t_late)} | torch's sum of the words {rate(words_bytes, t_sum)}", flush=True)
    print(f"each way at K = {shapes[0][1]}, as a fixed part plus a rate (a line through its two shapes):")
    for label, points in lines.items():
        (b0, t0), (b1, t1) = points[:2]
        slope = (t1 - t0) / (b1 - b0)  # ms a byte
        fixed = f"{(t0 - slope * b0) * 1e3:6.2f} us" if slope > 0 else "     - "
        print(f"  {label:>32}: fixed {fixed}, then " + (f"{1 / slope / 1e6:6.0f} GB/s" if slope > 0 else "-"))


if __name__ == "__main__":
    main()
