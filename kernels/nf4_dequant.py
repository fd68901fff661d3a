"""NF4 dequantization in Triton: packed 4-bit codes (+ double-quantized absmax) to a float tensor.

Reference: ``bailong.nf4.NF4Tensor.dequantize`` (the same signature through ``nf4_dequantize``).
A byte holds two neighbouring weights (the first in the high nibble); each
nibble is looked up in the 16-entry code table:

    for each packed byte b (one program: BLOCK bytes):
        (w[2b], w[2b+1]) = code[(packed[b] >> 4, packed[b] & 15)] * scale(block of 2b)   # one block for both
        scale(blk) = absmax[blk]                                                      (plain)
                   = nested_map[absmax_code[blk]] * nested_absmax[blk // 256] + offset  (double-quantized)

Why 16 entries and not a 256-entry table of code pairs (one lookup per byte
instead of two): a lookup is a gather from global memory served by the L1
cache, which handles one cache line (128 bytes) per cycle for a warp. The
16 float32 codes are 64 bytes, one line: a warp's 32 lookups take one pass. A
pair table is 2 KiB, 16 lines: a warp's 32 random bytes touch about 14 of
them (16 (1 - (15/16)^32)), so 14 passes for 64 values instead of 2 passes.

A second kernel reads the packed bytes as int32 words, 8 weights a word, one
word a thread a step: the word's block scale is found once (not once a byte),
the 8 codes are looked up and scaled in the thread that holds the word, and
the thread writes its 8 values with one store (16 bytes of bf16), with no
exchange between threads:

    for each int32 word k of value u (one thread: 4 packed bytes, little-endian, 8 weights):
        s = scale(block of word k)                       # blocks of 64 weights: 8 words share a scale
        w[8k + j] = code[(u >> 4 * (j ^ 1)) & 15] * s    # j = 0..7: shifts 4, 0, 12, 8, 20, 16, 28, 24
        the 8 values stored at once

Compiled for sm_90 (bench/check_kernels_compile.py, bf16 out) the
byte kernel spends about 32 machine instructions a weight, the word kernel
about 10; writing 2.5 bytes a weight (read and written) at an H200's ~4.3 TB/s
leaves an SM room for about 19. On an H200 it is 1.6x faster than the byte
kernel (3.2-3.3 TB/s read + written against 2.0, docs/BENCHMARKS.md), so it is
the default (``BY_WORDS``) wherever q's bytes read as words; the byte kernel
takes the rest.

Under the Triton interpreter (the CPU's tests) a float32 value converted to
bfloat16 is truncated, where a GPU rounds it to the nearest: there 45% of a bf16
dequantization's values are one unit nearer 0 than the reference's. float32 out
gives the reference's bits on both; bf16 out is checked on the GPU.
"""
import contextlib
import functools
import itertools
import os

import torch
import triton
import triton.language as tl

import bailong_kernels
from bailong.nf4 import NESTED_BLOCKSIZE, NF4Tensor

# Programmatic dependent launch from Triton 3.5. 3.3 has none; 3.4 has these two functions, but they take the
# argument its compiler no longer passes, and a kernel that calls them fails to compile ("unexpected keyword
# argument '_semantic'")
if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 5):
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
else:
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _block_scale(block, mask, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                 DOUBLE_QUANT: tl.constexpr):
    """Float32 absmax of the blocks ``block`` (any shape), expanding the 8-bit codes if double-quantized; masked
    blocks read as 0, or double-quantized as the offset: callers mask what they store (``mask`` None: every
    block is read)."""
    if DOUBLE_QUANT:
        if mask is None:
            absmax_code = tl.load(absmax_ptr + block).to(tl.int32)
            nested_absmax = tl.load(nested_absmax_ptr + block // 256)
        else:
            absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            nested_absmax = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        scale = tl.load(nested_map_ptr + absmax_code) * nested_absmax + tl.load(offset_ptr)
    elif mask is None:
        scale = tl.load(absmax_ptr + block)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def nibbles(byte):
    """The two codes of each packed byte, high nibble first: shape (..., 2) for bytes of shape (..., 1)."""
    return (byte >> (4 - 4 * tl.arange(0, 2))) & 0xF


@triton.jit
def _nf4_dequant_kernel(weights, starts, out_ptr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out[starts[g] : starts[g + 1]] = weight g of ``weights`` (a tuple of ``nf4_args``: one launch for all,
    q, k and v into one buffer), flattened; a program expands 2 BLOCK weights (BLOCK bytes) of one weight."""
    if len(weights) == 1:  # no branch to take
        _dequant_bytes(tl.program_id(0), weights[0], out_ptr, starts[1], BLOCKSIZE, DOUBLE_QUANT, BLOCK)
    else:
        first = 0  # the first program of weight g
        for g in tl.static_range(len(weights)):
            n = starts[g + 1] - starts[g]
            program = tl.program_id(0) - first
            if (program >= 0) & (program * 2 * BLOCK < n):
                _dequant_bytes(program, weights[g], out_ptr + starts[g], n, BLOCKSIZE, DOUBLE_QUANT, BLOCK)
            first += tl.cdiv(n, 2 * BLOCK)


@triton.jit
def _dequant_bytes(program, weight, out_ptr, n, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                   BLOCK: tl.constexpr):
    """out[2 BLOCK program : 2 BLOCK (program + 1)] = those of the n weights of ``weight`` (``nf4_args``)."""
    w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr = weight
    b = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # packed byte indices
    byte_ok = b < (n + 1) // 2
    byte = tl.load(w_ptr + b, mask=byte_ok, other=0).to(tl.int32)
    pair = tl.load(code_ptr + nibbles(byte[:, None]))  # (BLOCK, 2)
    scale = _block_scale(2 * b // BLOCKSIZE, byte_ok, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr,
                         DOUBLE_QUANT)
    w = tl.reshape(pair * scale[:, None], (2 * BLOCK,))
    flat = program.to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=flat < n)


@triton.jit
def _lane_codes(code_ptr, like):
    """The code table spread over a warp for ``_code``'s shuffles: code[lane % 16] as int32 bits in every element
    of a tensor shaped as ``like``, where lane is the warp lane that holds the element. Picked out of the 16
    codes by selects (before the loop), not gathered: a gather's load could be laid out over other lanes."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True, pack=1)
    table = tl.zeros_like(lane)
    for i in tl.static_range(16):
        table = tl.where((lane & 15) == i, tl.load(code_ptr + i).to(tl.int32, bitcast=True), table)
    return table


@triton.jit
def _code(nibble, table, code_ptr, SHUFFLE: tl.constexpr):
    """code[nibble & 15] in float32: loaded (from the L1 cache), or (``SHUFFLE``) copied from ``table`` in lane
    nibble & 15 of this half of the warp. A shuffle in 16-lane segments takes only the low 4 bits of the source
    lane (the PTX ISA's shfl.sync: bits 0-4 of b, less the segment mask 0x10 in bits 8-12 of c), so the nibble
    needs no mask. Every lane of the warp must run it together: the branches around it (the loop over K, the
    partial last step, which weight a program takes) go the same way for every lane of a program. And the table
    must reach it in the lanes ``_lane_codes`` made it in, with no layout conversion between (Triton makes none
    here; bench/check_kernels_compile.py checks the compiled kernels for one)."""
    if SHUFFLE:
        bits = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x101f, -1;", "=r,r,r", [table, nibble],
                                         dtype=tl.int32, is_pure=True, pack=1)
        return bits.to(tl.float32, bitcast=True)
    else:  # gathered flat: Triton lays out a load by its pointers, and flat they leave it no two axes to choose from
        return tl.reshape(tl.load(code_ptr + tl.reshape(nibble & 0xF, (nibble.numel,))), nibble.shape)


@triton.jit
def _word_codes(words, table, code_ptr, SHUFFLE: tl.constexpr):
    """The code values of the 8 weights of each int32 word of packed bytes, in order: weight j sits at bit
    4 * (j ^ 1) of a little-endian word (4, 0, 12, 8, 20, 16, 28, 24), a byte's first weight in its high
    nibble. ``SHUFFLE``: by shuffles from ``table`` (``_code``; the GEMV), else loaded (``table`` None)."""
    return (_code(words >> 4, table, code_ptr, SHUFFLE), _code(words, table, code_ptr, SHUFFLE),
            _code(words >> 12, table, code_ptr, SHUFFLE), _code(words >> 8, table, code_ptr, SHUFFLE),
            _code(words >> 20, table, code_ptr, SHUFFLE), _code(words >> 16, table, code_ptr, SHUFFLE),
            _code(words >> 28, table, code_ptr, SHUFFLE), _code(words >> 24, table, code_ptr, SHUFFLE))


@triton.jit
def _join8(c, WORDS: tl.constexpr):
    """Eight tensors (WORDS,) as the columns of one (WORDS, 8), each row left in the thread that holds its
    values: a join pairs its operands element by element, so the
    evens and the odds are each built from columns 4 apart, then paired."""
    even = tl.reshape(tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6])), (WORDS, 4))  # columns 0 2 4 6
    odd = tl.reshape(tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7])), (WORDS, 4))  # columns 1 3 5 7
    return tl.reshape(tl.join(even, odd), (WORDS, 8))


@triton.jit
def _nf4_dequant_words_kernel(weights, starts, out_ptr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                              WORDS: tl.constexpr, STEPS: tl.constexpr):
    """out[starts[g] : starts[g + 1]] = weight g of ``weights`` (a tuple of ``word_args``: one launch for all),
    flattened; a program expands STEPS steps of WORDS words (one a thread) of one weight."""
    if len(weights) == 1:  # no branch to take
        _dequant_words(tl.program_id(0), weights[0], out_ptr, starts[1] // 8, BLOCKSIZE, DOUBLE_QUANT, WORDS, STEPS)
    else:
        first = 0  # the first program of weight g
        for g in tl.static_range(len(weights)):
            n_words = (starts[g + 1] - starts[g]) // 8
            program = tl.program_id(0) - first
            if (program >= 0) & (program * STEPS * WORDS < n_words):
                _dequant_words(program, weights[g], out_ptr + starts[g], n_words, BLOCKSIZE, DOUBLE_QUANT, WORDS,
                               STEPS)
            first += tl.cdiv(n_words, STEPS * WORDS)


@triton.jit
def _dequant_words(program, weight, out_ptr, n_words, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                   WORDS: tl.constexpr, STEPS: tl.constexpr):
    """The weights of words STEPS WORDS program ... STEPS WORDS (program + 1) of the n_words of ``weight``
    (``word_args``) into out."""
    w_ptr, code_ptr, absmax_ptr, nested_map_ptr, nested_absmax_ptr, offset_ptr = weight
    for step in tl.static_range(STEPS):
        word = (program.to(tl.int64) * STEPS + step) * WORDS + tl.arange(0, WORDS)
        ok = word < n_words
        words = tl.load(w_ptr + word, mask=ok, other=0)
        scale = _block_scale(word // (BLOCKSIZE // 8), ok, absmax_ptr, nested_map_ptr, nested_absmax_ptr,
                             offset_ptr, DOUBLE_QUANT)
        w = _join8(_word_codes(words, None, code_ptr, False), WORDS) * scale[:, None]
        flat = word[:, None] * 8 + tl.arange(0, 8)[None, :]
        tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def nf4_args(q: NF4Tensor):
    """The tensors every NF4 kernel takes, in kernel-argument order (all on the device: no host
    synchronisation, so the kernels can be captured in a CUDA graph)."""
    if q.double_quant:
        assert q.nested_quant_map.numel() == 256 and NESTED_BLOCKSIZE == 256
        return (q.data, q.quant_map, q.absmax, q.nested_quant_map, q.nested_absmax, q.offset)
    return (q.data, q.quant_map, q.absmax, q.absmax, q.absmax, q.absmax)  # unused: anything valid


def word_args(q: NF4Tensor):
    """``nf4_args`` with the packed bytes as int32 words (``readable_as_words``), as the word kernel reads them."""
    packed, *tables = nf4_args(q)
    return (packed.view(-1).view(torch.int32), *tables)


def cdiv(a: int, b: int) -> int:
    """The launch grids' ceiling division, ``triton.cdiv`` as a plain function: Triton's own helpers are
    constexpr functions, a few microseconds a call on the host (Triton 3.9), and a training step makes
    dozens of launches a layer."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` as a plain function (see ``cdiv``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# a * b + c contracted into one fused multiply-add in the compiled code: every timing and instruction count of these
# kernels was taken so. Triton's default until 3.9, which warns once a process that 3.10 turns it off; asked for at
# each launch, it stays, and the warning goes. Only the dequantize kernels launch without, to give the reference's
# bits (a double-quantized scale, code * nested scale + offset, rounded twice as PyTorch rounds it).
FMA = dict(enable_fp_fusion=True)


def launch_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: a context that makes it ``t``'s."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.cache
def _hopper_or_later(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_possible(t: torch.Tensor) -> bool:
    """Whether kernels for ``t`` can launch with programmatic dependent launch: t on an NVIDIA GPU of the Hopper
    generation or later, and a Triton that has it (3.5 and later), not interpreted."""
    return (t.is_cuda and torch.version.hip is None and gdc_wait is not None
            and os.environ.get("TRITON_INTERPRET") != "1" and _hopper_or_later(t.device))


def pdl(t: torch.Tensor) -> bool:
    """Whether a kernel for ``t`` that takes a ``PDL`` meta-parameter launches with programmatic dependent launch:
    switched on (``bailong_kernels.use_pdl``), under ``torch.inference_mode`` (decoding: ``generate()``, the
    decoders; never training, where an optimizer writes weights), and ``pdl_possible(t)``. Such a kernel may
    start while the kernel before it still runs, even while kernels before that one do: each program first lets
    the next kernel start (``_pdl_start``), may then read only the arguments its wrapper passes as weights
    (tensors no kernel writes during inference: NF4 weights, their scales and code tables, norm and dense
    weights), and waits (``_pdl_wait``: until the kernel before has ended and its writes can be seen) before it
    reads anything else or writes anything at all."""
    return bailong_kernels.switches()[3] and torch.is_inference_mode_enabled() and pdl_possible(t)


def pdl_meta(t: torch.Tensor) -> dict:
    """The launch options and the kernels' ``PDL`` meta-parameter for ``pdl(t)``."""
    on = pdl(t)
    return dict(PDL=on, launch_pdl=True) if on else dict(PDL=False)


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    """With PDL, let the next kernel start (its programs then wait, reading only weights, for this one to end)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """With PDL, wait until the kernel before this one has ended, its writes seen (a no-op the second time)."""
    if PDL:
        gdc_wait()


BY_WORDS = True  # the word kernel by default: 1.6x faster than the byte kernel on an H200


def readable_as_words(q: NF4Tensor) -> bool:
    """Whether q's packed bytes can be read as int32 words of 8 whole weights."""
    return q.data.is_contiguous() and q.data.data_ptr() % 4 == 0 and q.numel % 8 == 0


def word_steps():
    """(WORDS, STEPS, num_warps) of the word kernel: a word a thread, four steps a program (4,096 weights, 8 KB
    of bf16 out); interpreted, small, so that the tests run several programs and a partial last one."""
    return (64, 2, 1) if os.environ.get("TRITON_INTERPRET") == "1" else (128, 4, 4)


def nf4_dequantize(q: NF4Tensor, dtype=None, by_words=None) -> torch.Tensor:
    """``q.dequantize(dtype)`` computed by a kernel: the byte kernel, or with ``by_words`` (default
    ``BY_WORDS``) the word kernel where q's bytes are readable as words. Both give the reference's bits."""
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.data.device)
    _dequantize_into(out, (q,), (0, q.numel), by_words)
    return out


def nf4_dequantize_group(qs, dtype=None, by_words=None) -> torch.Tensor:
    """The weights ``qs`` (NF4, quantized alike) dequantized (``nf4_dequantize``) into one flat tensor, one after
    another: for weights of one K, the rows of a (sum of N, K) matrix that one matmul multiplies by (q, k and v;
    gate and up). Either kernel takes them all in one launch."""
    assert len({(q.blocksize, q.double_quant) for q in qs}) == 1, "one launch takes weights quantized alike"
    starts = (0, *itertools.accumulate([q.numel for q in qs]))
    out = torch.empty(starts[-1], dtype=dtype or qs[0].dtype, device=qs[0].data.device)
    _dequantize_into(out, qs, starts, by_words)
    return out


def _dequantize_into(out, qs, starts, by_words):
    """out[starts[g] : starts[g + 1]] = qs[g] dequantized, for every g."""
    block = 512
    # no fused multiply-add in either kernel: the nested scale is rounded twice, as in the reference
    with launch_device(out):
        if (BY_WORDS if by_words is None else by_words) and all(map(readable_as_words, qs)):
            words, steps, warps = word_steps()
            programs = [cdiv((b - a) // 8, words * steps) for a, b in itertools.pairwise(starts)]
            _nf4_dequant_words_kernel[(sum(programs),)](
                tuple(map(word_args, qs)), starts, out, BLOCKSIZE=qs[0].blocksize, DOUBLE_QUANT=qs[0].double_quant,
                WORDS=words, STEPS=steps, num_warps=warps, enable_fp_fusion=False)
        else:
            programs = [cdiv(b - a, 2 * block) for a, b in itertools.pairwise(starts)]
            _nf4_dequant_kernel[(sum(programs),)](
                tuple(map(nf4_args, qs)), starts, out, BLOCKSIZE=qs[0].blocksize, DOUBLE_QUANT=qs[0].double_quant,
                BLOCK=block, enable_fp_fusion=False)
