"""The NF4 kernels' scripts under bench/ run on the CPU machine: the benchmarks at tiny sizes under the
interpreter (their own checks against the reference fail them), and the compile check for sm_90 and sm_80 with
what it must find in the compiled code."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, WITHOUT_TRITON

pytest.importorskip("triton", reason=WITHOUT_TRITON)


def test_benchmark_script_runs_at_tiny_sizes():
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_nf4_matmul.py"), "--tiny"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gemv us" in result.stdout and "| bytes/words " in result.stdout and "+ cuBLAS: bytes" in result.stdout
    assert "best at-end" in result.stdout and "q, k, v" in result.stdout and "gate, up, SwiGLU" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith("40x128 ")]
    assert len(rows) == 5 and "bytes/words" in rows[4]  # M = 1 and 3, the dense loop at both, the dequantize kernels
    assert all("ours/cuBLAS" in row for row in rows[2:4])


def test_gemv_reads_script_runs_at_tiny_sizes():
    """bench_gemv_reads.py's reads kernel sums every word of W once and every absmax byte once a word (the
    script fails where its sums are not torch's): at a partial last step and rows past a whole tile."""
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gemv_reads.py"), "--tiny"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("GEMV / reads") == 4 and result.stdout.count("torch's sum of the words") == 2
    assert "its reads, no step ahead: fixed" in result.stdout and result.stdout.count("streamed by a fixed") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the scripts time their kernels")
def test_the_gpu_scripts_say_in_one_line_what_they_need_here():
    """Run without a GPU (or --tiny outside the interpreter) they ended in tracebacks: CUDA assertions, Triton's
    "0 active drivers"; check_nf4_cuda.py --help ran the whole check."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    for script, args, said in [("check_nf4_cuda.py", [], "check_nf4_cuda.py times CUDA kernels: it needs a GPU"),
                               ("bench_model_gpu.py", [], "bench_model_gpu.py times CUDA kernels: it needs a GPU"),
                               ("bench_attention.py", [], "bench_attention.py times CUDA kernels: it needs a GPU"),
                               ("bench_nf4_matmul.py", [], "it needs a GPU (--tiny: a smoke run on the CPU, under "
                                                           "TRITON_INTERPRET=1)"),
                               ("bench_gemv_reads.py", ["--tiny"], "--tiny runs the kernels in Triton's interpreter: "
                                "TRITON_INTERPRET=1 python bench/bench_gemv_reads.py --tiny"),
                               ("check_nf4_cuda.py", ["--help"], "usage: check_nf4_cuda.py [-h]")]:
        result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], env=env, capture_output=True,
                                text=True, timeout=120)
        assert said in result.stdout + result.stderr and "Traceback" not in result.stderr, (script, result.stderr)


@pytest.mark.slow  # about a minute and a half on 2 cores: CI runs it after the README's test command
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA machine compiles the kernels in every GPU test")
def test_every_kernel_configuration_compiles_for_hopper_and_ampere():
    """The interpreter does not run the compiler: compile every kernel as the wrappers launch it,
    for sm_90 and sm_80, with Triton's bundled ptxas (no GPU needed)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "check_kernels_compile.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    if "no NVIDIA backend tools" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = result.stdout.splitlines()
    header = [h.strip() for h in next(line for line in lines if line.startswith("| arch")).strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines
            if line.startswith("| sm_")]
    assert len(rows) > 40
    for row in rows:  # x and the packed weight are read in wide loads
        assert int(row["vector_loads"]) >= 2 or "scalar loads" in row["case"], row

    def loop_counts(config, dense=False):  # (arch, case, tile) -> loop instructions a weight, one row of bf16 x
        return {(r["arch"], r["case"].removesuffix(", codes from the L1 cache"), r["config"].replace(config, "")):
                float(r["loop_instr_per_weight"]) for r in rows if config in r["config"] and r["case"].startswith("bf")
                and r["config"].startswith("block_m=1,") and r["loop_instr_per_weight"] != "-"
                and ("dense" in r["case"]) == dense}
    each_step, at_end = loop_counts("at_end=False,shuffle=False"), loop_counts("at_end=True,shuffle=True")
    assert at_end and max(at_end.values()) < 0.6 * min(each_step.values())  # the point of the at-end loop
    assert max(each_step.values()) < 15, each_step  # its code addresses not moved between threads: 19.8 (3.9)
    from_cache = loop_counts("at_end=True,shuffle=False")  # the same tiles with their codes loaded
    assert len(from_cache) == 14 and all(at_end[tile] < 0.75 * n for tile, n in from_cache.items())  # shuffles'
    with_pdl = [r["pdl"] for r in rows if r["pdl"] != "-"]  # sm_90: the GEMVs and the decoding kernels, in order
    assert len(with_pdl) >= 12 and all(p.endswith("loads, then the wait") for p in with_pdl), with_pdl
    shuffled = [r for r in rows if "shuffle=True" in r["config"]]  # tables reach the shuffles in their lanes
    assert shuffled and all(r["shuffle_tables"] == "in place" for r in shuffled)
    dense = loop_counts("at_end=True,shuffle=False", dense=True)  # bf16 at a copy's rate leaves room for ~15
    # 9 tiles, q/k/v, residual, SwiGLU, on 2 archs; q/k/v with PDL on sm_90
    assert len(dense) == 2 * 12 + 1 and max(dense.values()) < 6, dense
    # nothing moves between threads through shared memory inside the loop, the dense loop's or the at-end loop's
    in_place = [r for r in rows if (r["case"].startswith("bf") or "dense" in r["case"])
                and "at_end=True" in r["config"]]
    assert len(in_place) > 60 and all(r["loop_shared_memory"] == "no" for r in in_place), in_place
    dequantize = {r["kernel"]: float(r["instr_per_weight"]) for r in rows if r["arch"] == "sm_90"
                  and r["instr_per_weight"] != "-"}
    assert dequantize["nf4_dequant_words"] < 0.5 * dequantize["nf4_dequant"]  # the point of the word kernel
