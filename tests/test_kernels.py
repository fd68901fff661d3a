"""The NF4 kernels (dequantize, GEMV, dequantize + cuBLAS) against the PyTorch reference: on the GPU, or on the
CPU through the interpreter. Their compile check and benchmark scripts: tests/test_kernel_scripts.py; the layer
kernels and the launch budgets: tests/test_layer_kernels.py.

Tolerances: float32 sums in float32, so only summation order differs (atol
1e-4 on outputs of size ~10); float16 operands round the dequantized weight to
11 bits (relative error of the result ~1e-3, checked at 5e-3). bfloat16 is
checked on the GPU only (tests/test_gpu.py): the interpreter's float32-to-bfloat16
rounding differs from the hardware's.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (it ships for Linux alone)")

from bailong.nf4 import BLOCKSIZES, quantize
from bailong_kernels import dense_gemv as d, nf4_gemv as g, nf4_matmul as m
from bailong_kernels.nf4_dequant import nf4_dequantize
from bailong_kernels.nf4_matmul import nf4_matmul

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


def test_float16_and_leading_dimensions():
    check(2, 24, 1100, dtype=torch.float16)  # rows of W not whole blocks: dequantize, then matmul
    check(2, 24, 1280, dtype=torch.float16)  # the GEMV kernel
    check(20, 32, 96, dtype=torch.float16, lead=(2, 3))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("by_words", [False, True])
def test_dequantize_kernel_is_exact(double_quant, by_words):
    """Both kernels give the reference's bits (the word kernel: several programs, a partial last one, every
    blocksize); inside the tensors given, nothing read or written past them."""
    from bounds import checked_bounds
    cases = [((33, 130), 64), ((300, 256), 64)]  # the second: over 256 blocks, so several nested absmax
    if by_words:  # whole words: rows not whole blocks, a partial last program, one with 3 words, every blocksize
        cases += [((35, 104), 64), ((1, 8 * (2 * 128 + 3)), 64)] + [((2, b), b) for b in BLOCKSIZES]
    for shape, blocksize in cases:
        q = quantize(torch.randn(*shape, device=DEVICE), blocksize, double_quant)
        for dtype in [torch.float32, torch.float16]:
            with checked_bounds() if DEVICE == "cpu" else contextlib.nullcontext():
                assert torch.equal(nf4_dequantize(q, dtype, by_words=by_words), q.dequantize(dtype)), shape


@pytest.mark.parametrize("by_words", [False, True])
def test_weights_that_read_one_input_are_dequantized_in_one_launch(monkeypatch, by_words):
    """``nf4_dequantize_group``: q, k and v (different rows, one K, none a whole number of programs) as the rows
    of one matrix, the reference's bits, nothing written past it, in one launch of either kernel; and through
    ``nf4_matmul`` the outputs of one matmul, as three matmuls give them."""
    from bounds import checked_bounds
    from bailong_kernels import nf4_dequant
    from bailong_kernels.nf4_matmul import nf4_matmul
    launches = []

    class Counted:  # kernel[grid](...), counted
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]
    for name in ["_nf4_dequant_kernel", "_nf4_dequant_words_kernel"]:
        monkeypatch.setattr(nf4_dequant, name, Counted(getattr(nf4_dequant, name)))
    torch.manual_seed(0)
    qkv = tuple(quantize(torch.randn(n, 192, device=DEVICE)) for n in (40, 24, 24))
    with checked_bounds() if DEVICE == "cpu" else contextlib.nullcontext():
        w = nf4_dequant.nf4_dequantize_group(qkv, torch.float32, by_words=by_words).view(-1, 192)
    assert torch.equal(w, torch.cat([q.dequantize(torch.float32) for q in qkv]))
    assert len(launches) == 1
    x = torch.randn(2, 5, 192, device=DEVICE)
    ys = nf4_matmul(x, qkv)
    assert len({y.untyped_storage().data_ptr() for y in ys}) == 1  # views of one output
    for y, q in zip(ys, qkv):
        torch.testing.assert_close(y, nf4_matmul(x, q), rtol=1e-5, atol=1e-5)
    assert [y.shape for y in nf4_matmul(x[:, :0], qkv)] == [(2, 0, q.shape[0]) for q in qkv]  # no tokens


def test_dequantize_word_kernel_takes_whole_words_only(monkeypatch):
    """The word kernel runs where the packed bytes read as int32 words of 8 weights (by default), else the byte
    kernel; ``by_words=False`` asks for the byte kernel."""
    from bailong_kernels import nf4_dequant
    ran = []

    class Recording:  # kernel[grid](...), noting which kernel
        def __init__(self, name):
            self.name, self.kernel = name, getattr(nf4_dequant, name)

        def __getitem__(self, grid):
            ran.append(self.name)
            return self.kernel[grid]
    for name in ["_nf4_dequant_kernel", "_nf4_dequant_words_kernel"]:
        monkeypatch.setattr(nf4_dequant, name, Recording(name))
    whole, odd = quantize(torch.randn(4, 64, device=DEVICE)), quantize(torch.randn(3, 5, device=DEVICE))
    shifted = quantize(torch.randn(4, 64, device=DEVICE))
    shifted.data = torch.cat([torch.zeros(2, 1, dtype=torch.uint8, device=DEVICE), shifted.data])[2:]  # offset 2
    for q in [whole, odd, shifted]:
        assert torch.equal(nf4_dequantize(q, torch.float32, by_words=True), q.dequantize(torch.float32))
    for by_words in (None, False):  # BY_WORDS: on
        assert torch.equal(nf4_dequantize(whole, torch.float32, by_words), whole.dequantize(torch.float32))
    assert ran == ["_nf4_dequant_words_kernel", "_nf4_dequant_kernel", "_nf4_dequant_kernel",
                   "_nf4_dequant_words_kernel", "_nf4_dequant_kernel"]


def test_a_weight_made_of_strided_views_is_read_as_its_values():
    """The kernels read each of a weight's tensors as one flat array: packed bytes with a row stride of 2 (a view
    into a wider tensor) were dequantized 6.8 apart from their values; an NF4Tensor keeps each tensor whole."""
    import dataclasses
    torch.manual_seed(0)
    q = quantize(torch.randn(8, 64, device=DEVICE))
    wide = torch.zeros(q.data.shape[0], 2, dtype=torch.uint8, device=DEVICE)
    wide[:, :1] = q.data
    strided = dataclasses.replace(q, data=wide[:, :1])
    assert strided.data.is_contiguous() and torch.equal(strided.data, q.data)
    assert torch.equal(nf4_dequantize(strided, torch.float32), q.dequantize(torch.float32))
    x = torch.randn(6, 64, device=DEVICE)
    assert torch.equal(nf4_matmul(x, strided), nf4_matmul(x, q))


@pytest.mark.parametrize("M", [1, 2, 5, 16])
def test_every_gemv_tile_under_the_interpreter(M):
    """The GPU's tiles (up to 1024 columns a step, 16 rows of W), not only the interpreter's small one."""
    from bounds import checked_bounds
    torch.manual_seed(M)
    for N, K, blocksize in [(37, 1536, 64), (20, 1024, 256)]:  # K past one tile and not a whole number of them
        q = quantize(torch.randn(N, K), blocksize)
        x = torch.randn(M, K)
        ref = x @ q.dequantize().T
        for tile in g.gemv_tiles(M):
            with checked_bounds():
                y = g.gemv(x, q, tile)
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_the_at_end_loop_on_every_blocksize(blocksize, double_quant):
    """The loop that sums across threads once at the end: chunks of 4 words in blocks of 32 to 4096 weights, a
    step within one block or over several, K a whole number of steps or not, shorter than a step, rows of W past
    a whole number of tiles."""
    from bounds import checked_bounds
    torch.manual_seed(blocksize)
    for K in [2 * blocksize] + [1536] * (1536 % blocksize == 0):
        q = quantize(torch.randn(19 if blocksize <= 256 else 5, K), blocksize, double_quant)
        for M in [1, 3]:
            x = torch.randn(M, K)
            for tile in [(2, 512, 1, True), (1, 256, 2, True), (4, 2048, 1, True)]:
                with checked_bounds():  # the loop masks nothing but a partial last step
                    y = g.gemv(x, q, tile)
                torch.testing.assert_close(y, x @ q.dequantize().T, atol=1e-4, rtol=1e-4, msg=f"K={K} M={M} {tile}")


def test_the_at_end_loop_at_its_edges():
    """One chunk a step (K = 32), 16 rows of x (which gemv_tiles leaves out, but gemv takes), and a partial last
    step over a block of 1024."""
    from bounds import checked_bounds
    torch.manual_seed(0)
    for N, K, blocksize, M, tile in [(5, 32, 32, 2, (1, 512, 1, True)), (3, 64, 32, 16, (1, 512, 1, True)),
                                     (3, 3072, 1024, 1, (1, 2048, 1, True))]:
        q = quantize(torch.randn(N, K), blocksize)
        x = torch.randn(M, K)
        with checked_bounds():
            y = g.gemv(x, q, tile)
        torch.testing.assert_close(y, x @ q.dequantize().T, atol=1e-4, rtol=1e-4, msg=f"K={K} M={M}")


@pytest.mark.parametrize("M", [1, 3])
def test_the_at_end_loop_reads_bfloat16_x_as_pairs(M, monkeypatch):
    """bf16 x is read two values an int32 and widened by moving bits (a bf16 is a float32's upper half): whole
    steps and a masked partial last one, against float32 on the same bits; x that starts between two int32s
    (a view 2 bytes into its storage, which a GPU would fault on) is copied first."""
    from bounds import checked_bounds
    torch.manual_seed(M)
    q = quantize(torch.randn(19, 320))
    x = torch.randn(M, 320).bfloat16()
    shifted = torch.cat([torch.zeros(1, dtype=torch.bfloat16), x.view(-1)])[1:].view(M, 320)  # offset 2 bytes
    assert shifted.is_contiguous() and shifted.data_ptr() % 4 == 2
    launched = []

    class Recording:  # kernel[grid](x, ...), noting x's alignment
        def __getitem__(self, grid):
            return lambda x2d, *args, **meta: launched.append(x2d.data_ptr() % 4) or kernel[grid](x2d, *args, **meta)
    kernel = g._nf4_gemv_kernel
    monkeypatch.setattr(g, "_nf4_gemv_kernel", Recording())
    for tile in [(2, 128, 1, True), (1, 256, 2, True)]:  # 2 whole steps and half a step; 1 and a quarter
        for x_in in [x, shifted]:
            with checked_bounds():
                y = g.gemv(x_in, q, tile)
            assert y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), x.float() @ q.dequantize().T, atol=1e-2, rtol=1e-2, msg=str(tile))
    assert launched == [0, 0, 0, 0]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # float16 SiLU of a large negative: 0, rightly
@pytest.mark.parametrize("tiles", ["each step", "at end", "the GPU's"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_projections_that_read_the_same_x_in_one_launch(tiles, dtype, monkeypatch):
    """q, k, v (GQA: k and v narrower) in one launch; gate and up with SwiGLU on the way out; o with the residual
    added on the way out; against the model's PyTorch code on the dequantized weights. Small tiles of both loops,
    and the tiles a GPU runs (interpreted, the model runs small ones), over more than one of their steps of K."""
    torch.manual_seed(0)
    K = 512 if tiles != "the GPU's" else 4096 + 512
    q, k, v = (quantize(torch.randn(n, K)) for n in (40, 24, 24))
    gate, up = quantize(torch.randn(44, K)), quantize(torch.randn(44, K))
    from bounds import checked_bounds
    for M in [1, 2, 4]:
        with monkeypatch.context() as gpu:
            gpu.setenv("TRITON_INTERPRET", "0")  # (read by gemv_tile only; the kernels stay interpreted)
            tile = {"each step": (2, 256, 1, False), "at end": (2, 256, 1, True)}.get(tiles) or g.gemv_tile(M)
        x = torch.randn(M, K, dtype=dtype)
        residual = torch.randn(M, 40, dtype=dtype) * 10
        with checked_bounds():
            outs = g.gemv_group(x, [q, k, v], tile)
            gated_out = g.gemv_swiglu(x, gate, up, tile)
            added = g.gemv(x, q, tile, residual=residual)
        expected = residual + F.linear(x, q.dequantize(dtype))  # the product rounded, then the sum
        torch.testing.assert_close(added / expected.abs().max(), expected / expected.abs().max(), **TOL[dtype])
        for out, w in zip(outs, (q, k, v)):
            ref = F.linear(x, w.dequantize(dtype))
            scale = ref.abs().max()
            torch.testing.assert_close(out / scale, ref / scale, **TOL[dtype])
        gated = F.silu(F.linear(x, gate.dequantize(dtype))) * F.linear(x, up.dequantize(dtype))
        scale = gated.abs().max()
        torch.testing.assert_close(gated_out / scale, gated / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_dense_loop(dtype):
    """A dense weight (the decoding step of a bf16 model, and the head), read as int32 pairs: at one row of x
    every tile the benchmark tries; K a whole number of steps or not or shorter than a step, rows of W past a
    whole number of tiles, up to 16 rows of x; in one launch with another weight, with SwiGLU and with the
    residual on the way out. bf16 to 1e-2: the interpreter truncates float32 to bf16."""
    from bounds import checked_bounds
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else TOL[dtype]
    torch.manual_seed(0)
    for N, K in [(13, 1536), (5, 2056), (5, 40)]:
        w, u = torch.randn(N, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
        for M in [1, 3, 16]:
            x = torch.randn(M, K, dtype=dtype)
            ref = F.linear(x.float(), w.float())
            tiles = {1: d.dense_tiles(1) + [d.dense_tile(1)], 3: [d.dense_tile(3), (1, 512, 1, True),
                                                                  (1, 512, 1, False)]}  # the same loop
            for tile in tiles.get(M, [(1, 512, 1, True)]):
                with checked_bounds():
                    y = g.gemv(x, w, tile)
                torch.testing.assert_close(y.float() / ref.abs().max(), ref / ref.abs().max(), **tol,
                                           msg=f"N={N} K={K} M={M} {tile}")
            if M == 16:  # (slow interpreted)
                continue
            residual = torch.randn(M, N, dtype=dtype) * 10
            with checked_bounds():
                outs = g.gemv_group(x, [w, u[:7].contiguous()])
                added = g.gemv(x, w, residual=residual)
                gated = g.gemv_swiglu(x, w, u)
            up = F.linear(x.float(), u.float())
            for out, expected in [(outs[0], ref), (outs[1], up[:, :7]), (added, residual.float() + ref),
                                  (gated, F.silu(ref) * up)]:
                scale = expected.abs().max()
                torch.testing.assert_close(out.float() / scale, expected / scale, **tol, msg=f"N={N} K={K} M={M}")


def test_dense_weights_the_gemv_takes():
    """Up to GEMV_MAX_M rows of x (the decoding step's routing; ``gemv`` itself takes 16), and only weights the
    dense loop reads as it assumes."""
    x, w = torch.randn(4, 64, dtype=torch.float16), torch.randn(8, 64, dtype=torch.float16)
    assert g.GEMV_MAX_M == 4 and g.dense_takes(x, w) and g.dense_takes(x[:1], w)
    shifted = torch.cat([torch.zeros(1, dtype=w.dtype), w.view(-1)])[1:].view(8, 64)  # 2 bytes into its storage
    for x_, w_ in [(torch.randn(5, 64, dtype=x.dtype), w), (x, w.float()), (x.float(), w.float()),
                   (x[:, :36], w[:, :36].contiguous()), (x, w.t().contiguous().t()), (x, shifted)]:
        # 5 rows; dtypes that differ, float32; K % 8; not contiguous; 2 bytes into its storage
        assert not g.dense_takes(x_.contiguous(), w_)


def test_up_to_4_rows_take_the_gemv_kernel_more_take_cublas(monkeypatch):
    ran = []
    monkeypatch.setattr(m, "gemv", lambda x, q: ran.append("gemv") or x @ q.dequantize(x.dtype).T)
    monkeypatch.setattr(m, "dequant_matmul",
                        lambda x, q, keep=False: ran.append("dequant") or x @ q.dequantize(x.dtype).T)
    q = quantize(torch.randn(24, 128))
    for M in [1, 4, 5]:
        m.nf4_matmul_forward(torch.randn(M, 128), q)
    m.nf4_matmul_forward(torch.randn(1, 100), quantize(torch.randn(24, 100)))  # rows of W not whole blocks
    assert m.nf4_matmul_forward(torch.randn(0, 128), q).shape == (0, 24)  # no rows
    m.nf4_matmul_forward(torch.randn(1, 128, dtype=torch.float64), q)  # a dtype the GEMV does not read
    assert ran == ["gemv", "gemv", "dequant", "dequant", "dequant", "dequant"]


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


def test_the_launch_grids_helpers_are_tritons():
    import triton

    from bailong_kernels.nf4_dequant import cdiv, next_power_of_2
    for a in range(300):
        assert next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 2, 3, 64, 100):
            assert cdiv(a, b) == triton.cdiv(a, b)
