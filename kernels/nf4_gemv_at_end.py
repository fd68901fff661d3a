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
bits.

Nothing moves between threads inside the loop, under every Triton: each load
has one axis in order in memory and at most one other of more than one value
(the words as (BN, 4 C), the chunks' scales flat, x a word at a time as (1, C,
4)), so the lanes can only go over the chunks. Which axis the lanes go over is
Triton's choice, by the pointers' order in memory, and its tie-break between
two axes equally out of order changed between versions: with the words as (BN,
4, C), Triton 3.3 to 3.6 put the lanes over the rows of W and moved x and the
sums through shared memory every step (docs/BENCHMARKS.md, "The at-end and dense
loops laid out alike under every Triton"). Compiled for sm_90 at one row of x,
under 3.6 and 3.9 alike: 3.9-5.2 instructions a weight (4 to 1 rows of W a
thread), 6.7-7.9 with the codes from the L1 cache (``nf4_gemv.SHUFFLES =
False``), 12.7-13.2 for the first loop (bench/check_kernels_compile.py counts
them). The interpreter runs no PTX: there it loads the codes. Timed on an H200
at Llama-2-7B's shapes, compiled by 3.6 before the change above, it was the
faster loop at 1 and 2 rows of x (0.76-0.83x the first loop's best time at one
row; shuffled codes 2.1-2.5x faster than loaded ones), the first loop at 4:
``gemv_tile`` picks so. Its rate at one row then, about 1.1 TB/s of NF4, was a
quarter of a copy's; bench/bench_gemv_reads.py times it against its own reads.
"""
import triton
import triton.language as tl

from bailong_kernels.dense_gemv import _halves
from bailong_kernels.nf4_dequant import _block_scale, _lane_codes, _pdl_wait, _word_codes


@triton.jit
def _split4(t, A: tl.constexpr, B: tl.constexpr):
    """The 4 columns of t (A, B, 4) as 4 tensors (A, B), each left in the thread that holds its row."""
    even, odd = tl.split(tl.reshape(t, (A, B, 2, 2)))  # columns 0 2 / 1 3
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _step_addresses(w_ptr, n0, N, K, C: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """For rows n0 .. n0 + BLOCK_N - 1 of W (rows past N read row N - 1): the first step's word addresses (BN, 4
    C), a thread a chunk's 4 in one 16-byte load; and its chunks' blocks and chunk numbers, flat (BN C,: chunk c
    of row n at n C + c). Laid out so that under every Triton a chunk's words, x (``_word_x``) and scale fall in
    one thread (the module docstring)."""
    rn = tl.minimum(n0 + tl.arange(0, BLOCK_N), N - 1)  # (BN,)
    row_words = tl.multiple_of(K // 8, 4)  # K is a whole number of blocks of 32 or more: 16-byte rows
    words_at = w_ptr + rn.to(tl.int64)[:, None] * row_words + tl.arange(0, 4 * C)[None, :]  # (BN, 4C)
    flat = tl.arange(0, BLOCK_N * C)
    chunk = flat % C
    blocks = tl.minimum(n0 + flat // C, N - 1) * (K // BLOCKSIZE) + (32 * chunk) // BLOCKSIZE
    return words_at, blocks, chunk


@triton.jit
def _step_words(words_at, k0, K, C: tl.constexpr, MASKED: tl.constexpr):
    """The words (BN, 4 C) of the step from column k0 (``_step_addresses``); ``MASKED``: only whole chunks before
    K (K is a whole number of blocks), 0 past it."""
    if MASKED:
        return tl.load(words_at + k0 // 8, mask=k0 // 32 + tl.arange(0, 4 * C)[None, :] // 4 < K // 32, other=0)
    else:
        return tl.load(words_at + k0 // 8)


@triton.jit
def _word_x(x_ptr, k0, K, r: tl.constexpr, C: tl.constexpr, MASKED: tl.constexpr):
    """The x of word r of each chunk c of the step, x[k0 + 32 c + 8 r + j] for j = 0..7: 8 float32 tensors (1, C),
    each value in the thread that holds chunk c. Read 16 bytes a load as (1, C, 4): 16-bit x as 4 int32 pairs
    (``_halves``), float32 x in two loads of 4. ``MASKED``: x past K reads 0."""
    c, i = tl.arange(0, C)[None, :, None], tl.arange(0, 4)[None, None, :]  # (1, C, 1), (1, 1, 4)
    ok = k0 // 32 + c < K // 32  # whole chunks (K is a whole number of blocks)
    if x_ptr.dtype.element_ty == tl.float32:
        k = k0 + 32 * c + 8 * r + i
        if MASKED:
            a, b = tl.load(x_ptr + k, mask=ok, other=0.0), tl.load(x_ptr + k + 4, mask=ok, other=0.0)
        else:
            a, b = tl.load(x_ptr + k), tl.load(x_ptr + k + 4)
        a0, a1, a2, a3 = _split4(a, 1, C)
        b0, b1, b2, b3 = _split4(b, 1, C)
        return a0, a1, a2, a3, b0, b1, b2, b3
    else:
        lo, hi = _halves(x_ptr, k0 // 2 + 16 * c + 4 * r + i, ok, MASKED)  # x[2 pair], x[2 pair + 1]
        l0, l1, l2, l3 = _split4(lo, 1, C)
        h0, h1, h2, h3 = _split4(hi, 1, C)
        return l0, h0, l1, h1, l2, h2, l3, h3


@triton.jit
def _dot8(codes, x):
    """The sum over j of codes[j] * x[j], 8 of each."""
    c0, c1, c2, c3, c4, c5, c6, c7 = codes
    x0, x1, x2, x3, x4, x5, x6, x7 = x
    return c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3 + c4 * x4 + c5 * x5 + c6 * x6 + c7 * x7


@triton.jit
def _add_rows(acc, words, scale, table, code_ptr, x_ptr, stride_xm, M, k0, K, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, C: tl.constexpr, MASKED: tl.constexpr, SHUFFLE: tl.constexpr):
    """acc (BM, BN, C) plus, for each row m of x, each chunk's dot of the step (its 4 words' 8 weights each, in
    its thread) times the chunk's scale (flat: BN C) in acc[m]; rows of x past M are read (as row M - 1) but
    never stored."""
    rm = tl.arange(0, BLOCK_M)[:, None, None]  # (BM, 1, 1)
    scale = tl.reshape(scale, (BLOCK_N, C))
    w0, w1, w2, w3 = _split4(tl.reshape(words, (BLOCK_N, C, 4)), BLOCK_N, C)  # word r of each chunk: (BN, C)
    codes0 = _word_codes(w0, table, code_ptr, SHUFFLE)  # once for every row of x
    codes1 = _word_codes(w1, table, code_ptr, SHUFFLE)
    codes2 = _word_codes(w2, table, code_ptr, SHUFFLE)
    codes3 = _word_codes(w3, table, code_ptr, SHUFFLE)
    for m in tl.static_range(BLOCK_M):
        row = x_ptr + tl.minimum(m, M - 1) * stride_xm
        dots = _dot8(codes0, _word_x(row, k0, K, 0, C, MASKED)) + _dot8(codes1, _word_x(row, k0, K, 1, C, MASKED))
        dots += _dot8(codes2, _word_x(row, k0, K, 2, C, MASKED)) + _dot8(codes3, _word_x(row, k0, K, 3, C, MASKED))
        acc += tl.where(rm == m, (dots * scale)[None], 0.0)
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
    w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr = weight
    words_at, blocks, chunk = _step_addresses(w_ptr, n0, N, K, C, BLOCKSIZE, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N, C), dtype=tl.float32)
    scales = (absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr)
    whole = K - K % BLOCK_K  # the columns of whole steps
    words = _step_words(words_at, 0, K, C, False)
    table = None
    if SHUFFLE:  # laid out as a word of each chunk
        first, _, _, _ = _split4(tl.reshape(words, (BLOCK_N, C, 4)), BLOCK_N, C)
        table = _lane_codes(code_ptr, first)
    scale = _block_scale(blocks, None, *scales, DOUBLE_QUANT)
    _pdl_wait(PDL)  # x is the kernel before's output
    for k0 in range(0, whole, BLOCK_K):
        ahead = k0 + tl.where(k0 + BLOCK_K < whole, BLOCK_K, 0)  # the next whole step (the last: itself, cached)
        next_words = _step_words(words_at, ahead, K, C, False)
        next_scale = _block_scale(blocks + ahead // BLOCKSIZE, None, *scales, DOUBLE_QUANT)
        acc = _add_rows(acc, words, scale, table, code_ptr, x_ptr, stride_xm, M, k0, K, BLOCK_M, BLOCK_N, C, False,
                        SHUFFLE)
        words, scale = next_words, next_scale
    if whole < K:  # the last, partial step: whole chunks (K is a whole number of blocks)
        words = _step_words(words_at, whole, K, C, True)
        scale = _block_scale(blocks + whole // BLOCKSIZE, whole // 32 + chunk < K // 32, *scales, DOUBLE_QUANT)
        acc = _add_rows(acc, words, scale, table, code_ptr, x_ptr, stride_xm, M, whole, K, BLOCK_M, BLOCK_N, C,
                        True, SHUFFLE)
    return tl.sum(acc, axis=2)
