"""AdamW with 8-bit moments (bailong.optim) against torch.optim.AdamW and bitsandbytes' 8-bit AdamW, and its
Triton kernel (bailong_kernels.adamw8bit) against its PyTorch reference under the interpreter."""
import contextlib
import io

import pytest
import torch

from bailong.nf4 import dynamic_code
from bailong.optim import BLOCK, AdamW8bit, build_optimizer, quantize_blocks, step_8bit, tables
from conftest import needs_triton


def _train(optimizer, params, steps):
    """Each step: a gradient for each of params (in its dtype), then the optimizer's step."""
    for gradients in steps:
        for p, g in zip(params, gradients):
            p.grad = g.to(p.dtype, copy=True)
        optimizer.step()


def test_small_tensors_step_as_torch_adamw():
    """Under min_8bit_size the moments stay float32 and the steps are torch.optim.AdamW's, bit for bit."""
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Parameter(torch.randn(30, 70)) for _ in range(2))
    theirs.data.copy_(ours.data)
    gradients = [torch.randn(30, 70) for _ in range(6)]
    _train(AdamW8bit([ours], lr=1e-2, weight_decay=0.1), [ours], [[g] for g in gradients])
    _train(torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1), [theirs], [[g] for g in gradients])
    assert torch.equal(ours, theirs)


def test_the_codes_are_the_nearest():
    """Each value takes its nearest code (the lower one exactly between two), a block of zeros the code 0, the
    absmax per block of 256 (a partial last block too); with positive_not_zero a positive value never code 0."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(512) * torch.logspace(-9, 0, 512), torch.zeros(256), torch.randn(77)])
    for signed, name in [(True, "exp_avg"), (False, "exp_avg_sq")]:
        values, code, midpoints = (x if signed else x.abs()), tables("cpu")[name], tables("cpu")[name + "_midpoints"]
        assert torch.equal(code, dynamic_code(signed))  # (tests/test_nf4.py: bitsandbytes' codes)
        codes, absmax = quantize_blocks(values, midpoints)
        assert torch.equal(absmax, torch.nn.functional.pad(values, (0, -len(values) % 256)).view(-1, 256).abs().amax(1))
        scaled = values / absmax.repeat_interleave(256)[:len(values)].clamp(min=1e-30)
        assert ((code[codes.long()] - scaled).abs() <= (code[None, :] - scaled[:, None]).abs().amin(1)).all()
        assert (codes[512:768] == (127 if signed else 0)).all()  # the block of zeros
        ties = quantize_blocks(torch.cat([midpoints, torch.ones(1)]), midpoints)[0]
        assert torch.equal(ties[:255].long(), torch.arange(255))  # on a midpoint: the lower code
    tiny = torch.tensor([1.0, 1e-9, 0.0])
    assert quantize_blocks(tiny, midpoints)[0].tolist() == [255, 0, 0]
    assert quantize_blocks(tiny, midpoints, positive_not_zero=True)[0].tolist() == [255, 1, 0]


def test_close_to_float32_adamw_as_bitsandbytes_8bit_adamw():
    """60 steps of gradients whose scales span four orders of magnitude within each block: the weights stay as
    close to float32 AdamW's as bitsandbytes' 8-bit AdamW's do (its CPU step; here ours are closer)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    n = 7 * 3000 + 13  # blocks of 256 and a partial one
    start = torch.randn(n) * 0.1
    scale = torch.logspace(-3, 1, n)[torch.randperm(n)]
    gradients = [[(torch.randn(n) + 0.5) * scale] for _ in range(60)]  # a direction, and noise
    ours, theirs, exact = (torch.nn.Parameter(start.clone()) for _ in range(3))
    _train(AdamW8bit([ours], lr=1e-3, weight_decay=0.01), [ours], gradients)
    _train(bnb.optim.AdamW8bit([theirs], lr=1e-3, weight_decay=0.01, min_8bit_size=4096), [theirs], gradients)
    _train(torch.optim.AdamW([exact], lr=1e-3, weight_decay=0.01), [exact], gradients)
    moved = (exact - start).abs().mean()
    ours_off, theirs_off = (ours - exact).abs(), (theirs - exact).abs()
    assert ours_off.mean() < 0.25 * moved, (ours_off.mean(), moved)  # (0.16 here: scales this far apart round)
    assert ours_off.mean() <= 1.1 * theirs_off.mean() and ours_off.max() <= 1.1 * theirs_off.max(), \
        (ours_off.mean(), theirs_off.mean(), ours_off.max(), theirs_off.max())


def test_a_small_gradient_beside_a_large_one_does_not_overshoot():
    """A constant gradient 1e-4 of its block's largest: AdamW moves each weight by about lr a step. Its second
    moment rounded to the nearest code would be 0 and the weight would move 8x too far here; stored as at least the
    smallest positive code it moves no further than float32 AdamW's (6x less far, here)."""
    g = torch.full((4096,), 1e-4)
    g[::256] = 1.0
    ours = torch.nn.Parameter(torch.zeros(4096))
    optimizer = AdamW8bit([ours], lr=1e-3, weight_decay=0.0)
    _train(optimizer, [ours], [[g]] * 200)
    assert "exp_avg_absmax" in optimizer.state[ours]
    assert ours.abs().max() <= 200 * 1e-3 * 1.001
    assert ours[1].abs() > 0.1 * 200 * 1e-3  # too little, but not stuck: 0.033 where float32 AdamW moves 0.2


def test_chunks_and_layouts_do_not_change_a_step(monkeypatch):
    """The PyTorch step expands CHUNK values at a time: chunks of 512 give the bits of one chunk, and so do a
    transposed (not contiguous) weight and gradient; a bfloat16 weight steps as its float32 steps, rounded."""
    import bailong.optim
    torch.manual_seed(0)
    start, gradients = torch.randn(96, 50), [torch.randn(96, 50) for _ in range(3)]

    def run(transposed=False, dtype=torch.float32):
        w = torch.nn.Parameter((start.t().contiguous().t() if transposed else start.clone()).to(dtype))
        optimizer = AdamW8bit([w], lr=1e-2, min_8bit_size=0)
        for g in gradients:
            w.grad = (g.t().contiguous().t() if transposed else g).to(dtype)
            optimizer.step()
        return w.detach(), optimizer.state[w]

    (whole, state), transposed = run(), run(transposed=True)[0]
    monkeypatch.setattr(bailong.optim, "CHUNK", 512)
    chunked, chunked_state = run()
    assert torch.equal(chunked, whole) and torch.equal(transposed, whole)
    assert all(torch.equal(state[k], chunked_state[k]) for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax",
                                                                  "exp_avg_sq_absmax"))
    half = run(dtype=torch.bfloat16)[0]
    assert half.dtype == torch.bfloat16  # four bf16 roundings of the weight apart: the start's and 3 steps'
    torch.testing.assert_close(half.float(), whole, rtol=2 ** -6, atol=1e-3)  # 4 half units in the last place


def test_state_dict_round_trip():
    """Saved and loaded safely (weights_only), the codes stay uint8 and the run goes on exactly as without the
    break; a small tensor's float32 moments too, each in a parameter group of its own."""
    torch.manual_seed(0)
    shapes = [(64, 80), (10,)]  # 8-bit, float32
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]

    def groups(params):  # two groups, each its own rate
        return [dict(params=params[:1], lr=1e-2), dict(params=params[1:], lr=3e-2, weight_decay=0.0)]

    def run(break_at=None):
        params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        optimizer = AdamW8bit(groups(params), weight_decay=0.1)
        for i, gs in enumerate(grads):
            if i == break_at:
                buffer = io.BytesIO()
                torch.save(optimizer.state_dict(), buffer)
                buffer.seek(0)
                optimizer = AdamW8bit(groups(params), weight_decay=0.1)
                optimizer.load_state_dict(torch.load(buffer, weights_only=True))
                assert optimizer.state[params[0]]["exp_avg"].dtype == torch.uint8
                assert optimizer.state[params[1]]["exp_avg"].dtype == torch.float32
            for p, g in zip(params, gs):
                p.grad = g
            optimizer.step()
        return params, optimizer

    (whole, optimizer), (broken, _) = run(), run(break_at=3)
    assert all(torch.equal(a, b) for a, b in zip(whole, broken))
    state = optimizer.state[whole[0]]
    assert state["step"] == 6 and state["exp_avg_absmax"].shape == (20,) and state["exp_avg_sq"].shape == (5120,)
    held = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    assert held == 5120 * 2 + 20 * 4 * 2  # what the memory arithmetic counts: two codes a value, two maxima a block


def test_a_run_moves_over_from_torch_adamw():
    """torch.optim.AdamW's state (bfloat16 weights: moments in bfloat16, the step a tensor) loaded into AdamW8bit:
    the large tensor's moments stored in 8 bits, the small one's in float32, and the steps go on as torch's would,
    within the moments' rounding."""
    torch.manual_seed(0)
    shapes = [(64, 80), (10,)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(8)]
    ours, theirs = ([torch.nn.Parameter(torch.ones(s, dtype=torch.bfloat16)) for s in shapes] for _ in range(2))
    started = torch.optim.AdamW(ours, lr=1e-2)
    _train(started, ours, grads[:4])
    optimizer = AdamW8bit(ours, lr=1e-2)
    optimizer.load_state_dict(started.state_dict())
    big, small = (optimizer.state[p] for p in ours)
    assert big["exp_avg"].dtype == torch.uint8 and big["exp_avg_sq_absmax"].shape == (20,) and big["step"] == 4
    assert small["exp_avg"].dtype == torch.float32 and small["step"] == 4
    _train(optimizer, ours, grads[4:])
    _train(torch.optim.AdamW(theirs, lr=1e-2), theirs, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), atol=0.02, rtol=0)  # bf16 weights near 1: ulp 0.008


@needs_triton
@pytest.mark.gpu  # and interpreted without one
def test_the_kernel_rounds_a_midpoint_down():
    """A value exactly on a midpoint takes the lower code in the kernel too (beta1 = 0: the new first moment is
    the gradient itself, here the midpoints in a block whose largest value is 1)."""
    from bailong_kernels import adamw8bit
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = tables(torch.device(device))
    g = torch.cat([t["exp_avg_midpoints"], torch.ones(1, device=device)])
    optimizer = AdamW8bit([torch.nn.Parameter(torch.zeros(256, device=device))], min_8bit_size=0)
    state = optimizer._init_state(optimizer.param_groups[0]["params"][0])
    adamw8bit.adamw8bit_step(torch.zeros(256, device=device), g, state, t, 1, 1e-3, 0.0, 0.999, 1e-8, 0.0, BLOCK)
    assert state["exp_avg"].tolist() == list(range(256)) and state["exp_avg_absmax"].item() == 1.0


def test_build_optimizer_and_the_lora_casts_see_its_steps():
    """train.py's two choices; an 8-bit step counts as an optimizer step for the fused LoRA path's casts."""
    import bailong.lora
    p = torch.nn.Parameter(torch.zeros(5000))
    assert type(build_optimizer([p], "adamw")) is torch.optim.AdamW
    optimizer = build_optimizer([p], "adamw8bit", lr=0.1)
    before = bailong.lora_casts._renewals
    p.grad = torch.ones(5000)
    optimizer.step()
    assert bailong.lora_casts._renewals == before + 1 and "exp_avg_absmax" in optimizer.state[p]
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([p], betas=(0.9, 1.0))


@needs_triton
@pytest.mark.gpu  # and interpreted without one
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kernel_steps_as_its_reference(n, dtype):
    """One launch a tensor (on the GPU, or interpreted on the CPU) against bailong.optim.step_8bit over 4 steps:
    the same codes (but a few, one apart) and block maxima within float32 rounding (torch's CPU update fuses
    multiplies and adds), the weights too; a block of zero gradients and a partial last block included; nothing
    read or written outside the tensors. bfloat16 weights only on the GPU (the CUDA test below): the interpreter
    truncates to bfloat16."""
    from bounds import checked_bounds

    from bailong_kernels import adamw8bit
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(n)
    ours = torch.randn(n, device=device).to(dtype)
    ref = ours.clone()
    states = [AdamW8bit([torch.nn.Parameter(torch.zeros(n, device=device))], min_8bit_size=0) for _ in range(2)]
    states = [s._init_state(s.param_groups[0]["params"][0]) for s in states]
    for step in range(1, 5):
        g = (torch.randn(n, device=device) * torch.logspace(-4, 1, n, device=device)).to(dtype)
        g[:256] = 0 if n > 512 else g[:256]
        with checked_bounds() if device == "cpu" else contextlib.nullcontext():
            adamw8bit.adamw8bit_step(ours, g, states[0], tables(ours.device), step, 1e-2, 0.9, 0.999, 1e-8, 0.1,
                                     BLOCK)
        step_8bit(ref, g, states[1], step, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        for name in ("exp_avg", "exp_avg_sq"):  # the same codes but where a float32 rounding crosses a midpoint
            torch.testing.assert_close(states[0][name + "_absmax"], states[1][name + "_absmax"], atol=0, rtol=1e-6)
            apart = (states[0][name].int() - states[1][name].int()).abs()
            assert apart.max() <= 1 and (apart > 0).sum() <= max(1, n // 200), (step, name, (apart > 0).sum())
        torch.testing.assert_close(ours, ref)  # one rounding of the dtype


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_kernel_steps_as_the_reference_and_as_bitsandbytes():
    """On CUDA each 8-bit tensor's step is one kernel launch: 30 steps of LoRA-shaped weights stay as close to
    the PyTorch reference's (on the same GPU) as rounding allows, float32 and bfloat16 weights, and as close to
    float32 AdamW's as bitsandbytes' CUDA AdamW8bit stays (where it is installed)."""
    import bailong_kernels
    torch.manual_seed(0)
    shapes = [(128, 4096), (4099, 64), (30, 70)]  # 8-bit, 8-bit with a partial block, float32 moments
    start = [torch.randn(s, device="cuda") * 0.02 for s in shapes]
    scales = [torch.logspace(-3, 0, s[0] * s[1], device="cuda")[torch.randperm(s[0] * s[1], device="cuda")]
              .view(s) for s in shapes]
    gradients = [[(torch.randn(s, device="cuda") + 0.5) * c for s, c in zip(shapes, scales)] for _ in range(30)]

    def run(make, kernels=True, dtype=torch.float32):
        params = [torch.nn.Parameter(w.to(dtype, copy=True)) for w in start]
        optimizer, previous = make(params), bailong_kernels.use_kernels(kernels)
        try:
            for gs in gradients:
                for p, g in zip(params, gs):
                    p.grad = g.to(dtype)
                optimizer.step()
        finally:
            bailong_kernels.use_kernels(previous)
        return torch.cat([p.detach().float().flatten() for p in params])

    ours = lambda ps: AdamW8bit(ps, lr=1e-3)  # noqa: E731
    kernel, reference, exact = run(ours), run(ours, False), run(lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    moved = (exact - torch.cat([w.flatten() for w in start])).abs().mean()
    assert (kernel - reference).abs().mean() < 1e-3 * moved  # a code one apart here and there, nothing more
    assert (kernel - exact).abs().mean() < 0.25 * moved
    # bfloat16 weights: rounded to nearest by both (the interpreter truncates, so this is checked only here)
    assert (run(ours, dtype=torch.bfloat16) - run(ours, False, torch.bfloat16)).abs().mean() < 1e-2 * moved
    bnb = pytest.importorskip("bitsandbytes")
    theirs = run(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3))
    assert (kernel - exact).abs().mean() <= 1.1 * (theirs - exact).abs().mean()


@pytest.mark.gpu  # and interpreted without one
@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's numpy, squaring 1e25
@pytest.mark.parametrize("path", ["reference", pytest.param("kernel", marks=needs_triton)])
def test_a_gradient_whose_square_overflows_leaves_its_block_finite(path):
    """A gradient of 1e25 squares past float32: stored as a block's absmax, the infinity made every value of the
    block NaN (0 or inf over inf), and with them the weights at the next step; torch's AdamW keeps the infinity
    and steps that weight by 0 from then on. The second moment is stored at float32's largest and the first at
    0: the block stays finite, and that weight moves as torch's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if path == "kernel":
        from bailong_kernels import adamw8bit
    torch.manual_seed(0)
    ours = torch.randn(256, device=device)
    theirs = torch.nn.Parameter(ours.clone())
    state = AdamW8bit([torch.nn.Parameter(torch.zeros(256, device=device))], min_8bit_size=0)
    state = state._init_state(state.param_groups[0]["params"][0])
    reference = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for step in (1, 2, 3):
        g = torch.randn(256, device=device)
        g[5] = 1e25 if step == 1 else g[5]
        if path == "kernel":
            adamw8bit.adamw8bit_step(ours, g, state, tables(ours.device), step, 1e-2, 0.9, 0.999, 1e-8, 0.1, BLOCK)
        else:
            step_8bit(ours, g, state, step, 1e-2, 0.9, 0.999, 1e-8, 0.1)
        theirs.grad = g
        reference.step()
        if step == 1:
            torch.testing.assert_close(ours, theirs.detach())
        torch.testing.assert_close(ours[5], theirs.detach()[5])  # (not 115 away, as a first moment kept made it)
        assert ours.isfinite().all() and state["exp_avg_sq_absmax"].isfinite().all(), step
