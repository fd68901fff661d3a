"""LoRA dropout's kernels (``bailong_kernels.dropout``), interpreted on the CPU: the masks are the Philox numbers
its docstring says (a PyTorch Philox4x32-10 here, itself checked against Triton's), the forward and the backward
equal PyTorch on those masks, the law is dropout's, and the fused LoRA nodes train on them as autograd does.
A whole step with them, by hand and through autograd: tests/test_layer_fused.py."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (it ships for Linux alone)")

from bailong_kernels import dropout as D
from bounds import checked_bounds

M32 = 0xFFFFFFFF
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _mul(a, b):
    """(a b >> 32, a b & M32) for a constant a and a tensor b of 32-bit values, in int64 without overflow:
    a split into 16-bit halves."""
    high, low = (a >> 16) * b, (a & 0xFFFF) * b  # each below 2^48
    return (high + (low >> 16)) >> 16, (((high & 0xFFFF) << 16) + low) & M32


def philox(seed, counters):
    """Philox4x32-10 of key ``seed`` and counters (c, c >> 32, 0, 0): Triton's ``randint4x``, four int64 tensors
    of 32-bit values."""
    c0, c1 = counters & M32, (counters >> 32) & M32
    c2 = c3 = torch.zeros_like(counters)
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(10):
        high_b, low_b = _mul(0xCD9E8D57, c2)
        high_a, low_a = _mul(0xD2511F53, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def key_of(seed, first=0):
    """A key as ``D.dropout`` takes it: the seed a one-element int64 tensor (on the device), the first counter."""
    return torch.tensor([seed]), first


def kept(key, n, shape, p):
    """The n masks of ``D.dropout`` with key (seed, first counter), as its docstring defines them: (n, *shape)
    bool."""
    seed, offset = int(key[0]), key[1]
    numel = torch.Size(shape).numel()
    C = -(-numel // 8)
    masks = []
    for j in range(n):
        words = philox(seed, offset + j * C + torch.arange(C))
        halves = torch.stack([w >> s & 0xFFFF for w in words for s in (0, 16)], dim=1)  # (C, 8): value 8 c + k
        masks.append(halves.flatten()[:numel].view(shape) >= D.threshold(p))
    return torch.stack(masks)


def test_the_reference_philox_is_tritons():
    import triton
    import triton.language as tl

    @triton.jit
    def words(out_ptr, seed, offset, N: tl.constexpr):
        c = tl.arange(0, N)
        r0, r1, r2, r3 = tl.randint4x(seed, offset + c)  # uint32, widened without sign
        tl.store(out_ptr + c, r0.to(tl.int64))
        tl.store(out_ptr + N + c, r1.to(tl.int64))
        tl.store(out_ptr + 2 * N + c, r2.to(tl.int64))
        tl.store(out_ptr + 3 * N + c, r3.to(tl.int64))

    for seed, offset in [(0, 0), (12345, 2**32 - 7), (2**62 + 99, 2**40 + 3)]:
        out = torch.empty(4 * 64, dtype=torch.int64)
        words[(1,)](out, seed, offset, N=64)
        assert torch.equal(out.view(4, 64), torch.stack(philox(seed, offset + torch.arange(64)))), (seed, offset)


@pytest.mark.parametrize("shape,n,p,dtype", [((7, 37), 3, 0.05, torch.float32), ((33, 128), 1, 0.3, torch.float16),
                                             ((5, 3001), 2, 0.5, torch.float32), ((2, 3), 2, 0.9, torch.float32)])
@pytest.mark.parametrize("key", [key_of(12345), key_of(2**62 + 12345, 2**31 - 5)])
def test_the_kernels_drop_by_the_masks_their_key_gives(shape, n, p, dtype, key):
    """Forward and backward against PyTorch on the reference masks: sizes not a multiple of 8, below one
    program's 2,048 values and across several; every access within bounds; n = 1 in place. Keys as a forward's
    first masks take them, and as its later ones may: the seed past 2^32, the counters crossing 2^31 (the
    interpreter types the first counter by value; that the compiled kernels take any as int64, one kernel, the
    compile check checks: bench/check_kernels_compile.py)."""
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    with checked_bounds():
        xs = D.dropout(x, n, p, key)
    masks = kept(key, n, shape, p)
    scale = 65536 / (65536 - D.threshold(p))
    torch.testing.assert_close(xs, torch.where(masks, x.float() * scale, 0.0).to(dtype), atol=0, rtol=0)
    g = torch.randn(n, *shape).to(dtype)
    expected = (torch.where(masks, g.float(), 0.0).sum(0) * scale).to(dtype)
    with checked_bounds():
        dx = D.dropout_sum(g.clone(), key, p)
    torch.testing.assert_close(dx, expected, atol=1e-6 if dtype == torch.float32 else 2e-3, rtol=1e-5)
    if n == 1:  # into its input
        g1 = g.clone()
        assert D.dropout_sum(g1, key, p, out=g1[0]).data_ptr() == g1.data_ptr()
        torch.testing.assert_close(g1[0], expected, atol=1e-6 if dtype == torch.float32 else 2e-3, rtol=1e-5)


def test_the_masks_keep_one_minus_p_independently():
    """Of 3 x 40,000 values at p = 0.2: each mask keeps 0.8 of them within 5 standard deviations, and two
    masks agree as often as independent ones would; a second call draws other masks."""
    from bailong.recompute import MaskSeeds
    x = torch.ones(200, 200)
    p = 0.2
    xs = D.dropout(x, 3, p, MaskSeeds().key(x, D.counters(x, 3)))
    masks = xs != 0
    sd = (p * (1 - p) / x.numel()) ** 0.5
    for m in masks:
        assert abs(m.float().mean().item() - (1 - p)) < 5 * sd
    both = (masks[0] & masks[1]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / x.numel()) ** 0.5
    again = D.dropout(x, 3, p, MaskSeeds().key(x, D.counters(x, 3)))  # another forward's seed
    assert not torch.equal(again != 0, masks)


def test_p_is_taken_to_the_nearest_65536th_and_1_keeps_nothing():
    assert [D.threshold(p) for p in (0.0, 0.05, 0.5, 1 - 1e-9, 1.0)] == [0, 3277, 32768, 65536, 65536]
    key = key_of(3)
    xs = D.dropout(torch.randn(40, 40), 2, 1.0, key)
    assert not xs.any() and not D.dropout_sum(torch.randn(2, 40, 40), key, 1.0).any()  # as torch's dropout


@pytest.mark.parametrize("n", [1, 3])
def test_fused_lora_with_the_kernels_dropout_trains_as_autograd_on_the_same_masks(monkeypatch, n):
    """``LoRAShared`` (n = 3: q, k, v) and ``LoRAProjection`` (n = 1, with its base and a residual) on the
    kernels' path: the outputs and every gradient against autograd through the reference masks of the keys the
    kernels drew, float32."""
    from bailong import lora_fused
    from bailong.lora_fused import LoRAProjection, LoRAShared
    monkeypatch.setattr(lora_fused, "seeded_dropout", lambda x: D)
    keys = []
    draw = lora_fused.mask_key
    monkeypatch.setattr(lora_fused, "mask_key", lambda *args: keys.append(draw(*args)) or keys[-1])
    torch.manual_seed(0)
    tokens, K, r, s, p = 13, 24, 4, 0.5, 0.25
    x = torch.randn(1, tokens, K, requires_grad=True)
    Ws = [torch.randn(N, K) for N in (16, 8, 8)[:n]]
    As = [torch.randn(r, K, requires_grad=True) for _ in Ws]
    Bs = [torch.randn(N, r, requires_grad=True) for N in (16, 8, 8)[:n]]
    residual = torch.randn(1, tokens, 16, requires_grad=True)
    if n == 1:
        outs = (LoRAProjection.apply(x, Ws[0], As[0], Bs[0], As[0].detach(), Bs[0].detach(), s, p, residual),)
    else:
        outs = LoRAShared.apply(x, tuple(Ws), torch.cat(As).detach(), tuple(B.detach() for B in Bs), s, p, None,
                                *[w for AB in zip(As, Bs) for w in AB])
    gs = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, gs)
    ours = [x.grad, *[w.grad for w in As + Bs]] + ([residual.grad] if n == 1 else [])
    for t in [x, residual, *As, *Bs]:
        t.grad = None
    masks = kept(keys[0], n, (tokens, K), p).view(n, 1, tokens, K)
    dropped = torch.where(masks, x * (65536 / (65536 - D.threshold(p))), 0.0)
    expected = [x @ W.T + s * (xd @ A.T) @ B.T for W, A, B, xd in zip(Ws, As, Bs, dropped)]
    if n == 1:
        expected[0] = expected[0] + residual
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    torch.autograd.backward(expected, gs)
    for got, want in zip(ours, [x.grad, *[w.grad for w in As + Bs]] + ([residual.grad] if n == 1 else [])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_counters_past_two_to_the_31_are_not_wrapped():
    """A forward's counters pass 2^31 at long sequences (2^31 counters: 16 x 2^30 values): a first counter just
    under it (an int32 to the interpreter, which types integers by value; compiled, the kernels take it as int64)
    must not wrap when the projections' counters go past it."""
    key = key_of(7, 2**31 - 3)
    x = torch.randn(9, 40)
    xs = D.dropout(x, 3, 0.5, key)
    masks = kept(key, 3, x.shape, 0.5)
    torch.testing.assert_close(xs, torch.where(masks, x * 2.0, 0.0), atol=0, rtol=0)
    torch.testing.assert_close(D.dropout_sum(torch.ones(3, 9, 40), key, 0.5), masks.sum(0) * 2.0, atol=0, rtol=0)


@pytest.mark.parametrize("how", ["torch's checkpoint", "a node", "a node, the MLP in chunks", "by hand"])
def test_a_checkpointed_layer_draws_its_forwards_masks_again(monkeypatch, how):
    """The kernels' dropout (interpreted) under activation checkpointing: a step's loss and every LoRA gradient as
    without it, however the layer is checkpointed (torch's checkpoint, ``bailong.recompute.Recomputed``, with
    ``bailong.memory.ChunkedMLP`` inside it, the layer by hand): each recomputation takes its forward's keys
    (``bailong.recompute.MaskSeeds``). Were it to draw new ones, the gradients would be another function's."""
    check_checkpointed(monkeypatch, how)


def check_checkpointed(monkeypatch, how, device="cpu"):
    """``test_a_checkpointed_layer_draws_its_forwards_masks_again`` on ``device`` (CUDA: the kernels compiled)."""
    import bailong_kernels
    from bailong import layer_fused, lora, lora_fused, memory
    from bailong import model as llama
    from test_layer_kernels import gpu_path
    from test_step_graph import qlora_model
    by_hand = how == "by hand"
    if device == "cpu":
        gpu_path(monkeypatch, fused_step=False, layer_kernels=by_hand)
        monkeypatch.setattr(lora_fused, "seeded_dropout", lambda x: D)
    monkeypatch.setattr(bailong_kernels, "_layer_kernels", True)  # on CUDA: the dropout kernels, the layer by hand
    monkeypatch.setattr(lora, "_fused", True)
    monkeypatch.setattr(layer_fused, "_fused_layer", by_hand)
    monkeypatch.setattr(llama, "frozen_matmul_skipped", lambda m: how != "torch's checkpoint")
    monkeypatch.setattr(memory, "_chunked_mlp", how.endswith("chunks"))
    monkeypatch.setattr(memory, "MLP_CHUNK_VALUES", 12 * 192)  # 3 chunks
    results = []
    for checkpointing in (False, True):
        model = qlora_model(torch.float32, device, dropout=0.1)
        model.checkpointing = checkpointing
        ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(3)  # the same seed drawn
        loss = model(ids[:, :-1].to(device), targets=ids[:, 1:].to(device))
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
    tolerance = dict(atol=1e-6, rtol=1e-5) if device == "cpu" else dict(atol=1e-5, rtol=1e-4)  # CUDA's atomics
    for plain, checkpointed in zip(*results, strict=True):
        torch.testing.assert_close(checkpointed, plain, **tolerance)


@pytest.mark.gpu
@needs_cuda
def test_lora_dropout_kernels_on_cuda_in_bfloat16():
    """``bailong_kernels.dropout`` on CUDA: the masks of a key (its seed read on the device) are the reference's,
    the forward and the backward in bf16 as PyTorch on them, at q/k/v's shape; a forward's keys
    (``bailong.recompute.MaskSeeds``) follow one another from one seed, drawn again alike from the same random
    state and otherwise anew."""
    from bailong.recompute import MaskSeeds
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    state = torch.cuda.get_rng_state()
    seeds = MaskSeeds()
    key = seeds.key(x, D.counters(x, 3))
    xs = D.dropout(x, 3, 0.05, key)
    assert key[0].is_cuda and key[1] == 0 and seeds.key(x, 1) == (key[0], D.counters(x, 3))
    torch.cuda.set_rng_state(state)
    assert torch.equal(MaskSeeds().key(x, 1)[0], key[0]) and not torch.equal(MaskSeeds().key(x, 1)[0], key[0])
    masks = kept(key, 3, x.shape, 0.05)  # on the CPU
    scale = 65536 / (65536 - D.threshold(0.05))
    assert torch.equal(xs, torch.where(masks.cuda(), x.float() * scale, 0.0).bfloat16())
    g = torch.randn(3, 2048, 4096, device="cuda", dtype=torch.bfloat16)
    expected = torch.where(masks.cuda(), g.float(), 0.0).sum(0) * scale
    torch.testing.assert_close(D.dropout_sum(g, key, 0.05).float(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("how", ["torch's checkpoint", "a node", "a node, the MLP in chunks", "by hand"])
def test_on_cuda_a_checkpointed_layer_draws_its_forwards_masks_again(monkeypatch, how):
    """tests/test_dropout_kernels.py's check on CUDA, the kernels compiled: with checkpointing, a step's loss and
    LoRA gradients those without it, to CUDA's atomics (float32)."""
    check_checkpointed(monkeypatch, how, "cuda")


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_graph_replays_draw_the_masks_eager_forwards_draw():
    """A forward's LoRA dropout through the kernels, captured in a CUDA graph: the replays' masks are those eager
    forwards draw one after another from the same random state (torch's generator is advanced at each replay),
    each replay's its own."""
    from bailong.recompute import mask_key, mask_seeds
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)

    def forward():
        with mask_seeds():
            return D.dropout(x, 3, 0.1, mask_key(x, D.counters(x, 3)))
    forward()  # compiled outside the capture
    state = torch.cuda.get_rng_state()
    eager = [forward() for _ in range(3)]
    torch.cuda.set_rng_state(state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append(out.clone())
    assert all(torch.equal(a, b) for a, b in zip(replays, eager)) and not torch.equal(replays[0], replays[1])
