"""The NF4 GEMV's second loop, ``_gemv_rows_at_end`` (a tile's ``at_end``): the kernels of
``bailong_kernels.nf4_gemv`` run it where ``gemv_tile`` says, in fewer instructions a weight than the first.

    for each tile of BLOCK_N rows of W                  (one program; all of K)
        for k0 in 0, BLOCK_K, 2 BLOCK_K, ... < K:       (whole steps; a partial last one masked)
            a thread: chunks of 4 consecutive words of a row (32 weights of one block: one 16-byte load, one scale)
            acc[chunk] += scale * sum of code[nibble] * x over the chunk's 32 weights     # in the thread
        y[:, rows] = sum of acc across the threads            # once, at the end

Each thread keeps one float per chunk across the loop, and only a partial last
step is masked. It takes each code not from memory but from a register of
another lane: lanes i and i + 16 of the warp hold code[i], and a shuffle
(``shfl.sync.idx``, in 16-lane segments) whose source lane is the nibble itself
copies it over, one instruction where a load costs four (mask, 64-bit address,
load); and it reads bf16 x two values an int32, widened to float32 by moving
bits. Compiled for sm_90 at one row of x: 4.1-5.3 instructions a weight (1 to 4
rows of W a thread), 6.8-8.1 with the codes from the L1 cache
(``nf4_gemv.SHUFFLES = False``), 13.2 for the first loop
(bench/check_kernels_compile.py counts them). The interpreter runs no PTX: there
it loads the codes. Timed on an H200 at Llama-2-7B's shapes it is the faster
loop at 1 and 2 rows of x (0.76-0.83x the first loop's best time at one row;
shuffled codes 2.1-2.5x faster than loaded ones), the first loop at 4
(docs/BENCHMARKS.md): ``gemv_tile`` picks so. Its rate at one row, about 1.1
TB/s of NF4, is still a quarter of a copy's; bench/bench_gemv_reads.py times it
against its own reads.
"""
import triton
import triton.language as tl

from bailong_kernels.dense_gemv import _widen_bf16
from bailong_kernels.nf4_dequant import _block_scale, _lane_codes, _pdl_wait, _word_codes


@triton.jit
def _split8(t, C: tl.constexpr):
    """The 8 columns of t (4, C, 8) as 8 tensors (4, C), each left in the thread that holds its row."""
    even, odd = tl.split(tl.reshape(t, (4, C, 4, 2)))  # columns 0 2 4 6 / 1 3 5 7
    c04, c26 = tl.split(tl.reshape(even, (4, C, 2, 2)))
    c15, c37 = tl.split(tl.reshape(odd, (4, C, 2, 2)))
    c0, c4 = tl.split(c04)
    c2, c6 = tl.split(c26)
    c1, c5 = tl.split(c15)
    c3, c7 = tl.split(c37)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _split4(t, C: tl.constexpr):
    """The 4 columns of t (4, C, 4) as 4 tensors (4, C), each left in the thread that holds its row."""
    even, odd = tl.split(tl.reshape(t, (4, C, 2, 2)))  # columns 0 2 / 1 3
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _word_dots(codes, x_ptr, k0, K, C: tl.constexpr, MASKED: tl.constexpr):
    """(BN, 4, C): for each word (r, c) of the step, word 4 c + r, the sum over its 8 weights j of codes[j]
    * x[k0 + 8 (4 c + r) + j]; x read as (4, C) rows of 8, each 16 bytes (bf16: 4 int32 pairs), so that a chunk
    c's 4 words and their x sit in one thread. ``MASKED``: x past K reads 0."""
    r, c = tl.arange(0, 4)[:, None, None], tl.arange(0, C)[None, :, None]
    if x_ptr.dtype.element_ty == tl.bfloat16:  # two values an int32: float32 is a bf16's bits, 16 places up
        k = k0 // 2 + (4 * c + r) * 4 + tl.arange(0, 4)[None, None, :]  # (4, C, 4) pairs
        if MASKED:
            pairs = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + k, mask=2 * k < K, other=0)
        else:
            pairs = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + k)
        p0, p1, p2, p3 = _split4(pairs, C)
        x0, x1 = _widen_bf16(p0)  # one pair at a time: Triton before 3.8 cannot parse nested tuple targets
        x2, x3 = _widen_bf16(p1)
        x4, x5 = _widen_bf16(p2)
        x6, x7 = _widen_bf16(p3)
    else:
        k = k0 + (4 * c + r) * 8 + tl.arange(0, 8)[None, None, :]  # (4, C, 8)
        if MASKED:
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        else:
            x = tl.load(x_ptr + k)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x.to(tl.float32), C)
    c0, c1, c2, c3, c4, c5, c6, c7 = codes
    dot = c0 * x0[None] + c1 * x1[None] + c2 * x2[None] + c3 * x3[None]
    return dot + c4 * x4[None] + c5 * x5[None] + c6 * x6[None] + c7 * x7[None]


@triton.jit
def _add_rows(acc, words, scale, table, code_ptr, x_ptr, stride_xm, M, k0, K, BLOCK_M: tl.constexpr,
              C: tl.constexpr, MASKED: tl.constexpr, SHUFFLE: tl.constexpr):
    """acc (BM, BN, C) plus, for each row m of x, the step's scaled chunk dots (each chunk's 4 word dots summed in
    its thread) in acc[m]; rows of x past M are read (as row M - 1) but never stored."""
    rm = tl.arange(0, BLOCK_M)[:, None, None]  # (BM, 1, 1)
    codes = _word_codes(words, table, code_ptr, SHUFFLE)  # once for every row of x
    for m in tl.static_range(BLOCK_M):
        dots = _word_dots(codes, x_ptr + tl.minimum(m, M - 1) * stride_xm, k0, K, C, MASKED)
        acc += tl.where(rm == m, tl.sum(dots * scale, axis=1)[None], 0.0)
    return acc


@triton.jit
def _gemv_rows_at_end(x_ptr, stride_xm, M, K, weight, n0, N, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SHUFFLE: tl.constexpr,
                      PDL: tl.constexpr):
    """``_gemv_rows_each_step`` in fewer instructions a weight: a thread takes chunks of 4 words (32 weights of
    one block) with their x, sums a chunk's products and scales them by the chunk's one scale, and keeps one
    float per chunk across the loop, summed across threads once at the end; the loop over whole steps of K
    masks nothing (rows past N repeat row N - 1 and are never stored; the next step's words are asked for
    ahead, the last step's again at the last); a partial last step is masked. ``SHUFFLE``: the codes by
    shuffles (``_code``). Needs K >= BLOCK_K >= 32."""
    C: tl.constexpr = BLOCK_K // 32  # chunks of 4 words (32 weights, within one block of 32 or more) a step
    rn = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)[:, None, None]  # (BN, 1, 1)
    # a chunk's 4 words in one thread (one 16-byte load: the words' axis is the one in order in memory), where
    # its x is (x's rows of 8 are laid out over the chunks, the 4 words of a chunk held by one thread): its scale
    # found once, and nothing moves between threads inside the loop
    r, c = tl.arange(0, 4)[None, :, None], tl.arange(0, C)[None, None, :]  # (1, 4, 1), (1, 1, C)
    w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr = weight
    row_words = tl.multiple_of(K // 8, 4)  # K is a whole number of blocks of 32 or more: 16-byte rows
    words_at = w_ptr + rn.to(tl.int64) * row_words + 4 * c + r  # (BN, 4, C): the first step's words
    blocks = rn * (K // BLOCKSIZE) + (32 * c) // BLOCKSIZE  # (BN, 1, C): the first step's chunks' blocks
    acc = tl.zeros((BLOCK_M, BLOCK_N, C), dtype=tl.float32)
    scales = (absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr)
    whole = K - K % BLOCK_K  # the columns of whole steps
    words = tl.load(words_at)
    table = _lane_codes(code_ptr, words) if SHUFFLE else None
    scale = _block_scale(blocks, None, *scales, DOUBLE_QUANT)
    _pdl_wait(PDL)  # x is the kernel before's output
    for k0 in range(0, whole, BLOCK_K):
        ahead = k0 + tl.where(k0 + BLOCK_K < whole, BLOCK_K, 0)  # the next whole step (the last: itself, cached)
        next_words = tl.load(words_at + ahead // 8)
        next_scale = _block_scale(blocks + ahead // BLOCKSIZE, None, *scales, DOUBLE_QUANT)
        acc = _add_rows(acc, words, scale, table, code_ptr, x_ptr, stride_xm, M, k0, K, BLOCK_M, C, False, SHUFFLE)
        words, scale = next_words, next_scale
    if whole < K:  # the last, partial step: whole chunks (K is a whole number of blocks)
        ok = whole // 32 + c < K // 32
        words = tl.load(words_at + whole // 8, mask=ok, other=0)
        scale = _block_scale(blocks + whole // BLOCKSIZE, ok, *scales, DOUBLE_QUANT)
        acc = _add_rows(acc, words, scale, table, code_ptr, x_ptr, stride_xm, M, whole, K, BLOCK_M, C, True, SHUFFLE)
    return tl.sum(acc, axis=2)
