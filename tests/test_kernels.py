"""Triton NF4 kernels against the PyTorch reference: on the GPU, or on the CPU through the interpreter.

Tolerances: float32 runs the dot in IEEE precision, so only summation order
differs (atol 1e-4 on outputs of size ~10); float16 operands round the
dequantized weight to 11 bits (relative error of the result ~1e-3, checked
at 5e-3). bfloat16 is checked on the GPU only (tests/test_gpu.py): the
interpreter's bfloat16 dot and its float32-to-bfloat16 rounding differ from
the hardware's.
"""
import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bailong.nf4 import BLOCKSIZES, quantize
from conftest import ROOT
from kernels import nf4_dequantize, nf4_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3)}


def reference(x, q, dy):
    x = x.detach().clone().requires_grad_(True)
    y = F.linear(x, q.dequantize(x.dtype))
    y.backward(dy)
    return y, x.grad


def check(M, N, K, blocksize=64, double_quant=True, dtype=torch.float32, lead=()):
    torch.manual_seed(M * 1000 + N + K)
    q = quantize(torch.randn(N, K, device=DEVICE), blocksize, double_quant)
    x = torch.randn(*lead, M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    y = nf4_matmul(x, q)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref = reference(x, q, dy)
    scale = y_ref.abs().max().item() + 1e-6
    torch.testing.assert_close(y / scale, y_ref / scale, **TOL[dtype])
    torch.testing.assert_close(x.grad / scale, dx_ref / scale, **TOL[dtype])


@pytest.mark.parametrize("M", [1, 3, 16, 37])
@pytest.mark.parametrize("N,K", [(40, 72), (33, 130), (17, 96), (33, 128), (40, 192)])
def test_odd_shapes(M, N, K):
    check(M, N, K)  # N not a multiple of the tiles; K a whole number of blocks (the fast path) or not


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_blocksize(blocksize, double_quant):
    check(5, 24, 200, blocksize, double_quant)  # rows cut across blocks: the generic path
    check(5, 24, 2 * blocksize, blocksize, double_quant)  # rows of whole blocks: the fast path


def test_split_k_float16_and_leading_dimensions():
    check(2, 24, 1100, dtype=torch.float16)  # K split across programs (decode path), generic
    check(2, 24, 1280, dtype=torch.float16)  # and the fast path
    check(1, 24, 1280, dtype=torch.float16)  # one row: the GEMV kernel, K split
    check(20, 32, 96, dtype=torch.float16, lead=(2, 3))


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_kernel_is_exact(double_quant):
    for shape in [(33, 130), (300, 256)]:  # the second: over 256 blocks, so several nested absmax
        q = quantize(torch.randn(*shape, device=DEVICE), 64, double_quant)
        for dtype in [torch.float32, torch.float16]:
            assert torch.equal(nf4_dequantize(q, dtype), q.dequantize(dtype))


@pytest.mark.parametrize("configs,M", [("matmul_configs", 150), ("dx_configs", 150), ("small_m_configs", 7),
                                       ("gemv_configs", 1)])
def test_every_gpu_tile_under_the_interpreter(monkeypatch, configs, M):
    """The GPU's tiles (grouped row tiles, 128-wide blocks), not only the interpreter's small one."""
    m = importlib.import_module("kernels.nf4_matmul")
    for config in getattr(m, configs)():
        monkeypatch.setattr(m, "INTERPRETER_TILE", {**m.INTERPRETER_TILE, **config.kwargs})
        check(M, 270, 256)  # rows of whole blocks
        check(M, 70, 200, dtype=torch.float16)  # and not


def test_each_matmul_takes_the_way_it_timed_faster(monkeypatch):
    m = importlib.import_module("kernels.nf4_matmul")  # the module (the package exports a function of its name)
    q = quantize(torch.randn(24, 128, device=DEVICE))
    x, dy = torch.randn(20, 128, device=DEVICE), torch.randn(20, 24, device=DEVICE)
    w = q.dequantize()
    for way in ["fused", "dequant"]:
        torch.testing.assert_close(m.nf4_matmul_forward(x, q, way), x @ w.T, **TOL[torch.float32])
        torch.testing.assert_close(m.nf4_matmul_backward(dy, q, way), dy @ w, **TOL[torch.float32])

    monkeypatch.setattr(m, "_fastest", {})
    assert m.choose_way(m.FORWARD, x, q) == "fused" and m._fastest == {}  # the interpreter: the fused kernels
    times, ran = iter([2.0, 1.0, 1.0, 3.0, 1.0, 2.0]), []  # forward: fused 2 ms, dequant 1 ms; backward: 1, 3
    monkeypatch.setattr(m, "_on_gpu", lambda x: True)
    monkeypatch.setattr(m, "_capturing", lambda: False)
    monkeypatch.setattr(m, "_time", lambda fn: ran.append(fn()) or next(times))
    assert m.choose_way(m.FORWARD, x, q) == "dequant" and len(ran) == 0  # float32: cuBLAS, nothing timed
    x, dy = x.half(), dy.half()
    for _ in range(2):  # timed once, then remembered
        assert m.choose_way(m.FORWARD, x, q) == "dequant" and m.choose_way(m.BACKWARD, dy, q) == "fused"
    assert len(ran) == 4 and len(m._fastest) == 2
    assert m.choose_way(m.FORWARD, torch.randn(100, 128, device=DEVICE).half(), q) == "fused"  # a new M bucket
    monkeypatch.setattr(m, "_capturing", lambda: True)
    assert m.choose_way(m.FORWARD, torch.randn(1000, 128, device=DEVICE).half(), q) == "dequant"  # no timing
    assert len(ran) == 6 and len(m._fastest) == 3


def test_autocast_computes_in_its_dtype_as_linear_does():
    q = quantize(torch.randn(24, 64, device=DEVICE))
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = nf4_matmul(x, q)
        assert y.dtype == F.linear(x, q.dequantize()).dtype == torch.float16
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), x.detach() @ q.dequantize().T, **TOL[torch.float16])


def test_bad_input():
    q = quantize(torch.randn(8, 64, device=DEVICE))
    with pytest.raises(ValueError, match="x has 32 features; the weight expects 64"):
        nf4_matmul(torch.randn(2, 32, device=DEVICE), q)


def test_benchmark_script_runs_at_tiny_sizes():
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_nf4_matmul.py"), "--tiny"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fused ms" in result.stdout and "dequantize to float16: kernel" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.strip().startswith("40x72 ")]) == 3


@pytest.mark.slow  # about 2.5 minutes on 2 cores: CI runs it after the README's test command
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA machine compiles the kernels in every GPU test")
def test_every_kernel_configuration_compiles_for_hopper_and_ampere():
    """The interpreter does not run the compiler: compile every configuration the autotuner
    would try, for sm_90 and sm_80, with Triton's bundled ptxas (no GPU needed)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "check_kernels_compile.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    if "no NVIDIA backend tools" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| sm_")]
    assert len(rows) > 40
    for arch, case, kernel, *_, mma, _ in rows:  # large M runs on tensor cores: wgmma on Hopper, mma on Ampere
        if "M=4096" in case:
            assert mma == ("wgmma" if arch == "| sm_90" else "mma"), (arch, case, kernel)
