"""Fused NF4 dequant-matmul in Triton: y = x @ W.T and dx = dy @ W, W stored in NF4.

The 4-bit weight is expanded tile by tile in registers, right before the tensor
cores use it; a bf16 copy of W never exists in memory.

Forward, y (M, N) = x (M, K) @ W.T, W (N, K), rows of W a whole number of blocks:

    for each output tile y[m0:m0+BM, n0:n0+BN]       (one program; SPLIT programs share it when M is small)
        acc = 0 (float32)
        for k0 in this program's share of K, step BK (BK <= blocksize, so one absmax per row):
            bytes = W_packed[n0:n0+BN, k0/2 : (k0+BK)/2]        # contiguous: BK/2 bytes a row
            w     = code[nibbles(bytes)]                         # (BN, BK/2, 2): both weights of a byte,
                                                                 #   in memory order: reshaped, W[:, k0:k0+BK]
            w     = w * absmax[n, block of k0]                   # one scale a row, double-quant expanded
            acc  += x[m0:m0+BM, k0:k0+BK] @ w.T                  # tl.dot on the tensor cores
        y tile = acc  (a float32 partial when K is split, summed and cast by one more kernel)

Decode (M = 1) is bound by reading W once and needs no tensor cores: a GEMV
kernel expands the same (BN, BK) tiles and multiply-adds them with x in
registers, K split across programs so that every SM streams part of W. Small M
(2..16) runs the tiled kernel with BM = 16 and K split the same way.

Backward, dx (M, K) = dy (M, N) @ W: the same tiles of W, summed over N instead
of K. W is frozen, so there is no weight gradient. A weight whose rows are not
whole blocks takes a generic path that expands every element from its flat index.

The other way: the dequantize kernel writes W in x's dtype, then cuBLAS
multiplies (always for float32 beyond the GEMV kernel: float32 tiles need an
IEEE dot, which compiles to heavy register spills). At large M the matmul's
time grows with M and the extra pass over W does not, and cuBLAS is hard to
beat at its own game; at small M the fused kernels read 4 bits per weight
instead of writing and reading 16. Which wins where depends on the GPU, so
``choose_way`` times both once per shape (M rounded up to a power of two) and
keeps the faster: never slower than the two passes, and the fused kernel
wherever it pays.

Reference: ``bailong.quantized.NF4Matmul`` (``F.linear`` on ``q.dequantize()``).
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from bailong.nf4 import NF4Tensor
from kernels.nf4_dequant import _block_scale, _nf4_values, launch_device, nf4_args, nf4_dequantize, nibbles


def matmul_configs():
    """Tiles for large M (training, prefill); BLOCK_K is set by the blocksize."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 3), (64, 128, 8, 4), (128, 64, 4, 4), (64, 64, 4, 4)]]


def small_m_configs():
    """Tiles for M = 2..16: narrow N tiles, K split so that every SM streams weights."""
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "GROUP_M": 1}, num_warps=w, num_stages=s)
            for bn, w, s in [(32, 4, 4), (64, 4, 4), (64, 4, 3), (32, 2, 4)]]


def gemv_configs():
    """Rows of W per program for M = 1 (decode at batch one)."""
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(16, 2, 4), (32, 4, 4), (64, 4, 3), (64, 8, 4)]]


def dx_configs():
    """Tiles for the input gradient (the backward of training)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3)]]


@triton.jit
def _tile_ids(M, N_cols, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), in groups of GROUP_M row tiles so that W tiles are reused from L2."""
    pid = tl.program_id(0)
    tiles_m, tiles_c = tl.cdiv(M, BLOCK_M), tl.cdiv(N_cols, BLOCK_C)
    group = pid // (GROUP_M * tiles_c)
    first_m = group * GROUP_M
    size = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * tiles_c)) % size, (pid % (GROUP_M * tiles_c)) // size


@triton.jit
def _nf4_tile(rn, k0, N, K, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
              BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rn, k0:k0+BLOCK_K] in float32, (BLOCK_N, BLOCK_K), for rows of whole blocks; 0 in rows past N."""
    row_ok = rn < N
    # rows start at multiples of 16 bytes (K is whole blocks of >= 32), tiles at multiples of BLOCK_K/2:
    # told so, the compiler loads each thread's bytes as one vector instead of byte by byte
    rows = tl.multiple_of(rn * (K // 2), 16)
    cols = tl.max_contiguous(tl.multiple_of(k0 // 2 + tl.arange(0, BLOCK_K // 2), BLOCK_K // 2), BLOCK_K // 2)
    packed = tl.load(w_ptr + rows[:, None] + cols[None, :],
                     mask=row_ok[:, None], other=0).to(tl.int32)  # (BN, BK/2)
    pair = tl.load(code_ptr + nibbles(packed[:, :, None]))  # (BN, BK/2, 2)
    scale = _block_scale(rn * (K // BLOCKSIZE) + k0 // BLOCKSIZE, row_ok, absmax_ptr, nested_map_ptr,
                         nested_absmax_ptr, offset_ptr, DOUBLE_QUANT)
    scale = tl.where(row_ok, scale, 0.0)  # (BN,)
    return tl.reshape(pair, (BLOCK_N, BLOCK_K)) * scale[:, None]


@triton.jit
def _nf4_matmul_kernel(x_ptr, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, y_ptr,
                       M, N, K, stride_xm, stride_xk, stride_ys, stride_ym, k_per_split, M_BUCKET,
                       BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, IEEE: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = tl.program_id(1) * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if ALIGNED:  # K is a whole number of tiles: no mask along K
            a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=rm[:, None] < M, other=0.0)
            w = _nf4_tile(rn, k0, N, K, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr,
                          offset_ptr, BLOCKSIZE, DOUBLE_QUANT, BLOCK_N, BLOCK_K)
        else:  # rows that are not whole blocks: expand every element from its flat index
            a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            w = _nf4_values(rn[:, None] * K + rk[None, :], (rn[:, None] < N) & (rk[None, :] < K), w_ptr, code_ptr,
                            absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, BLOCKSIZE, DOUBLE_QUANT)
        acc += tl.dot(a, tl.trans(w.to(a.dtype)), input_precision="ieee" if IEEE else "tf32")
    y = y_ptr + tl.program_id(1) * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _nf4_gemv_kernel(x_ptr, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, y_ptr,
                     N, K, k_per_split, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[split, n0:n0+BN] = W[n0:n0+BN, this split's K] @ x for one row x (rows of W whole blocks):
    multiply-adds in registers, each packed byte read once, one reduction at the end."""
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = tl.program_id(1) * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        x = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)  # (BK,)
        w = _nf4_tile(rn, k0, N, K, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                      BLOCKSIZE, DOUBLE_QUANT, BLOCK_N, BLOCK_K)
        acc += w * x[None, :]
    tl.store(y_ptr + tl.program_id(1) * N + rn, tl.sum(acc, axis=1), mask=rn < N)


@triton.jit
def _nf4_matmul_dx_kernel(dy_ptr, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                          dx_ptr, M, N, K, stride_dym, stride_dyn, stride_dxm, M_BUCKET,
                          BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, IEEE: tl.constexpr,
                          ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k0 = pid_k * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        g = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # dy[m, n]
        if ALIGNED:
            w = _nf4_tile(rn, k0, N, K, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr,
                          offset_ptr, BLOCKSIZE, DOUBLE_QUANT, BLOCK_N, BLOCK_K)
        else:
            w = _nf4_values(rn[:, None] * K + rk[None, :], (rn[:, None] < N) & (rk[None, :] < K), w_ptr, code_ptr,
                            absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, BLOCKSIZE, DOUBLE_QUANT)
        acc += tl.dot(g, w.to(g.dtype), input_precision="ieee" if IEEE else "tf32")
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _sum_splits_kernel(partial_ptr, y_ptr, splits, size, BLOCK: tl.constexpr):
    """y = partial.sum(0) in y's dtype, summed in float32: one kernel where torch takes two (sum, cast)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(partial_ptr + s * size + i, mask=i < size, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=i < size)


def _sum_splits(partial, dtype):
    """The float32 partial results of split K, (splits, M, N), summed into (M, N) of ``dtype``."""
    y = torch.empty(partial.shape[1:], device=partial.device, dtype=dtype)
    _sum_splits_kernel[(triton.cdiv(y.numel(), 1024),)](partial, y, partial.shape[0], y.numel(), BLOCK=1024)
    return y


_autotuned = {}
INTERPRETER_TILE = dict(BLOCK_M=16, BLOCK_N=16, GROUP_M=2)  # the one tile run under the interpreter


def _launch(kernel, configs_fn, grid, *args, **meta):
    """Autotune on a GPU (configs from a named function, keyed on the shapes and the weight's
    format); under the Triton interpreter run one small tile instead, since every trial would be
    interpreted."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        tile = {k: v for k, v in INTERPRETER_TILE.items() if k in kernel.arg_names}
        kernel[grid({**tile, **meta})](*args, **meta, **tile)
        return
    if (kernel, configs_fn) not in _autotuned:
        key = [k for k in ("M_BUCKET", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT", "ALIGNED") if k in kernel.arg_names]
        bench = lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)  # noqa: E731
        _autotuned[kernel, configs_fn] = triton.autotune(configs_fn(), key=key, do_bench=bench)(kernel)
    _autotuned[kernel, configs_fn][grid](*args, **meta)


def _meta(q: NF4Tensor, K, dtype):
    """Compile-time settings: the fast path needs rows of whole blocks, and BLOCK_K within one block."""
    aligned = K % q.blocksize == 0
    return dict(BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant, IEEE=dtype == torch.float32, ALIGNED=aligned,
                BLOCK_K=min(64, q.blocksize) if aligned else 32)


def _bucket(m):
    return min(triton.next_power_of_2(m), 8192)


def _fused_forward(x2d, q: NF4Tensor):
    M, K = x2d.shape
    N = q.shape[0]
    meta = _meta(q, K, x2d.dtype)
    if M <= 16:  # decode: split K so that enough programs stream the weight
        k_per_split = triton.cdiv(triton.cdiv(K, min(16, triton.cdiv(K, 512))), meta["BLOCK_K"]) * meta["BLOCK_K"]
        split = triton.cdiv(K, k_per_split)
        partial = torch.empty((split, M, N), device=x2d.device, dtype=torch.float32)
        if M == 1 and meta["ALIGNED"]:  # one row: multiply-adds in registers, no tensor cores
            _launch(_nf4_gemv_kernel, gemv_configs, lambda c: (triton.cdiv(N, c["BLOCK_N"]), split),
                    x2d.contiguous(), *nf4_args(q), partial, N, K, k_per_split, BLOCKSIZE=q.blocksize,
                    DOUBLE_QUANT=q.double_quant, BLOCK_K=meta["BLOCK_K"])
            return _sum_splits(partial, x2d.dtype)
        _launch(_nf4_matmul_kernel, small_m_configs,
                lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]), split),
                x2d, *nf4_args(q), partial, M, N, K, x2d.stride(0), x2d.stride(1), partial.stride(0), N,
                k_per_split, _bucket(M), **meta)
        return _sum_splits(partial, x2d.dtype)
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    _launch(_nf4_matmul_kernel, matmul_configs,
            lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]), 1),
            x2d, *nf4_args(q), y, M, N, K, x2d.stride(0), x2d.stride(1), 0, N, K, _bucket(M), **meta)
    return y


def _fused_backward(dy2d, q: NF4Tensor):
    M, N = dy2d.shape
    K = q.shape[1]
    dx = torch.empty((M, K), device=dy2d.device, dtype=dy2d.dtype)
    meta = _meta(q, K, dy2d.dtype)
    _launch(_nf4_matmul_dx_kernel, dx_configs,
            lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_K"]),),
            dy2d, *nf4_args(q), dx, M, N, K, dy2d.stride(0), dy2d.stride(1), dx.stride(0), _bucket(M), **meta)
    return dx


def _dequant_forward(x2d, q: NF4Tensor):
    return F.linear(x2d, nf4_dequantize(q, x2d.dtype))


def _dequant_backward(dy2d, q: NF4Tensor):
    return dy2d @ nf4_dequantize(q, dy2d.dtype)


FORWARD = {"fused": _fused_forward, "dequant": _dequant_forward}
BACKWARD = {"fused": _fused_backward, "dequant": _dequant_backward}
_fastest = {}  # (y or dx, N, K, M bucket, dtype, blocksize, double quant, device) -> the faster way's name


def _on_gpu(x):
    return x.is_cuda


def _capturing():
    return torch.cuda.is_current_stream_capturing()


def _time(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def choose_way(ways: dict, x2d, q: NF4Tensor) -> str:
    """Which of ``ways`` (FORWARD or BACKWARD) runs ``x2d`` against ``q``.

    On the CPU (the interpreter): the fused kernels, which the tests check. On a GPU: float32
    takes cuBLAS unless the GEMV kernel (no dot) can run, as float32 tiles need an IEEE dot that
    spills heavily; otherwise the faster way, timed the first time a shape is seen and
    remembered. A shape first met during CUDA graph capture, when nothing may be timed or
    autotuned, takes cuBLAS too.
    """
    if not _on_gpu(x2d):
        return "fused"
    M, K = x2d.shape
    gemv = ways is FORWARD and M == 1 and K % q.blocksize == 0
    if x2d.dtype == torch.float32 and not gemv:
        return "dequant"
    key = "y" if ways is FORWARD else "dx", *q.shape, _bucket(M), x2d.dtype, q.blocksize, q.double_quant, x2d.device
    if key not in _fastest:
        if _capturing():
            return "dequant"
        try:
            _fastest[key] = min(ways, key=lambda way: _time(lambda: ways[way](x2d, q)))
        except torch.cuda.OutOfMemoryError:  # timing needs room (do_bench flushes the L2 with 256 MB)
            _fastest[key] = "dequant"
    return _fastest[key]


def nf4_matmul_forward(x2d, q: NF4Tensor, way=None):
    """(M, K) @ W.T -> (M, N) in x's dtype: the fused kernel, or the dequantize kernel then cuBLAS
    (``way``: "fused" or "dequant"; by default ``choose_way``'s)."""
    return FORWARD[way or choose_way(FORWARD, x2d, q)](x2d, q)


def nf4_matmul_backward(dy2d, q: NF4Tensor, way=None):
    """(M, N) @ W -> (M, K) in dy's dtype, the same two ways as ``nf4_matmul_forward``."""
    return BACKWARD[way or choose_way(BACKWARD, dy2d, q)](dy2d, q)


class NF4MatmulKernel(torch.autograd.Function):
    """y = x @ W.T through the kernels (either way); the backward gives dx only and keeps just the packed W."""

    @staticmethod
    def forward(ctx, x, q: NF4Tensor):
        ctx.q = q
        with launch_device(x):  # autograd makes it the backward's current device itself
            y = nf4_matmul_forward(x.reshape(-1, x.shape[-1]), q)
        return y.view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        dx = nf4_matmul_backward(dy.reshape(-1, dy.shape[-1]), ctx.q)
        return dx.view(*dy.shape[:-1], ctx.q.shape[1]), None


def nf4_matmul(x, q: NF4Tensor):
    """``x @ W.T`` for ``q = bailong.nf4.quantize(W)``, any leading dimensions on x, with a gradient for x;
    under autocast computed in the autocast dtype, as ``F.linear`` is."""
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features; the weight expects {q.shape[1]}")
    if x.device != q.data.device:
        raise ValueError(f"x is on {x.device}, the weight on {q.data.device}")
    if torch.is_autocast_enabled(x.device.type):  # as F.linear does under autocast
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return NF4MatmulKernel.apply(x, q)
