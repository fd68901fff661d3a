"""Programmatic dependent launch (``BAILONG_PDL``, ``bailong_kernels.nf4_dequant.pdl``): the decoding step's kernels
keep PDL's order (tests/pdl_contract.py) and give the same bits with it as without; when it is on; that the check
can fail. The GPU side (the same ids from a CUDA graph with PDL, its speed) is tests/test_gpu.py and
bench/bench_decode.py; the compiled order (the wait after the first weights, no store before it) is
bench/check_kernels_compile.py."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (it ships for Linux alone)")
import triton
import triton.language as tl

from bailong.nf4 import quantize
from bailong_kernels import decode, nf4_gemv as g
from bailong_kernels.nf4_dequant import _pdl_start, _pdl_wait
from pdl_contract import pdl_contract


def same_with_pdl(run):
    """run() without PDL, then with it under the contract: the same bits. Returns the kernels launched with PDL."""
    plain = run()
    with pdl_contract() as launched:
        kept = run()
    for a, b in zip(plain if isinstance(plain, tuple) else (plain,), kept if isinstance(kept, tuple) else (kept,)):
        assert torch.equal(a, b)
    assert launched
    return launched


@pytest.mark.parametrize("M,at_end", [(1, True), (3, True), (3, False)])
def test_the_gemv_reads_only_weights_before_it_waits(M, at_end):
    """Each loop (at the end, each step; the dense one below) asks for its first step's weights before the
    wait: one weight, q/k/v in one launch, gate and up with SwiGLU, o with the residual; K of 2.5 steps (a
    partial last one), rows of W past a whole number of tiles."""
    torch.manual_seed(M)
    q, k, gate, up = (quantize(torch.randn(n, 640)) for n in (41, 24, 44, 44))
    x, residual = torch.randn(M, 640), torch.randn(M, 41)
    tile = (2, 256, 1, at_end)
    same_with_pdl(lambda: g.gemv_group(x, [q, k], tile))
    same_with_pdl(lambda: g.gemv_swiglu(x, gate, up, tile))
    same_with_pdl(lambda: g.gemv(x, q, tile, residual=residual))


@pytest.mark.parametrize("M", [1, 3])
def test_the_dense_gemv_reads_only_weights_before_it_waits(M):
    torch.manual_seed(M)
    w, u = torch.randn(13, 1544, dtype=torch.float16), torch.randn(13, 1544, dtype=torch.float16)
    x = torch.randn(M, 1544, dtype=torch.float16)  # K: whole steps and a partial one
    same_with_pdl(lambda: g.gemv_group(x, [w, u]))
    same_with_pdl(lambda: g.gemv_swiglu(x, w, u))


@pytest.mark.parametrize("part_positions", [512, 32])  # one launch; two (the parts merged)
def test_the_decode_kernels_wait_before_they_read(monkeypatch, part_positions):
    """RMSNorm (its weight read before the wait), SwiGLU, the one-token attention and the merge of its parts."""
    from bailong.config import preset
    from bailong.model import rope_cos_sin
    monkeypatch.setattr(decode, "PART_POSITIONS", part_positions)
    torch.manual_seed(0)
    x, weight = torch.randn(3, 100), torch.randn(100)
    same_with_pdl(lambda: decode.rms_norm(x, weight, 1e-5))
    gate, up = torch.randn(2, 1500), torch.randn(2, 1500)
    same_with_pdl(lambda: decode.swiglu(gate, up))
    B, H, KV, D, S, p = 2, 8, 2, 16, 200, 150
    k_cache, v_cache = torch.randn(B, KV, S, D), torch.randn(B, KV, S, D)
    q, k, v = torch.randn(B, 1, H * D), torch.randn(B, 1, KV * D), torch.randn(B, 1, KV * D)
    config = preset("tiny")
    config.head_dim = D
    cos, sin = rope_cos_sin(config, torch.tensor([p]), torch.float32)

    def attend():
        caches = k_cache.clone(), v_cache.clone()
        return decode.decode_attention(q, k, v, cos, sin, torch.tensor([p]), *caches), *caches
    same_with_pdl(attend)


def test_a_decoding_step_with_pdl_gives_the_same_logits(monkeypatch):
    """The fused step of a small NF4 model on the GPU's path (interpreted): every launch keeps the order, and
    the logits of 3 steps are the same bits."""
    from bailong.generation import GraphDecoder
    from test_layer_kernels import gpu_path, tiny_nf4
    gpu_path(monkeypatch, fused_step=True)
    model = tiny_nf4(1)

    def steps():
        decoder = GraphDecoder(model, 64, graph=False)
        logits = [decoder.prefill(torch.tensor([list(range(3, 20))]))]
        for _ in range(3):
            logits.append(decoder.step(int(logits[-1][0].argmax())))
        return torch.stack(logits)
    with torch.inference_mode():
        launched = same_with_pdl(steps)
    # a step: the norm, q/k/v, attention, o + residual, the norm, gate/up + SwiGLU, down + residual; the final
    # norm (the head is float32 here: not the GEMV's); the prompt's norms and attention take other paths
    assert launched[-8:] == ["_rms_norm_kernel", "_nf4_gemv_kernel", "_decode_attention_kernel", "_nf4_gemv_kernel",
                             "_rms_norm_kernel", "_nf4_gemv_swiglu_kernel", "_nf4_gemv_kernel", "_rms_norm_kernel"]


@triton.jit
def _reads_early(x_ptr, w_ptr, y_ptr, PDL: tl.constexpr):
    _pdl_start(PDL)
    i = tl.arange(0, 16)
    x = tl.load(x_ptr + i)  # not a weight, before the wait
    _pdl_wait(PDL)
    tl.store(y_ptr + i, x * tl.load(w_ptr + i))


@triton.jit
def _writes_early(x_ptr, w_ptr, y_ptr, PDL: tl.constexpr):
    _pdl_start(PDL)
    i = tl.arange(0, 16)
    tl.store(y_ptr + i, tl.load(w_ptr + i))  # before the wait
    _pdl_wait(PDL)
    tl.store(y_ptr + i, tl.load(x_ptr + i) * tl.load(w_ptr + i))


@triton.jit
def _never_waits(x_ptr, w_ptr, y_ptr, PDL: tl.constexpr):
    _pdl_start(PDL)
    i = tl.arange(0, 16)
    tl.store(y_ptr + i, tl.load(w_ptr + i))


@pytest.mark.parametrize("kernel,broken", [(_reads_early, "read something other than a weight before waiting"),
                                           (_writes_early, "wrote before waiting"),
                                           (_never_waits, "wrote before waiting")])
def test_the_check_fails_a_kernel_out_of_order(kernel, broken):
    x, w, y = torch.randn(16), torch.randn(16), torch.empty(16)
    with pytest.raises(AssertionError, match=broken):
        with pdl_contract():
            kernel[(2,)](x, w, y, PDL=True, launch_pdl=True)


def test_pdl_is_off_by_default_and_only_in_inference_on_a_gpu_that_has_it(monkeypatch):
    """Off unless switched on; never on the CPU; only under inference mode (decoding, never training, where the
    optimizer writes weights that a kernel would read before its wait); a switch in the key of a captured graph
    (``graph_key`` takes ``switches()``), so that switching it captures again."""
    import bailong_kernels
    from bailong_kernels import nf4_dequant
    t = torch.zeros(1)
    assert bailong_kernels.switches()[3] is False  # BAILONG_PDL unset in the tests
    assert nf4_dequant.pdl_meta(t) == dict(PDL=False)  # no launch option where it is off
    previous = bailong_kernels.use_pdl(True)
    try:
        assert bailong_kernels.switches()[3]
        with torch.inference_mode():
            assert not nf4_dequant.pdl_possible(t) and not nf4_dequant.pdl(t)  # the CPU: no GPU to run it
        monkeypatch.setattr(nf4_dequant, "pdl_possible", lambda t: True)  # as on a Hopper GPU
        with torch.inference_mode():
            assert nf4_dequant.pdl_meta(t) == dict(PDL=True, launch_pdl=True)
        with torch.no_grad():
            assert not nf4_dequant.pdl(t)  # a training step's forward in an autograd Function runs so
        assert not nf4_dequant.pdl(t)
    finally:
        bailong_kernels.use_pdl(previous)
    with torch.inference_mode():
        assert not nf4_dequant.pdl(t)
