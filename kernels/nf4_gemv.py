"""The NF4 GEMV in Triton: y = x @ W.T for 1 to 16 rows of x (decoding), reading the 4-bit weight once
(``bailong_kernels.nf4_matmul`` chooses it or dequantize + cuBLAS); and the same for bf16 weights.

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

At M = 1 this loop issues too many instructions to be bound by memory: compiled
for sm_90 its body spends about 13 instructions a weight (the sums across
threads at every step, masks, the scale found for every word), while reading the
4-bit weights at an H200's bandwidth leaves room for about 4. The second loop,
``bailong_kernels.nf4_gemv_at_end`` (a tile's ``at_end``), gives each thread
chunks of 4 words of one block, sums across threads once at the end and takes
the codes by warp shuffles: 3.9-5.2 instructions a weight, the faster loop at 1
and 2 rows of x on an H200, so ``gemv_tile`` picks it there.

The same kernels take dense weights too (a tensor in x's dtype where an NF4Tensor
would go), for a bf16 model's decoding step and a bf16 head: the loop
``bailong_kernels.dense_gemv._dense_rows``.

Projections that read the same x run as one launch: ``gemv_group`` (q, k and v:
the kernel takes a tuple of weights, a program the rows of one of them) and
``gemv_swiglu`` (gate and up, a program the same rows of both, SwiGLU applied
before the store); ``gemv(..., residual=)`` adds the residual before the store
(o and down in the decoding step).
"""
import itertools
import os

import torch
import triton
import triton.language as tl

from bailong.nf4 import NF4Tensor
from bailong_kernels.dense_gemv import _dense_rows, dense_tile
from bailong_kernels.nf4_dequant import FMA, _block_scale, _pdl_start, _pdl_wait, cdiv, launch_device, nf4_args, \
    next_power_of_2, pdl_meta, readable_as_words
from bailong_kernels.nf4_gemv_at_end import _gemv_rows_at_end

SHUFFLES = True  # the at-end loop, compiled, takes each code from another lane's register, not from the L1 cache
GEMV_MAX_M = 4  # rows of x up to which the GEMV kernel runs (on an H200, faster than dequantize + cuBLAS up to 4)


def gemv_tiles(M=1):
    """Every (BLOCK_N, BLOCK_K, num_warps, at_end) the benchmark tries at M rows of x; ``gemv_tile`` picks among
    them. ``at_end``: the loop that sums across threads once at the end (``_gemv_rows_at_end``); its fewer
    instructions a weight may also beat dequantize + cuBLAS above 4 rows (GEMV_MAX_M moves only once timed)."""
    # each step: the winners of the last GPU sweep of twelve tiles and their neighbours (docs/BENCHMARKS.md)
    each_step = [(1, 512, 1), (1, 1024, 1), (1, 2048, 1), (1, 1024, 2), (2, 1024, 2), (4, 1024, 4)]
    # at end: a step's chunks (BLOCK_K / 32) at least one for every thread of every warp (BLOCK_K >= 1024 warps:
    # else Triton lays a program's rows of W, or a chunk's words, over the warps, but not x, and x moves between
    # threads through shared memory every step, bench/check_kernels_compile.py), at most 8 chunks x rows of x a
    # thread, and from 8 rows of x on one row of W a program (more spilled registers)
    # (2 and 4 rows of W a step of 4096: at K = 4096 a program asks for all its weights at once, more in flight)
    at_end = [(1, 1024, 1), (2, 1024, 1), (4, 1024, 1), (1, 2048, 1), (2, 2048, 1), (1, 2048, 2), (2, 2048, 2),
              (4, 2048, 2), (1, 4096, 4), (2, 4096, 4), (4, 4096, 4)]
    rows = next_power_of_2(M)
    return [(*t, False) for t in each_step] + [(*t, True) for t in at_end if rows * t[0] * t[1] <= 8192 * t[2]
                                               and (rows < 8 or t[0] == 1)]


def gemv_tile(M):
    """The tile ``gemv`` runs: the fastest at all three of Llama-2-7B's projection shapes in the last H200
    sweep (docs/BENCHMARKS.md): the at-end loop at 1 and 2 rows of x, the first loop from 3 rows (4 were timed)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 4, 64, 4, False  # interpreted: small, so that the tests run several programs and a partial last tile
    return {1: (4, 2048, 2, True), 2: (4, 1024, 1, True)}.get(M, (1, 2048, 1, False))


@triton.jit
def _nf4_tile_and_scale(w_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr, rn, word_id, N, K,
                        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The packed words W[rn, word_id] (int32, (BN, WORDS, 1)) and the float32 scale of each word's block."""
    words_per_row = K // 8
    ok = (rn < N) & (word_id < words_per_row)
    # a word a thread a load (a warp's 32 in a row: 128 bytes, coalesced), laid out over the threads as x's rows
    # of 8 are: else (two a thread) Triton converts between the layouts each step, the words (3.3 to 3.8) or
    # from 3.9 the 8 code addresses of each (64 shuffles, 128 selects a thread a step)
    words = tl.load(tl.max_contiguous(w_ptr + rn.to(tl.int64) * words_per_row + word_id, [1, 1, 1]), mask=ok,
                    other=0)
    scale = _block_scale(rn * (K // BLOCKSIZE) + word_id // (BLOCKSIZE // 8), ok, absmax_ptr, nested_map_ptr,
                         nested_absmax_ptr, offset_ptr, DOUBLE_QUANT)
    return words, scale


@triton.jit
def _gemv_rows(x_ptr, stride_xm, M, K, weight, n0, N, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AT_END: tl.constexpr,
               SHUFFLE: tl.constexpr, PDL: tl.constexpr):
    """x[:M] @ W[n0 : n0 + BLOCK_N].T in float32, (BLOCK_M, BLOCK_N), summed across threads at every step of K
    (``_gemv_rows_each_step``) or once at the end (``AT_END``: ``_gemv_rows_at_end``); for a dense ``weight``
    (one tensor: bf16 or fp16) ``_dense_rows``. ``PDL``: each loop asks for its first step's weights, then
    waits for the kernel before (``_pdl_wait``), then reads x."""
    if len(weight) == 1:
        return _dense_rows(x_ptr, stride_xm, M, K, weight[0], n0, N, BLOCK_M, BLOCK_N, BLOCK_K, PDL)
    elif AT_END:
        return _gemv_rows_at_end(x_ptr, stride_xm, M, K, weight, n0, N, BLOCKSIZE, DOUBLE_QUANT, BLOCK_M, BLOCK_N,
                                 BLOCK_K, SHUFFLE, PDL)
    else:
        return _gemv_rows_each_step(x_ptr, stride_xm, M, K, weight, n0, N, BLOCKSIZE, DOUBLE_QUANT, BLOCK_M,
                                    BLOCK_N, BLOCK_K, PDL)


@triton.jit
def _gemv_rows_each_step(x_ptr, stride_xm, M, K, weight, n0, N, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """x[:M] @ W[n0 : n0 + BLOCK_N].T in float32, (BLOCK_M, BLOCK_N), for ``weight`` = (packed words, code,
    absmax, nested map, nested absmax, offset) of N rows: the loop of the module docstring."""
    WORDS: tl.constexpr = BLOCK_K // 8
    rn = (n0 + tl.arange(0, BLOCK_N))[:, None, None]  # (BN, 1, 1)
    word = tl.arange(0, WORDS)[None, :, None]  # (1, WORDS, 1)
    j = tl.arange(0, 8)[None, None, :]  # (1, 1, 8)
    shift = 4 * (j ^ 1)  # bit of weight j in a little-endian int32 word (see above)
    rm = tl.arange(0, BLOCK_M)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr = weight
    args = (w_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr)
    words, scale = _nf4_tile_and_scale(*args, rn, word, N, K, BLOCKSIZE, DOUBLE_QUANT)
    _pdl_wait(PDL)  # x is the kernel before's output
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
    return acc


@triton.jit
def _nf4_gemv_kernel(x_ptr, weights, rows, y_ptr, r_ptr, M, K, stride_xm, stride_ym, BLOCKSIZE: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     AT_END: tl.constexpr, SHUFFLE: tl.constexpr, PDL: tl.constexpr):
    """y[:, c_g : c_g + N_g] = x @ W_g.T for each weight g of ``weights`` (a tuple: one launch for all), where
    ``rows`` = (0, N_0, N_0 + N_1, ...) gives both c_g and N_g; a program takes BLOCK_N rows of one weight.
    With ``r_ptr`` (one weight only), y = r + x @ W.T: the residual added on the way out."""
    _pdl_start(PDL)
    if len(weights) == 1:  # no branch to take
        _gemv_store(x_ptr, stride_xm, M, K, weights[0], tl.program_id(0) * BLOCK_N, rows[1], y_ptr, r_ptr,
                    stride_ym, BLOCKSIZE, DOUBLE_QUANT, BLOCK_M, BLOCK_N, BLOCK_K, AT_END, SHUFFLE, PDL)
    else:
        first = 0  # the first program of weight g
        for g in tl.static_range(len(weights)):
            N = rows[g + 1] - rows[g]
            n0 = (tl.program_id(0) - first) * BLOCK_N
            if (n0 >= 0) & (n0 < N):
                _gemv_store(x_ptr, stride_xm, M, K, weights[g], n0, N, y_ptr + rows[g], None, stride_ym,
                            BLOCKSIZE, DOUBLE_QUANT, BLOCK_M, BLOCK_N, BLOCK_K, AT_END, SHUFFLE, PDL)
            first += tl.cdiv(N, BLOCK_N)


@triton.jit
def _gemv_store(x_ptr, stride_xm, M, K, weight, n0, N, y_ptr, r_ptr, stride_ym, BLOCKSIZE: tl.constexpr,
                DOUBLE_QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                AT_END: tl.constexpr, SHUFFLE: tl.constexpr, PDL: tl.constexpr):
    """y[:M, n0 : n0 + BLOCK_N] = x[:M] @ W[n0 : n0 + BLOCK_N].T (+ r, laid out as y, where given)."""
    acc = _gemv_rows(x_ptr, stride_xm, M, K, weight, n0, N, BLOCKSIZE, DOUBLE_QUANT, BLOCK_M, BLOCK_N, BLOCK_K,
                     AT_END, SHUFFLE, PDL)
    rm, rn = tl.arange(0, BLOCK_M)[:, None], n0 + tl.arange(0, BLOCK_N)[None, :]
    ok = (rm < M) & (rn < N)
    if r_ptr is not None:  # the product rounded to y's dtype first, as F.linear's is, then the sum rounded
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(r_ptr + rm * stride_ym + rn, mask=ok)
    tl.store(y_ptr + rm * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nf4_gemv_swiglu_kernel(x_ptr, gate, up, y_ptr, M, N, K, stride_xm, stride_ym, BLOCKSIZE: tl.constexpr,
                            DOUBLE_QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, AT_END: tl.constexpr, SHUFFLE: tl.constexpr,
                            PDL: tl.constexpr):
    """y = silu(x @ W_gate.T) * (x @ W_up.T): a program takes the same BLOCK_N rows of both weights."""
    _pdl_start(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    dtype = y_ptr.dtype.element_ty
    # each product rounded to x's dtype, and silu's result too, as F.linear and F.silu return them; with PDL
    # gate's rows wait for the kernel before, so up's need not
    g = _gemv_rows(x_ptr, stride_xm, M, K, gate, n0, N, BLOCKSIZE, DOUBLE_QUANT, BLOCK_M, BLOCK_N, BLOCK_K, AT_END,
                   SHUFFLE, PDL)
    g = g.to(dtype).to(tl.float32)
    u = _gemv_rows(x_ptr, stride_xm, M, K, up, n0, N, BLOCKSIZE, DOUBLE_QUANT, BLOCK_M, BLOCK_N, BLOCK_K, AT_END,
                   SHUFFLE, False)
    silu = (g / (1 + tl.exp(-g))).to(dtype).to(tl.float32)
    rm, rn = tl.arange(0, BLOCK_M)[:, None], n0 + tl.arange(0, BLOCK_N)[None, :]
    tl.store(y_ptr + rm * stride_ym + rn, (silu * u.to(dtype).to(tl.float32)).to(dtype), mask=(rm < M) & (rn < N))


def gemv_takes(x2d, q: NF4Tensor) -> bool:
    """Whether the GEMV kernel runs ``x2d @ W.T``: 1 to GEMV_MAX_M rows of x in a dtype its loops read (the at-end
    loop reads any but float32 as 16-bit pairs), rows of W of whole blocks and its bytes readable as int32 words."""
    return (0 < x2d.shape[0] <= GEMV_MAX_M and x2d.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and x2d.shape[1] % q.blocksize == 0 and readable_as_words(q))


def dense_takes(x2d, w: torch.Tensor, rows=GEMV_MAX_M) -> bool:
    """Whether the GEMV kernel takes ``x2d @ w.T`` for a dense w (``_dense_rows``): 1 to ``rows`` rows of x (the
    decoding step's GEMV_MAX_M by default), w bf16 or fp16 in x's dtype, 2-D, contiguous, its rows a non-zero
    multiple of 8 values and its first value at a multiple of 16 bytes."""
    return (0 < x2d.shape[0] <= rows and w.dim() == 2 and w.is_contiguous() and w.dtype == x2d.dtype
            and w.dtype in (torch.bfloat16, torch.float16)
            and w.shape[1] == x2d.shape[1] and w.shape[1] >= 8 and w.shape[1] % 8 == 0 and w.data_ptr() % 16 == 0)


def _aligned(x2d):
    """x2d contiguous, its first value at a multiple of 4 bytes: the at-end and dense loops read 16-bit x as int32
    pairs."""
    x2d = x2d.contiguous()
    return x2d.clone() if x2d.data_ptr() % 4 else x2d


def _gemv_weights(x2d, qs):
    """The kernels' tuple of weight arguments for ``qs`` (NF4, or dense: ``dense_takes``), and their shared
    meta-parameters."""
    M, K = x2d.shape
    if not isinstance(qs[0], NF4Tensor):
        assert all(dense_takes(x2d, w, rows=16) for w in qs)
        return tuple((w,) for w in qs), dict(BLOCKSIZE=8, DOUBLE_QUANT=False, BLOCK_M=next_power_of_2(M))
    assert M <= 16 and all(q.shape[1] == K and K % q.blocksize == 0 for q in qs)
    assert len({(q.blocksize, q.double_quant) for q in qs}) == 1, "one launch takes weights quantized alike"
    weights = []
    for q in qs:
        packed, *tables = nf4_args(q)
        weights.append((packed.view(-1).view(torch.int32), *tables))
    meta = dict(BLOCKSIZE=qs[0].blocksize, DOUBLE_QUANT=qs[0].double_quant, BLOCK_M=next_power_of_2(M))
    return tuple(weights), meta


def _tile_meta(M, K, w, tile=None):
    """``tile`` (default: ``gemv_tile(M)``, or ``dense_tile(M)`` where w is dense) as the kernels'
    meta-parameters; the at-end loop and the dense one step over at most K columns."""
    nf4 = isinstance(w, NF4Tensor)
    block_n, block_k, warps, at_end = tile or (gemv_tile(M) if nf4 else dense_tile(M))
    if at_end or not nf4:  # (the dense loop ends at the end whatever the tile says)
        block_k = min(block_k, 1 << (K.bit_length() - 1))
    shuffle = nf4 and at_end and SHUFFLES and os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter runs no PTX
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, AT_END=at_end, SHUFFLE=shuffle, num_warps=warps)


def gemv_group(x2d, qs, tile=None, residual=None):
    """(x2d @ W.T for W in ``qs``), weights that read the same x (q, k, v), in one launch: (M, N_g) views of one
    (M, sum of N) output. For M <= 16 and rows of W of whole blocks; ``tile`` (BLOCK_N, BLOCK_K, num_warps,
    at_end) overrides ``gemv_tile``'s. ``residual`` (M, N), one weight only: ``residual + x2d @ W.T``."""
    M = x2d.shape[0]
    x2d = _aligned(x2d)
    weights, meta = _gemv_weights(x2d, qs)
    rows = tuple(itertools.accumulate((q.shape[0] for q in qs), initial=0))
    y = torch.empty((M, rows[-1]), device=x2d.device, dtype=x2d.dtype)
    if residual is not None:
        assert len(qs) == 1 and residual.shape == y.shape and residual.dtype == y.dtype
        residual = residual.contiguous()  # laid out as y
    meta |= _tile_meta(M, x2d.shape[1], qs[0], tile) | pdl_meta(x2d)
    with launch_device(x2d):
        _nf4_gemv_kernel[(sum(cdiv(q.shape[0], meta["BLOCK_N"]) for q in qs),)](
            x2d, weights, rows, y, residual, M, x2d.shape[1], x2d.stride(0), y.stride(0), **meta, **FMA)
    return tuple(y[:, a:b] for a, b in itertools.pairwise(rows))


def gemv(x2d, q: NF4Tensor, tile=None, residual=None):
    """(M, K) @ W.T (+ ``residual``) -> (M, N) in x's dtype by the GEMV kernel (``gemv_group`` of one weight)."""
    return gemv_group(x2d, [q], tile, residual)[0]


def gemv_swiglu(x2d, gate: NF4Tensor, up: NF4Tensor, tile=None):
    """``F.silu(x2d @ W_gate.T) * (x2d @ W_up.T)`` in one launch, for M <= 16 and rows of W of whole blocks."""
    assert gate.shape == up.shape
    M, N = x2d.shape[0], gate.shape[0]
    x2d = _aligned(x2d)
    (gate_args, up_args), meta = _gemv_weights(x2d, [gate, up])
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    meta |= _tile_meta(M, x2d.shape[1], gate, tile) | pdl_meta(x2d)
    with launch_device(x2d):
        _nf4_gemv_swiglu_kernel[(cdiv(N, meta["BLOCK_N"]),)](
            x2d, gate_args, up_args, y, M, N, x2d.shape[1], x2d.stride(0), y.stride(0), **meta, **FMA)
    return y
