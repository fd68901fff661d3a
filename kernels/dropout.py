"""LoRA dropout whose masks are drawn again from a seed instead of stored: forward and backward in Triton.

PEFT's LoRA dropout, as ``bailong.lora_fused`` runs it, drops the input of each
of the n projections that read x (q, k, v: n = 3; gate, up: 2; o, down: 1) by
a mask of its own. torch's ``native_dropout`` writes each mask (a byte a value)
beside the dropped copies, and the backward reads both again, writes the n
masked gradients, then sums them. Here the masks are never stored: a mask is
Philox4x32-10 numbers of (seed, counter), drawn again wherever it is needed.

    forward:   xs[j] = keep_j * x / (1 - p)            x read once, the n copies written   (n, tokens, in)
    backward:  dL/dx = sum_j keep_j * g_j / (1 - p)     the n gradients read, one written    (tokens, in)

Which values are kept: value e = 8 c + k of projection j takes 16 bits of the
four random words of counter f + j C + c (f: the key's first counter; C =
ceil(numel / 8)), word k // 2's low half for even k, its high half for odd. It
is kept if those bits are at least ``threshold`` = round(65,536 p): p is taken
to the nearest 1/65,536 (0.05 as 0.0500031), and the kept values are scaled by
65,536 / (65,536 - threshold), so that the expectation stays x (p = 1 keeps
nothing). A thread draws
a counter's words and reads or writes its 8 values at once (16 bytes of bf16):
a warp's accesses are 512 contiguous bytes.

A Philox call decides 8 values (torch's dropout: 4), and the masks are drawn
three times a step (the forward, a checkpointed recomputation, the backward;
torch's twice): 3/8 of a call a value against 2/4. Compiled for sm_90 the two
kernels take 15-16.5 instructions a value at q, k and v's shape
(bench/check_kernels_compile.py), about what moving their bytes at an H200's
bandwidth leaves an SM room for.

A key is (seed, first counter): the seed a one-element int64 tensor on the
device, which the kernels read there, and the first counter a number. Where a
model's forward draws the seed (once a forward, on the device) and how a
checkpointed layer's recomputation finds the forward's keys again, with nothing
read on the host, so that a CUDA graph's replay draws masks of its own:
``bailong.recompute.MaskSeeds``. The masks are other draws of the law
``F.dropout`` draws from, not its numbers: on the CPU the fused LoRA keeps torch's
dropout (``bailong.lora_fused._dropped``), and the tests hold these kernels to a
PyTorch Philox of the masks defined above (tests/test_dropout_kernels.py).
"""
import torch
import triton
import triton.language as tl

from bailong_kernels.nf4_dequant import FMA, _join8, cdiv, launch_device

LEVELS = 1 << 16  # the values of a decision's 16 bits
ROWS = 256  # counters a program: 256 x 8 values


@triton.jit
def _bits(seed, counters, ROWS: tl.constexpr):
    """The 16-bit halves of the four Philox words of each counter, (ROWS, 8) as uint32: value k of a counter is
    word k // 2's low half for even k, its high half for odd, each row in the thread that drew its words."""
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    return _join8((r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16, r2 & 0xFFFF, r2 >> 16, r3 & 0xFFFF, r3 >> 16), ROWS)


@triton.jit
def _tile(numel, C, first, ROWS: tl.constexpr):
    """This program's counters c (ROWS,), their values e (ROWS, 8) (16 bytes of bf16 a thread) and which exist,
    with numel, C and the first counter in int64 (added to an int64 zero: numel or C may be a constant 1): n
    copies may hold more than 2^31 values, and counters past 2^31 follow a first one below it."""
    numel, C, first = numel + tl.zeros((), tl.int64), C + tl.zeros((), tl.int64), first.to(tl.int64)
    c = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    e = c[:, None] * 8 + tl.arange(0, 8)[None, :]
    return c, e, e < numel, numel, C, first


# The first counter and the threshold are not specialized: Triton makes an integer argument equal to 1 a constant,
# and one divisible by 16 another kernel. numel and C are (their divisibility lets the loads and stores take 16
# bytes). The first counter is typed int64 whatever its value (Triton types an integer below 2^31 int32, another
# kernel): a forward's counters cross 2^31 at long sequences. The seed is read from the device.
@triton.jit(do_not_specialize=["first", "cut"])
def _dropout_kernel(x_ptr, out_ptr, numel, C, seed_ptr, first: tl.int64, cut, scale, N: tl.constexpr,
                    ROWS: tl.constexpr):
    c, e, ok, numel, C, first = _tile(numel, C, first, ROWS)
    seed = tl.load(seed_ptr)
    x = tl.load(x_ptr + e, mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(N):  # xs[j] = keep_j * x / (1 - p)
        kept = _bits(seed, first + j * C + c, ROWS) >= cut.to(tl.uint32)
        tl.store(out_ptr + j * numel + e, tl.where(kept, x * scale, 0.0), mask=ok)


@triton.jit(do_not_specialize=["first", "cut"])
def _dropout_sum_kernel(g_ptr, out_ptr, numel, C, seed_ptr, first: tl.int64, cut, scale, N: tl.constexpr,
                        ROWS: tl.constexpr):
    c, e, ok, numel, C, first = _tile(numel, C, first, ROWS)
    seed = tl.load(seed_ptr)
    total = tl.zeros((ROWS, 8), tl.float32)
    for j in tl.static_range(N):  # dL/dx = sum_j keep_j * g_j / (1 - p)
        kept = _bits(seed, first + j * C + c, ROWS) >= cut.to(tl.uint32)
        g = tl.load(g_ptr + j * numel + e, mask=ok, other=0.0).to(tl.float32)
        total += tl.where(kept, g, 0.0)
    tl.store(out_ptr + e, total * scale, mask=ok)  # out may be g[0]: a thread reads its values before it writes


def threshold(p) -> int:
    """The 16-bit threshold of dropout probability p (0 <= p <= 1): round(65,536 p); at 65,536 (p = 1) nothing is
    kept, as in torch's dropout."""
    return min(round(p * LEVELS), LEVELS)


def _scale(p) -> float:
    """What the kept values are multiplied by: 65,536 / (65,536 - threshold), the expectation kept; 0 at p = 1."""
    kept = LEVELS - threshold(p)
    return LEVELS / kept if kept else 0.0


def counters(x, n) -> int:
    """The Philox counters ``dropout(x, n, p, key)`` takes, from the key's first on: 8 values of x a counter, for
    each of the n masks."""
    return n * cdiv(x.numel(), 8)


def dropout(x, n, p, key):
    """x (tokens, in) dropped by n masks of probability p, those of ``key`` (seed, first counter: the module
    docstring), which ``dropout_sum`` takes again: (n, tokens, in) in x's dtype."""
    x = x.contiguous()
    C = cdiv(x.numel(), 8)
    out = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device)
    with launch_device(x):
        _dropout_kernel[(cdiv(C, ROWS),)](x, out, x.numel(), C, *_checked(key, x), threshold(p), _scale(p), N=n,
                                          ROWS=ROWS, **FMA)
    return out


def dropout_sum(g, key, p, out=None):
    """The gradient of x from the gradients ``g`` (n, tokens, in) of ``dropout(x, n, p, key)``'s n copies:
    sum_j keep_j * g[j] / (1 - p), (tokens, in) in g's dtype; into ``out`` where given (g[0] itself may be it)."""
    g = g.contiguous()
    n, numel = g.shape[0], g[0].numel()
    C = cdiv(numel, 8)
    out = torch.empty(g.shape[1:], dtype=g.dtype, device=g.device) if out is None else out
    assert out.is_contiguous() and out.shape == g.shape[1:]
    with launch_device(g):
        _dropout_sum_kernel[(cdiv(C, ROWS),)](g, out, numel, C, *_checked(key, g), threshold(p), _scale(p), N=n,
                                              ROWS=ROWS, **FMA)
    return out


def _checked(key, x):
    """``key`` as the kernels take it: its seed a one-element int64 tensor on x's device."""
    seed, first = key
    assert seed.dtype == torch.int64 and seed.numel() == 1 and seed.device == x.device, seed
    return seed, first
