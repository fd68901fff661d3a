"""The GEMV's loop for dense weights: y = x @ W.T for 1 to 16 rows of x and a W (N, K) in x's dtype, bf16
or fp16. The NF4 GEMV's kernels (``bailong_kernels.nf4_gemv``) run it where a tensor stands in for an NF4
weight (``nf4_gemv.dense_takes``), in the decoding step with the fused kernels: a bf16 model's projections (q,
k, v in one launch, gate and up with SwiGLU on the way out, o and down with the residual) and a bf16 head,
which an NF4 model keeps too.

    for each tile of BLOCK_N rows of W              (one program; all of K)
        for k0 in 0, BLOCK_K, 2 BLOCK_K, ... < K:
            w    = W[rows, k0 : k0 + BLOCK_K]          # a thread: 8 consecutive weights of a row, 16 bytes
            acc += sum over the thread's 8 of w * x[:, k0 : k0 + BLOCK_K]    # one float per 8 weights
        y[:, rows] = sum of acc across the threads    # once, at the end

It is the NF4 GEMV's at-end loop without codes or scales; the weights and x are
read as int32 pairs, bf16 widened by moving bits (a bf16 is a float32's upper
half), fp16 converted. Its loads are shaped, as the at-end loop's, so that every
Triton keeps each value in its thread (``nf4_gemv_at_end``; with W read as
(BN, BK/8, 4), Triton 3.3 to 3.6 moved x through shared memory every step at
two or more rows of W a program). Compiled for sm_90 at one row of x, under 3.6
and 3.9 alike: 3.6-5.8 instructions a weight, where reading bf16 at an H200's
copy rate leaves room for about 15, so it can be bound by memory (at 2 rows
6.6, at 4 rows 11.2; from 8 rows on it would not be, and the decoding step
leaves more than 4 to cuBLAS). cuBLAS's own bf16 GEMV is already near the
card's bandwidth at these shapes (docs/BENCHMARKS.md): what this loop brings is
fewer launches, the epilogues above, not a faster product. On an H200 (as
Triton 3.6 compiled it then: through shared memory at 2 or more rows of W) its
best tile at each shape ran at 0.79-1.16x cuBLAS's time, but the best differs
from shape to shape at 1 and 2 rows of x, and the sweep printed only each
shape's winner: ``dense_tile`` keeps its first guess there (1.06-1.24x cuBLAS's
time) and takes the tile that won at all four shapes from 3 rows on. The fused
decoding step (the default on CUDA) runs the loop.
"""
import os

import triton
import triton.language as tl

from bailong_kernels.nf4_dequant import _pdl_wait, next_power_of_2


def dense_tiles(M=1):
    """The (BLOCK_N, BLOCK_K, num_warps, True) the benchmark tries for a dense weight at M rows of x: at most 32
    accumulators a thread, as the at-end loop's."""
    tiles = [(1, 512, 1), (2, 512, 1), (1, 1024, 2), (2, 1024, 2), (1, 1024, 4), (2, 1024, 4), (4, 1024, 4),
             (1, 2048, 4), (2, 2048, 8)]
    rows = next_power_of_2(M)
    return [(*t, True) for t in tiles if rows * t[0] * t[1] <= 8192 * t[2]]


def dense_tile(M):
    """The tile ``gemv`` runs for a dense weight: from 3 rows of x the winner at all four shapes of the last H200
    sweep (4 rows timed); at 1 and 2, where the winners differ, the first guess (2 rows of W a program, 4 warps, 16
    bytes of each row a thread a step)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 4, 64, 4, True  # interpreted: small, so that the tests run several programs and a partial last step
    return (2, 1024, 4, True) if M <= 2 else (1, 512, 1, True)


@triton.jit
def _widen_bf16(pairs):
    """Two bf16 values read as one int32 -> both as float32, (first, second): a bf16 is a float32's upper half,
    so one shift or one mask widens it."""
    return (pairs << 16).to(tl.float32, bitcast=True), (pairs & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _halves(ptr, pair, mask, MASKED: tl.constexpr):
    """The values at ptr + 2 pair and ptr + 2 pair + 1 (pair: offsets of value pairs) as two float32 tensors
    laid out as pair, for 16-bit values read as int32 pairs: bf16 widened by one shift or one mask (a bf16 is a
    float32's upper half), fp16 by a conversion of each half."""
    at = ptr.to(tl.pointer_type(tl.int32)) + pair
    pairs = tl.load(at, mask=mask, other=0) if MASKED else tl.load(at)
    if ptr.dtype.element_ty == tl.bfloat16:
        return _widen_bf16(pairs)
    else:
        lo, hi = pairs.to(tl.int16), (pairs >> 16).to(tl.int16)
        return lo.to(tl.float16, bitcast=True).to(tl.float32), hi.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _add_dense(acc, w_lo, w_hi, x_ptr, stride_xm, M, pair, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, MASKED: tl.constexpr):
    """acc (BM, BN, BK/8) plus, for each row m of x, the sums of w (BN, BK/2 pairs, as its two halves) times
    x[m] over the 8 weights a thread holds; rows of x past M are read (as row M - 1) but never stored."""
    rm = tl.arange(0, BLOCK_M)[:, None, None]  # (BM, 1, 1)
    w_lo, w_hi = tl.reshape(w_lo, (BLOCK_N, BLOCK_K // 8, 4)), tl.reshape(w_hi, (BLOCK_N, BLOCK_K // 8, 4))
    for m in tl.static_range(BLOCK_M):
        x_lo, x_hi = _halves(x_ptr + tl.minimum(m, M - 1) * stride_xm, pair, 2 * pair < K, MASKED)
        acc += tl.where(rm == m, tl.sum(w_lo * x_lo + w_hi * x_hi, axis=2)[None], 0.0)
    return acc


@triton.jit
def _dense_rows(x_ptr, stride_xm, M, K, w_ptr, n0, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """x[:M] @ W[n0 : n0 + BLOCK_N].T in float32, (BLOCK_M, BLOCK_N), for a dense W (N, K), K a multiple of 8:
    the at-end loop without codes or scales. A thread takes 8 consecutive weights of a row (16 bytes in bf16: 4
    int32 pairs) and their x, and keeps the sum of their products, one float per 8 weights, across the loop;
    summed across threads once at the end. Whole steps mask nothing (rows past N repeat row N - 1, never stored;
    the next step's weights asked for ahead, the last step's again at the last); a partial last step is masked.
    Needs K >= BLOCK_K."""
    rn = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)[:, None]  # (BN, 1)
    # W's step read as (BN, BK/2) pairs, x's as (1, BK/8, 4): one axis in order in memory and at most one other of
    # more than one value each, so that every Triton gives a thread 8 weights of a row and their x (the docstring)
    w_pair = tl.arange(0, BLOCK_K // 2)[None, :]  # (1, BK/2)
    pair = 4 * tl.arange(0, BLOCK_K // 8)[None, :, None] + tl.arange(0, 4)[None, None, :]  # (1, BK/8, 4)
    row = w_ptr + rn.to(tl.int64) * tl.multiple_of(K, 8)  # (BN, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    whole = K - K % BLOCK_K  # the columns of whole steps
    w_lo, w_hi = _halves(row, w_pair, None, False)
    _pdl_wait(PDL)  # x is the kernel before's output (``_gemv_rows``)
    for k0 in range(0, whole, BLOCK_K):
        next_lo, next_hi = _halves(row + k0 + tl.where(k0 + BLOCK_K < whole, BLOCK_K, 0), w_pair, None, False)
        acc = _add_dense(acc, w_lo, w_hi, x_ptr + k0, stride_xm, M, pair, K - k0, BLOCK_M, BLOCK_N, BLOCK_K, False)
        w_lo, w_hi = next_lo, next_hi
    if whole < K:  # the last, partial step
        w_lo, w_hi = _halves(row + whole, w_pair, 2 * w_pair < K - whole, True)
        acc = _add_dense(acc, w_lo, w_hi, x_ptr + whole, stride_xm, M, pair, K - whole, BLOCK_M, BLOCK_N, BLOCK_K,
                         True)
    return tl.sum(acc, axis=2)
