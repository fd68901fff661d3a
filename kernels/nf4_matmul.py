"""NF4 matmul in Triton: y = x @ W.T for a frozen weight W stored in NF4 (bitsandbytes' layout).

Two ways, chosen by the number of rows M of x:

- M <= 4 (decoding): one GEMV kernel that streams the packed weight once and
  multiply-adds it with x in registers. Decoding is bound by reading the weights,
  and NF4 holds a weight in 4.13 bits instead of bf16's 16, so reading the 4-bit
  codes directly is up to ~3.9x less traffic than a bf16 matrix-vector product.
- M > 4 (prefill, training): the dequantize kernel writes W in x's dtype, then
  cuBLAS multiplies. There the matmul's time grows with M and the extra pass
  over W does not; a tiled dequant-in-the-loop kernel was 25x slower than this
  on an H200 and was removed (docs/BENCHMARKS.md).

The GEMV kernel, for W (N, K) whose rows are whole blocks:

    for each tile of BLOCK_N rows of W           (one program; all of K, so one launch and no partial sums)
        for k0 in 0, BLOCK_K, 2 BLOCK_K, ... < K:
            words = W_packed[rows, k0/8 : (k0+BLOCK_K)/8] as int32    # 8 weights a word: wide, coalesced loads
            w     = code[(words >> shift_j) & 15] * scale(block)       # (BLOCK_N, BLOCK_K/8, 8), j = 0..7
            acc  += w * x[:, k0 + 8 word + j]                          # every row of x, all in float32
        y[:, rows] = sum of acc over the words and j

A little-endian word holds bytes b0..b3 and a byte holds two weights, the first
in its high nibble, so weight j of a word sits at bit 4 * (j ^ 1): 4, 0, 12, 8,
20, 16, 28, 24. Keeping j as its own axis of x too (x is read as (M, BLOCK_K/8, 8))
means the weights never need to be put back in order: a dot product does not care.

Backward, dx = dy @ W: the dequantize kernel, then cuBLAS (W is frozen: no
weight gradient). Reference: ``bailong.quantized.NF4Matmul``.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bailong.nf4 import NF4Tensor
from bailong_kernels.nf4_dequant import _block_scale, launch_device, nf4_args, nf4_dequantize

GEMV_MAX_M = 4  # rows of x up to which the GEMV kernel runs (on an H200, faster than dequantize + cuBLAS up to 4)


def gemv_tiles():
    """Every (BLOCK_N, BLOCK_K, num_warps) the benchmark tries; ``gemv_tile`` picks among them."""
    return [(1, 512, 1), (1, 1024, 1), (1, 2048, 1), (2, 1024, 1), (2, 512, 1), (1, 1024, 2), (2, 1024, 2),
            (2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 512, 8), (8, 1024, 8)]


def gemv_tile(M):
    """The tile ``gemv`` runs: the fastest measured at Llama-2-7B's shapes on an H200 (docs/BENCHMARKS.md)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 4, 64, 4  # interpreted: small, so that the tests run several programs and a partial last tile
    return {1: (1, 1024, 1), 2: (1, 1024, 2)}.get(M, (4, 1024, 4))


@triton.jit
def _nf4_tile_and_scale(w_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, rn, word_id, N, K,
                        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The packed words W[rn, word_id] (int32, (BN, WORDS, 1)) and the float32 scale of each word's block."""
    words_per_row = K // 8
    ok = (rn < N) & (word_id < words_per_row)
    words = tl.load(w_ptr + rn.to(tl.int64) * words_per_row + word_id, mask=ok, other=0)
    scale = _block_scale(rn * (K // BLOCKSIZE) + word_id // (BLOCKSIZE // 8), ok, absmax_ptr, nested_map_ptr,
                         nested_absmax_ptr, offset_ptr, DOUBLE_QUANT)
    return words, scale


@triton.jit
def _nf4_gemv_kernel(x_ptr, w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, y_ptr,
                     M, N, K, stride_xm, stride_ym, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // 8
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None, None]  # (BN, 1, 1)
    word = tl.arange(0, WORDS)[None, :, None]  # (1, WORDS, 1)
    j = tl.arange(0, 8)[None, None, :]  # (1, 1, 8)
    shift = 4 * (j ^ 1)  # bit of weight j in a little-endian int32 word (see above)
    rm = tl.arange(0, BLOCK_M)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    args = (w_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr)
    words, scale = _nf4_tile_and_scale(*args, rn, word, N, K, BLOCKSIZE, DOUBLE_QUANT)
    for k0 in range(0, K, BLOCK_K):
        # ask for the next tile before using this one: two tiles in flight hide the memory latency
        next_words, next_scale = _nf4_tile_and_scale(*args, rn, (k0 + BLOCK_K) // 8 + word, N, K,
                                                     BLOCKSIZE, DOUBLE_QUANT)
        w = tl.load(code_ptr + ((words >> shift) & 0xF)) * scale  # (BN, WORDS, 8): W[rn, k0 + 8 word + j]
        k = k0 + 8 * word + j  # (1, WORDS, 8)
        for m in range(M):  # the tile is expanded once and used for every row of x
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            acc += tl.where(rm == m, tl.sum(tl.sum(w * x, axis=2), axis=1)[None, :], 0.0)
        words, scale = next_words, next_scale
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rm * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=(rm < M) & (rn[None, :] < N))


def gemv(x2d, q: NF4Tensor, tile=None):
    """(M, K) @ W.T -> (M, N) in x's dtype by the GEMV kernel, for M <= 16 and rows of W of whole blocks;
    ``tile`` (BLOCK_N, BLOCK_K, num_warps) overrides ``gemv_tile``'s."""
    M, K = x2d.shape
    N = q.shape[0]
    assert M <= 16 and K % q.blocksize == 0
    x2d = x2d.contiguous()
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    block_n, block_k, warps = tile or gemv_tile(M)
    packed, *tables = nf4_args(q)
    with launch_device(x2d):
        _nf4_gemv_kernel[(triton.cdiv(N, block_n),)](
            x2d, packed.view(-1).view(torch.int32), *tables, y, M, N, K, x2d.stride(0), y.stride(0),
            BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant, BLOCK_M=triton.next_power_of_2(M),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def dequant_matmul(x2d, q: NF4Tensor):
    """(M, K) @ W.T through the dequantize kernel and cuBLAS."""
    return F.linear(x2d, nf4_dequantize(q, x2d.dtype))


def nf4_matmul_forward(x2d, q: NF4Tensor):
    """(M, K) @ W.T -> (M, N) in x's dtype: the GEMV kernel for up to GEMV_MAX_M rows (rows of W of whole
    blocks, its bytes readable as int32 words), else the dequantize kernel and cuBLAS."""
    readable_as_words = q.data.is_contiguous() and q.data.storage_offset() % 4 == 0
    if 0 < x2d.shape[0] <= GEMV_MAX_M and x2d.shape[1] % q.blocksize == 0 and readable_as_words:
        return gemv(x2d, q)
    return dequant_matmul(x2d, q)


class NF4MatmulKernel(torch.autograd.Function):
    """y = x @ W.T through the kernels; the backward gives dx only and keeps just the packed W."""

    @staticmethod
    def forward(ctx, x, q: NF4Tensor):
        ctx.q = q
        with launch_device(x):  # autograd makes it the backward's current device itself
            y = nf4_matmul_forward(x.reshape(-1, x.shape[-1]), q)
        return y.view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        return dy @ nf4_dequantize(ctx.q, dy.dtype), None  # (..., N) @ (N, K)


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
