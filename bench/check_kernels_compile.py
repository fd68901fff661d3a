"""Compile every Triton kernel of the project for real NVIDIA GPUs, on a machine without one.

The Triton interpreter runs the kernels' arithmetic on the CPU but not the
compiler: a kernel can pass every interpreter test and still fail to compile
for a GPU, or compile into code that spills registers. This script stands in a
compile-only driver for the CUDA one (the target architecture is all the
compiler needs), calls the real wrappers with Llama-2-7B-shaped bf16 inputs
on the CPU, and compiles each kernel as those calls would launch it (the GEMV
at every row count it takes), for sm_90 (H100) and sm_80 (A100), with Triton's
bundled ptxas. Per kernel it reports registers, spills, shared memory, and what
the PTX says: tensor-core instructions (wgmma / mma) and vector loads. For the
GEMV at one row of x it also counts the machine (SASS) instructions of the loop
body per weight a thread takes a step: reading 4-bit weights at an H200's ~4 TB/s
leaves an SM room to issue about 4 instructions a weight, so this count says
whether a GEMV can be bound by memory at all (a static measure: the GPU times);
and whether that loop touches shared memory, which in these loops means values
moved between threads every step (a layout conversion Triton chose).

    python bench/check_kernels_compile.py                 # exit status 1 if anything fails to compile or spills
                                                          # (in a GEMV: in its loop), moves values between
                                                          # threads in an at-end loop, or would compile again as
                                                          # training goes on
    python bench/check_kernels_compile.py --allow-spills  # spills reported, not failed: under another Triton

Each Triton version parses, lays out and allocates registers its own way: a kernel
that compiles under one may fail to compile under an older one (a nested tuple
target, ``(a, b), (c, d) = ...``, fails in 3.3 to 3.7), and small spills come and
go between versions (docs/BENCHMARKS.md, "The kernels under other Triton
versions"). CI runs it under the newest Triton, spills failing, then under 3.6,
torch 2.11's, with ``--allow-spills``. What the layouts of the GEMV's at-end and
dense loops depend on (which axis of a load the lanes go over) also changed
between versions; they are written so that none moves values between threads
under either, and that fails the check under any Triton.

Run it without TRITON_INTERPRET (the interpreter replaces the compiler).
"""
import argparse
import os
import re
import sys
import warnings

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler this script checks")
import triton
from triton.runtime import driver

from bailong.nf4 import quantize
from bailong.optim import BLOCK as ADAMW_BLOCK, tables as adamw_tables
from bailong_kernels import adamw8bit, decode, dense_gemv, dropout, layers, nf4_dequant as dequant, nf4_gemv
from bench_decode import AT_END
from compiled_code import CompileOnly, instructions, loop_bodies, pdl_order, require_nvidia_tools, resources, \
    tables_stay_in_their_lanes

KERNELS = [nf4_gemv._nf4_gemv_kernel, nf4_gemv._nf4_gemv_swiglu_kernel, dequant._nf4_dequant_kernel,
           dequant._nf4_dequant_words_kernel,
           decode._rms_norm_kernel, decode._swiglu_kernel, decode._decode_attention_kernel, decode._merge_parts_kernel,
           layers._rms_norm_backward_kernel, layers._swiglu_backward_kernel, layers._rope_kernel,
           layers._cross_entropy_kernel, dropout._dropout_kernel, dropout._dropout_sum_kernel, adamw8bit._adamw8bit]
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may opt in to


def describe(case, kernel, config, compiled, arch):
    ptx = compiled.asm["ptx"]
    regs, spill = resources(compiled.asm["cubin"])
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    vec = len(re.findall(r"(ld|cp\.async)\S*\.v[24]\.|cp\.async\.\w+\.shared\.global(\.\w+)* \[[^]]+\], \[[^]]+\], 16",
                         ptx))
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    tile = ",".join(f"{k}={v}" for k, v in config.items())
    smem = compiled.metadata.shared
    return dict(arch=f"sm_{arch}", case=case, kernel=name, config=tile, regs=regs, spill=spill,
                smem=smem if smem <= SHARED_LIMIT[arch] else f"{smem} (too much: skipped)", mma=mma, vector_loads=vec)


# global loads before the wait in the PTX of each kernel compiled with PDL, as Triton 3.9 and 3.6 compile them:
# the NF4 GEMV's first step of weights (words, scales, the code table), the dense GEMV's, RMSNorm's weight; the
# others read nothing before it. Another count fails the check: a load of x, the residual or the cache moved
# above the wait (by a change, or another Triton's scheduling) would be a race on the GPU.
PDL_LOADS = {"nf4_gemv": 33, "nf4_gemv_swiglu": 33, "dense": 2, "rms_norm": 4, "swiglu": 0, "decode_attention": 0,
             "merge_parts": 0}
PDL = dequant.gdc_wait is not None  # Triton 3.5 and later (nf4_dequant)
# every launch says whether it contracts a * b + c into one FMA (nf4_dequant.FMA): Triton 3.9 warns of one that
# does not (3.10 changes the default), and here that warning fails the check
warnings.filterwarnings("error", message="TRITON_DEFAULT_FP_FUSION is unset")


def compile_all(arch):
    """Compile the GEMV kernels for every row count and launch they take, and the other kernels, for this
    architecture."""
    driver.set_active(CompileOnly(arch))
    for kernel in KERNELS:
        kernel.device_caches.clear()  # binders remember the target
    rows, seen = [], set()

    class CompileOnlyKernel:
        """Stands in for a GEMV kernel: ``kernel[grid](*args, **meta)`` compiles instead of launching."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def compile_only(*args, **meta):
                compiled = self.kernel.warmup(*args, grid=(1,), **meta)
                if compiled.hash not in seen:  # shapes that specialise alike compile once
                    seen.add(compiled.hash)
                    row = describe(case, self.kernel, {k.lower(): v for k, v in meta.items()
                                   if k.startswith("BLOCK_") or k in ("AT_END", "SHUFFLE", "num_warps", "PDL")},
                                   compiled, arch)
                    if meta["PDL"]:
                        dense = len(args[1][0] if self.kernel is gemv_kernels[0] else args[1]) == 1
                        row["pdl"] = pdl_order(compiled.asm["ptx"], PDL_LOADS["dense" if dense else row["kernel"]])
                    if meta["SHUFFLE"]:
                        row["shuffle_tables"] = "in place" if tables_stay_in_their_lanes(compiled.asm["ttgir"]) \
                            else "MOVED"
                    # weights a thread takes a step, BLOCK_N BLOCK_K / threads, for all rows of x at once: the
                    # each-step loop runs over the rows at run time (an inner loop) so it is counted at M = 1 only
                    if meta["BLOCK_M"] == 1 or meta["AT_END"]:
                        per_thread = meta["BLOCK_N"] * meta["BLOCK_K"] / (32 * meta["num_warps"])
                        bodies = loop_bodies(compiled.asm["cubin"])
                        body = max(bodies, key=len, default=[])  # the main loop: the longest
                        row["loop_instr_per_weight"] = round(len(body) / per_thread, 1)
                        # values moved between threads through shared memory inside the loop: a layout conversion,
                        # which the at-end and dense loops (AT_END) never make (upper case: the check fails)
                        opcodes = [next(t for t in op.split() if not t.startswith("@")) for op in body]
                        shared = any(o.startswith(("BAR", "STS", "LDS", "LDSM")) for o in opcodes)
                        row["loop_shared_memory"] = ("YES" if meta["AT_END"] else "yes") if shared else "no"
                        local = [op for b in bodies for op in b  # in any of its loops
                                 if re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", op)]
                        row["loop_spills"] = "yes" if local else "no"
                    rows.append(row)
            return compile_only

    gemv_kernels, pdl = (nf4_gemv._nf4_gemv_kernel, nf4_gemv._nf4_gemv_swiglu_kernel), dequant.pdl
    nf4_gemv._nf4_gemv_kernel, nf4_gemv._nf4_gemv_swiglu_kernel = map(CompileOnlyKernel, gemv_kernels)
    try:
        bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
        for (N, K), dtype, blocksize, double_quant in [
                ((4096, 4096), bf16, 64, True), ((11008, 4096), bf16, 64, True), ((4096, 11008), bf16, 64, True),
                ((4096, 4096), fp16, 64, True), ((4096, 4096), bf16, 128, False), ((4096, 4096), fp32, 64, True)]:
            q = quantize(torch.randn(N, K) * 0.02, blocksize, double_quant)  # the kernels read the same bytes
            weight = f"N={N} K={K}" + (f" blocksize {blocksize}" if blocksize != 64 else "") + \
                ("" if double_quant else " no double quant")
            for M in [1, 2, 4, 8, 16]:  # the tile gemv_tile picks for each (bench/bench_nf4_matmul.py tries more)
                case = f"{str(dtype)[6:]} y=x@W.T M={M} {weight}"
                nf4_gemv.gemv(torch.randn(M, K, dtype=dtype), q)
            if dtype == bf16 and double_quant:  # the at-end loop, at the tiles most likely to win
                case = f"bf16 y=x@W.T M=1 {weight}, the first loop"  # at one row, where the at-end loop is the default
                nf4_gemv.gemv(torch.randn(1, K, dtype=dtype), q, (1, 1024, 1, False))
                for M in [1, 2, 4, 8, 16]:
                    likely = {(1, 1024, 1, True), (2, 1024, 1, True), (4, 1024, 1, True), (1, 2048, 2, True),
                              (2, 2048, 2, True), (2, 4096, 4, True), (4, 4096, 4, True)}
                    for tile in [t for t in nf4_gemv.gemv_tiles(M) if t in likely]:
                        case = f"bf16 y=x@W.T M={M} {weight}, at-end loop"
                        nf4_gemv.gemv(torch.randn(M, K, dtype=dtype), q, tile)
                        if M == 1 and N == K:  # and with its codes from the L1 cache, as the each-step loop's
                            case = f"bf16 y=x@W.T M={M} {weight}, at-end loop, codes from the L1 cache"
                            nf4_gemv.SHUFFLES = False
                            try:
                                nf4_gemv.gemv(torch.randn(M, K, dtype=dtype), q, tile)
                            finally:
                                nf4_gemv.SHUFFLES = True
        for (N, K), dtype in [((4096, 4096), bf16), ((11008, 4096), bf16), ((4096, 11008), bf16),
                              ((32000, 4096), bf16), ((4096, 4096), fp16)]:  # dense weights: a bf16 model, heads
            w = torch.randn(N, K, dtype=dtype)
            for M in [1, 2, 4]:  # the tile dense_tile picks, and at one row every tile the benchmark tries
                for tile in [None] + (dense_gemv.dense_tiles(M) if M == 1 and N == K and dtype == bf16 else []):
                    case = f"{str(dtype)[6:]} y=x@W.T M={M} dense N={N} K={K}"
                    nf4_gemv.gemv(torch.randn(M, K, dtype=dtype), w, tile)
        x = torch.randn(1, 4096, dtype=bf16)
        dense = [torch.randn(n, 4096, dtype=bf16) for n in (4096, 1024, 1024, 11008)]
        case = "bf16 q, k, v in one launch M=1 dense N=4096+1024+1024 K=4096"
        nf4_gemv.gemv_group(x, dense[:3])
        case = "bf16 residual + x@W.T (o, down) M=1 dense N=4096 K=4096"
        nf4_gemv.gemv(x, dense[0], residual=x)
        case = "bf16 silu(gate) * up in one launch M=1 dense N=11008 K=4096"
        nf4_gemv.gemv_swiglu(x, dense[3], dense[3])
        qkv = [quantize(torch.randn(n, 4096) * 0.02) for n in (4096, 1024, 1024)]  # GQA: k and v narrower
        gate = quantize(torch.randn(11008, 4096) * 0.02)
        for tile in [None, AT_END]:  # the default's, and bench_decode.py's at-end tile
            case = "bf16 q, k, v in one launch M=1 N=4096+1024+1024 K=4096"
            nf4_gemv.gemv_group(x, qkv, tile)
            case = "bf16 residual + x@W.T (o, down) M=1 N=4096 K=4096"
            nf4_gemv.gemv(x, qkv[0], tile, residual=x)
            case = "bf16 silu(gate) * up in one launch M=1 N=11008 K=4096"
            nf4_gemv.gemv_swiglu(x, gate, gate, tile)
        if arch >= 90 and PDL:  # with programmatic dependent launch (bailong_kernels.use_pdl: Hopper and later)
            dequant.pdl = lambda t: True
            for M, tile in [(1, None), (1, AT_END), (4, None)]:  # the at-end loop, and the first loop at 4 rows
                case = f"bf16 y=x@W.T M={M} N=4096 K=4096, with PDL"
                nf4_gemv.gemv(torch.randn(M, 4096, dtype=bf16), qkv[0], tile)
            case = "bf16 q, k, v in one launch M=1 N=4096+1024+1024 K=4096, with PDL"
            nf4_gemv.gemv_group(x, qkv)
            case = "bf16 residual + x@W.T (o, down) M=1 N=4096 K=4096, with PDL"
            nf4_gemv.gemv(x, qkv[0], residual=x)
            case = "bf16 silu(gate) * up in one launch M=1 N=11008 K=4096, with PDL"
            nf4_gemv.gemv_swiglu(x, gate, gate)
            case = "bf16 q, k, v in one launch M=1 dense N=4096+1024+1024 K=4096, with PDL"
            nf4_gemv.gemv_group(x, dense[:3])
    finally:
        nf4_gemv._nf4_gemv_kernel, nf4_gemv._nf4_gemv_swiglu_kernel = gemv_kernels
        dequant.pdl = pdl
    # the two dequantize kernels as nf4_dequantize launches them (each also as nf4_dequantize_group
    # does, q, k and v in one launch), with the instructions a weight of a thread
    words, steps, warps = dequant.word_steps()
    out = torch.empty(N, K, dtype=torch.bfloat16)
    qkv = [quantize(torch.randn(n, K) * 0.02) for n in (4096, 1024, 1024)]
    for kernel, case, args, meta, per_thread in [
            (dequant._nf4_dequant_kernel, "bfloat16 dequantize", ((dequant.nf4_args(q),), (0, q.numel), out),
             dict(BLOCK=512, num_warps=4), 2 * 512 / (32 * 4)),
            (dequant._nf4_dequant_kernel,
             "bfloat16 dequantize, q, k and v in one launch (N=4096+1024+1024; 3 branches' code, a program runs one)",
             (tuple(map(dequant.nf4_args, qkv)), (0, 4096 * K, 5120 * K, 6144 * K), out),
             dict(BLOCK=512, num_warps=4), 2 * 512 / (32 * 4)),
            (dequant._nf4_dequant_words_kernel, "bfloat16 dequantize, a word a thread (scalar loads, 128 bytes a warp)",
             ((dequant.word_args(q),), (0, q.numel), out),
             dict(WORDS=words, STEPS=steps, num_warps=warps), 8 * words * steps / (32 * warps)),
            (dequant._nf4_dequant_words_kernel,
             "bfloat16 dequantize, a word a thread (scalar loads), q, k and v in one launch",
             (tuple(map(dequant.word_args, qkv)), (0, 4096 * K, 5120 * K, 6144 * K), out),
             dict(WORDS=words, STEPS=steps, num_warps=warps), 8 * words * steps / (32 * warps))]:
        compiled = kernel.warmup(*args, BLOCKSIZE=q.blocksize, DOUBLE_QUANT=True, enable_fp_fusion=False, grid=(1,),
                                 **meta)
        rows.append(describe(case, kernel, meta, compiled, arch))
        rows[-1]["instr_per_weight"] = round(instructions(compiled.asm["cubin"]) / per_thread, 1)
    x, cos = torch.randn(1, 4096, dtype=torch.bfloat16), torch.randn(1, 128, dtype=torch.bfloat16)
    cache = torch.randn(1, 8, 4096, 128, dtype=torch.bfloat16)
    parts = torch.empty(1, 32, 8, 128, dtype=torch.float32)  # float32 partial results
    decoding = [("rms_norm", decode._rms_norm_kernel, (x, x[0], x, 4096, 1e-5), dict(BLOCK=4096)),
                ("swiglu", decode._swiglu_kernel, (x, x, x, 4096, 8192, 8192), dict(BLOCK=1024)),
                ("decode attention", decode._decode_attention_kernel,
                 (x, x, x, cos, cos, torch.zeros(1, dtype=torch.long), cache, cache, x, None, 32, 8, 4096,
                  *cache.stride()[:3], 0.1),
                 dict(HALF=64, BLOCK_D=64, BLOCK_S=64, PARTS=1)),
                ("decode attention in 8 parts", decode._decode_attention_kernel,
                 (x, x, x, cos, cos, torch.zeros(1, dtype=torch.long), cache, cache, parts, parts, 32, 8, 4096,
                  *cache.stride()[:3], 0.1),
                 dict(HALF=64, BLOCK_D=64, BLOCK_S=64, PARTS=8)),
                ("decode attention's merge of 8 parts", decode._merge_parts_kernel, (parts, parts, x, 128),
                 dict(PARTS=8, BLOCK_D=128))]
    with_pdl = [(f"{name}, with PDL", kernel, args, meta | dict(PDL=True, launch_pdl=True))
                for name, kernel, args, meta in decoding] if arch >= 90 and PDL else []
    for name, kernel, args, meta in [(*d[:3], d[3] | dict(PDL=False)) for d in decoding] + with_pdl + [
            ("rms_norm backward", layers._rms_norm_backward_kernel, (x, x[0], x, x, x, 4096, 1e-5),
             dict(BLOCK=4096, PLUS=True)),
            ("swiglu backward", layers._swiglu_backward_kernel, (x, x, x, x, x, 4096, 8192, 8192),
             dict(BLOCK=layers.ELEMENTWISE_BLOCK)),
            ("rope", layers._rope_kernel, (x, cos, cos, x, 2048, 32, 6144, 6144, 1.0),
             dict(HALF=64, BLOCK_H=32, BLOCK_D=64)),
            ("cross entropy (vocabulary 32,000)", layers._cross_entropy_kernel,
             (x, torch.zeros(1, dtype=torch.long), torch.zeros(1), 32000), dict(BLOCK=layers.CROSS_ENTROPY_BLOCK)),
            ("cross entropy (vocabulary 59,241: rows not 16-byte aligned, scalar loads)", layers._cross_entropy_kernel,
             (x, torch.zeros(1, dtype=torch.long), torch.zeros(1), 59241), dict(BLOCK=layers.CROSS_ENTROPY_BLOCK))]:
        compiled = kernel.warmup(*args, grid=(1,), **meta, **dequant.FMA)
        rows.append(describe(f"bfloat16 {name}, Llama-2-7B / GQA shapes", kernel, meta, compiled, arch))
        if meta.get("PDL"):
            rows[-1]["pdl"] = pdl_order(compiled.asm["ptx"], PDL_LOADS[rows[-1]["kernel"]])
    # LoRA dropout of q, k and v's input (3 masks) and its backward, with the instructions a value of a thread:
    # writing 2.7 bytes a value and reading 2.7 (bf16, x read once for 3) at an H200's ~4.3 TB/s leaves an SM
    # room for about 16
    for kernel, case in [(dropout._dropout_kernel, "bfloat16 LoRA dropout of one input for 3 projections"),
                         (dropout._dropout_sum_kernel, "bfloat16 LoRA dropout's backward: 3 gradients summed")]:
        meta, seed = dict(N=3, ROWS=dropout.ROWS, num_warps=4), torch.zeros(1, dtype=torch.int64)  # read there
        launch = dict(grid=(1,), **meta, **dequant.FMA)  # as dropout.py launches it
        compiled = kernel.warmup(x, x, 2048 * 4096, 2048 * 512, seed, 2**40 + 5, 3277, 1.05, **launch)
        rows.append(describe(case, kernel, meta, compiled, arch))
        rows[-1]["instr_per_weight"] = round(instructions(compiled.asm["cubin"]) / (3 * 8 * dropout.ROWS / 128), 1)
        small_key = kernel.warmup(x, x, 2048 * 4096, 2048 * 512, seed, 5, 3277, 1.05, **launch)
        rows[-1]["one_kernel_every_key"] = "yes" if small_key.hash == compiled.hash else "NO"  # counters below 2^31
        compiled = kernel.warmup(x, x, 1, 1, seed, 5, 1, 1.0, **launch)  # arguments equal to 1: not constants
        rows.append(describe(case + ", one value, threshold 1 (scalar loads)", kernel, meta, compiled, arch))
    # AdamW with 8-bit moments on a float32 LoRA weight, as bailong.optim.AdamW8bit launches it
    weight, codes, t = torch.empty(128 * 4096), torch.empty(128 * 4096, dtype=torch.uint8), adamw_tables("cpu")
    maxima = torch.empty(128 * 4096 // ADAMW_BLOCK)
    meta = dict(BLOCK=ADAMW_BLOCK, num_warps=2)
    compiled = adamw8bit._adamw8bit.warmup(
        weight, weight, codes, maxima, t["exp_avg"], t["exp_avg_midpoints"], codes, maxima, t["exp_avg_sq"],
        t["exp_avg_sq_midpoints"], weight.numel(), 1.0, 0.1, 0.999, 0.001, 1e-4, 0.1, 1e-8, grid=(1,), **meta,
        **dequant.FMA)
    rows.append(describe("float32 AdamW step with 8-bit moments, a LoRA A of r = 128 on 4096", adamw8bit._adamw8bit,
                         meta, compiled, arch))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow-spills", action="store_true", help="report spills without failing (another Triton)")
    args = parser.parse_args()
    require_nvidia_tools()
    rows = [row for arch in (90, 80) for row in compile_all(arch)]
    print(f"triton {triton.__version__}: {len(rows)} kernels compiled (vector_loads: 8- and 16-byte loads in the PTX)"
          + ("" if PDL else "; none with programmatic dependent launch, which takes Triton 3.5 or later"))
    header = list(dict.fromkeys(h for row in rows for h in row))
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row.get(h, "-")) for h in header) + " |")
    # a spill fails where it costs: in a GEMV's loop, or anywhere in a kernel whose loop is not read; outside the
    # loop ptxas may keep a value on the stack across it (a store and a load a program) for fewer registers
    spilled = [r for r in rows if r["spill"] and r.get("loop_spills") != "no"]
    for r in spilled:
        print(f"spills: {r['arch']} {r['case']} {r['kernel']} {r['config']}: {r['spill']} bytes of stack a thread")
    for r in [r for r in rows if r["spill"] and r.get("loop_spills") == "no"]:
        print(f"spilled outside the loop only: {r['arch']} {r['case']} {r['config']}: {r['spill']} bytes a thread")
    moved = [r for r in rows if r.get("shuffle_tables") == "MOVED"]
    for r in moved:
        print(f"shuffle tables moved between lanes: {r['arch']} {r['case']} {r['config']}: the codes would be wrong")
    # the at-end and dense loops keep each value in its thread under every Triton (nf4_gemv_at_end's layouts)
    through_shared = [r for r in rows if r.get("loop_shared_memory") == "YES"]
    for r in through_shared:
        print(f"values moved between threads through shared memory every step: {r['arch']} {r['case']} "
              f"{r['config']}")
    recompiled = [r for r in rows if r.get("one_kernel_every_key") == "NO"]
    for r in recompiled:
        print(f"another kernel for a key below 2^31: {r['arch']} {r['case']}: compiled again as training goes on")
    out_of_order = [r for r in rows if "pdl" in r and ("NO WAIT" in r["pdl"] or "STORES" in r["pdl"]
                                                       or "EXPECTED" in r["pdl"])]
    for r in out_of_order:
        print(f"PDL out of order: {r['arch']} {r['case']}: {r['pdl']}")
    return 1 if (spilled and not args.allow_spills) or moved or through_shared or recompiled or out_of_order else 0


if __name__ == "__main__":
    sys.exit(main())
