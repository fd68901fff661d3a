"""Triton kernels against the PyTorch reference: on the GPU, or on the CPU through the interpreter.

Tolerances: float32 sums in float32, so only summation order differs (atol
1e-4 on outputs of size ~10); float16 operands round the dequantized weight to
11 bits (relative error of the result ~1e-3, checked at 5e-3). bfloat16 is
checked on the GPU only (tests/test_gpu.py): the interpreter's float32-to-bfloat16
rounding differs from the hardware's. The decoding step's fused kernels are
checked against the model's own PyTorch code, and their launches counted.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bailong.nf4 import BLOCKSIZES, quantize
from conftest import ROOT
from bailong_kernels import nf4_matmul as m
from bailong_kernels.nf4_dequant import nf4_dequantize
from bailong_kernels.nf4_matmul import nf4_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3)}


def reference(x, q, dy):
    x = x.detach().clone().requires_grad_(True)
    y = F.linear(x, q.dequantize(x.dtype))
    y.backward(dy)
    return y, x.grad


def check(M, N, K, blocksize=64, double_quant=True, dtype=torch.float32, lead=()):
    torch.manual_seed(M * 1000 + N + K)
    q = quantize(torch.randn(N, K, device=DEVICE), blocksize, double_quant)
    x = torch.randn(*lead, M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    y = nf4_matmul(x, q)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref = reference(x, q, dy)
    scale = y_ref.abs().max().item() + 1e-6
    torch.testing.assert_close(y / scale, y_ref / scale, **TOL[dtype])
    torch.testing.assert_close(x.grad / scale, dx_ref / scale, **TOL[dtype])


@pytest.mark.parametrize("M", [1, 3, 16, 37])
@pytest.mark.parametrize("N,K", [(40, 72), (33, 130), (17, 96), (33, 128), (40, 192)])
def test_odd_shapes(M, N, K):
    check(M, N, K)  # N not a multiple of the tiles; K a whole number of blocks (the fast path) or not


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_blocksize(blocksize, double_quant):
    check(5, 24, 200, blocksize, double_quant)  # rows cut across blocks: the generic path
    check(5, 24, 2 * blocksize, blocksize, double_quant)  # rows of whole blocks: the fast path


def test_float16_and_leading_dimensions():
    check(2, 24, 1100, dtype=torch.float16)  # rows of W not whole blocks: dequantize, then matmul
    check(2, 24, 1280, dtype=torch.float16)  # the GEMV kernel
    check(20, 32, 96, dtype=torch.float16, lead=(2, 3))


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_kernel_is_exact(double_quant):
    for shape in [(33, 130), (300, 256)]:  # the second: over 256 blocks, so several nested absmax
        q = quantize(torch.randn(*shape, device=DEVICE), 64, double_quant)
        for dtype in [torch.float32, torch.float16]:
            assert torch.equal(nf4_dequantize(q, dtype), q.dequantize(dtype))


@pytest.mark.parametrize("M", [1, 2, 5, 16])
def test_every_gemv_tile_under_the_interpreter(M):
    """The GPU's tiles (up to 1024 columns a step, 16 rows of W), not only the interpreter's small one."""
    from bounds import checked_bounds
    torch.manual_seed(M)
    for N, K, blocksize in [(37, 1536, 64), (20, 1024, 256)]:  # K past one tile and not a whole number of them
        q = quantize(torch.randn(N, K), blocksize)
        x = torch.randn(M, K)
        ref = x @ q.dequantize().T
        for tile in m.gemv_tiles(M):
            with checked_bounds():
                y = m.gemv(x, q, tile)
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_the_at_end_loop_on_every_blocksize(blocksize, double_quant):
    """The loop that sums across threads once at the end: a thread's words in one block or in several, K a whole
    number of steps or not, shorter than a step, rows of W past a whole number of tiles."""
    from bounds import checked_bounds
    torch.manual_seed(blocksize)
    for K in [2 * blocksize] + [1536] * (1536 % blocksize == 0):
        q = quantize(torch.randn(19 if blocksize <= 256 else 5, K), blocksize, double_quant)
        for M in [1, 3]:
            x = torch.randn(M, K)
            for tile in [(2, 512, 1, True), (1, 256, 2, True), (4, 2048, 1, True)]:
                with checked_bounds():  # the loop masks nothing but a partial last step
                    y = m.gemv(x, q, tile)
                torch.testing.assert_close(y, x @ q.dequantize().T, atol=1e-4, rtol=1e-4, msg=f"K={K} M={M} {tile}")


@pytest.mark.parametrize("at_end", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_projections_that_read_the_same_x_in_one_launch(at_end, dtype):
    """q, k, v (GQA: k and v narrower) in one launch; gate and up with SwiGLU on the way out; o with the residual
    added on the way out; against the model's PyTorch code on the dequantized weights."""
    torch.manual_seed(0)
    K = 512
    q, k, v = (quantize(torch.randn(n, K)) for n in (40, 24, 24))
    gate, up = quantize(torch.randn(44, K)), quantize(torch.randn(44, K))
    from bounds import checked_bounds
    tile = (2, 256, 1, at_end)
    for M in [1, 2, 4]:
        x = torch.randn(M, K, dtype=dtype)
        residual = torch.randn(M, 40, dtype=dtype) * 10
        with checked_bounds():
            outs = m.gemv_group(x, [q, k, v], tile)
            gated_out = m.gemv_swiglu(x, gate, up, tile)
            added = m.gemv(x, q, tile, residual=residual)
        expected = residual + F.linear(x, q.dequantize(dtype))  # the product rounded, then the sum
        torch.testing.assert_close(added / expected.abs().max(), expected / expected.abs().max(), **TOL[dtype])
        for out, w in zip(outs, (q, k, v)):
            ref = F.linear(x, w.dequantize(dtype))
            scale = ref.abs().max()
            torch.testing.assert_close(out / scale, ref / scale, **TOL[dtype])
        gated = F.silu(F.linear(x, gate.dequantize(dtype))) * F.linear(x, up.dequantize(dtype))
        scale = gated.abs().max()
        torch.testing.assert_close(gated_out / scale, gated / scale, **TOL[dtype])


def test_up_to_4_rows_take_the_gemv_kernel_more_take_cublas(monkeypatch):
    ran = []
    monkeypatch.setattr(m, "gemv", lambda x, q: ran.append("gemv") or x @ q.dequantize(x.dtype).T)
    monkeypatch.setattr(m, "dequant_matmul", lambda x, q: ran.append("dequant") or x @ q.dequantize(x.dtype).T)
    q = quantize(torch.randn(24, 128))
    for M in [1, 4, 5]:
        m.nf4_matmul_forward(torch.randn(M, 128), q)
    m.nf4_matmul_forward(torch.randn(1, 100), quantize(torch.randn(24, 100)))  # rows of W not whole blocks
    assert m.nf4_matmul_forward(torch.randn(0, 128), q).shape == (0, 24)  # no rows
    assert ran == ["gemv", "gemv", "dequant", "dequant", "dequant"]


def test_autocast_computes_in_its_dtype_as_linear_does():
    q = quantize(torch.randn(24, 64, device=DEVICE))
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = nf4_matmul(x, q)
        assert y.dtype == F.linear(x, q.dequantize()).dtype == torch.float16
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), x.detach() @ q.dequantize().T, **TOL[torch.float16])


def test_bad_input():
    q = quantize(torch.randn(8, 64, device=DEVICE))
    with pytest.raises(ValueError, match="x has 32 features; the weight expects 64"):
        nf4_matmul(torch.randn(2, 32, device=DEVICE), q)


def test_benchmark_script_runs_at_tiny_sizes():
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_nf4_matmul.py"), "--tiny"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gemv us" in result.stdout and "dequantize to float16: kernel" in result.stdout
    assert "best at-end" in result.stdout and "q, k, v" in result.stdout and "gate, up, SwiGLU" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.strip().startswith("40x128 ")]) == 2


@pytest.mark.slow  # about 15 s on 2 cores: CI runs it after the README's test command
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA machine compiles the kernels in every GPU test")
def test_every_kernel_configuration_compiles_for_hopper_and_ampere():
    """The interpreter does not run the compiler: compile every kernel as the wrappers launch it,
    for sm_90 and sm_80, with Triton's bundled ptxas (no GPU needed)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "check_kernels_compile.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    if "no NVIDIA backend tools" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = result.stdout.splitlines()
    header = [h.strip() for h in next(line for line in lines if line.startswith("| arch")).strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines
            if line.startswith("| sm_")]
    assert len(rows) > 40
    for row in rows:  # x and the packed weight are read in wide loads
        assert int(row["vector_loads"]) >= 2 or "scalar loads" in row["case"], row
    at_end = [float(r["loop_instr_per_weight"]) for r in rows if "at_end=True" in r["config"]
              and r["config"].startswith("block_m=1,")]  # one row of x, as each-step's count
    each_step = [float(r["loop_instr_per_weight"]) for r in rows if "at_end=False" in r["config"]
                 and r["loop_instr_per_weight"] != "-" and r["case"].startswith("bf")]  # bf16 x, as at_end's
    assert at_end and max(at_end) < 0.6 * min(each_step)  # the point of the at-end loop


def test_decode_kernels_match_pytorch():
    """RMSNorm, SwiGLU and the one-token attention (RoPE, cache write, GQA) against the model's own PyTorch code."""
    from bailong.config import preset
    from bailong.model import RMSNorm, apply_rope, rope_cos_sin
    from bailong_kernels.decode import decode_attention, rms_norm, swiglu
    torch.manual_seed(0)
    for dtype, tol in [(torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.float16, dict(atol=2e-3, rtol=2e-3))]:
        norm = RMSNorm(100, 1e-5).to(dtype)
        torch.nn.init.normal_(norm.weight)
        x = torch.randn(3, 5, 100, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm(x), **tol)
        gate, up = torch.randn(2, 1500, dtype=dtype), torch.randn(2, 1500, dtype=dtype)
        torch.testing.assert_close(swiglu(gate, up), F.silu(gate) * up, **tol)
        config = preset("tiny")
        config.head_dim = 24  # halves of 12, not a power of two
        B, H, KV, D, S = 2, 8, 2, config.head_dim, 200
        for p in [0, 1, 64, 150, 199]:  # no past, one, a whole block, blocks and a part, the last slot
            k_cache, v_cache = torch.randn(B, KV, S, D, dtype=dtype), torch.randn(B, KV, S, D, dtype=dtype)
            q, k, v = (torch.randn(B, 1, n * D, dtype=dtype) for n in (H, KV, KV))
            positions = torch.tensor([p])
            cos, sin = rope_cos_sin(config, positions, dtype)
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            k_ref[:, :, p] = apply_rope(k.view(B, 1, KV, D).transpose(1, 2), cos, sin)[:, :, 0]
            v_ref[:, :, p] = v.view(B, KV, D)
            q_ref = apply_rope(q.view(B, 1, H, D).transpose(1, 2), cos, sin)
            ref = F.scaled_dot_product_attention(q_ref, k_ref[:, :, :p + 1], v_ref[:, :, :p + 1], enable_gqa=True)
            y = decode_attention(q, k, v, cos, sin, positions, k_cache, v_cache)
            torch.testing.assert_close(y, ref.transpose(1, 2).reshape(B, 1, H * D), **tol)
            torch.testing.assert_close(k_cache, k_ref, **tol)
            assert torch.equal(v_cache, v_ref)
        buffers = torch.randn(2, 2, B, KV, S, D, dtype=dtype)  # (k or v, layer, ...): a full cache of 2 layers
        before = buffers.clone()
        decode_attention(q, k, v, cos, sin, torch.tensor([S]), buffers[0, 0], buffers[1, 0])
        assert torch.equal(buffers, before)  # nothing written past the end, into the next layer or anywhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_training_layer_kernels_match_the_models_pytorch_code(dtype):
    """RMSNorm (frozen weight), SwiGLU and RoPE, forward and backward, on rows that are not a power of two long
    and element counts that are not whole blocks, against autograd through the model's own code."""
    from bailong.model import RMSNorm, apply_rope
    from bailong_kernels.layers import rms_norm, rope, swiglu
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
           torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]  # one rounding step of each
    torch.manual_seed(0)
    norm = RMSNorm(100, 1e-5).to(dtype).requires_grad_(False)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 100, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 7, 100, dtype=dtype)
    y_ref = norm(x)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    y = rms_norm(x, norm.weight, 1e-5)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    gate, up = (torch.randn(5, 3001, dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(5, 3001, dtype=dtype)
    ref = F.silu(gate) * up  # MLP.forward's own line
    out = swiglu(gate, up)
    torch.testing.assert_close(out, ref, **tol)
    for ours, theirs in zip(torch.autograd.grad(out, (gate, up), g), torch.autograd.grad(ref, (gate, up), g)):
        torch.testing.assert_close(ours, theirs, **tol)
    B, T, H, D = 2, 9, 3, 20  # halves of 10: not a power of two
    angles = torch.arange(T)[:, None] * 0.37 ** torch.arange(D // 2)[None]
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    x = torch.randn(B, T, H * D, dtype=dtype, requires_grad=True)
    g = torch.randn(B, T, H * D, dtype=dtype)
    ref = apply_rope(x.view(B, T, H, D).transpose(1, 2), cos, sin).transpose(1, 2).reshape(B, T, H * D)
    out = rope(x, cos, sin, D)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_cross_entropy_kernel_gives_pytorchs_loss_and_gradient(monkeypatch, dtype):
    """Rows of 1000 logits swept in blocks of 64 (not a whole number of them) and rows shorter than a block;
    rows whose target is -100 give 0 and a zero gradient. The gradient, written over the logits, is the one
    F.cross_entropy on float32 logits sends back to logits of their dtype."""
    from bailong_kernels import layers
    monkeypatch.setattr(layers, "CROSS_ENTROPY_BLOCK", 64)
    torch.manual_seed(0)
    for V in [1000, 37]:
        logits = (torch.randn(6, V) * 4).to(dtype)
        targets = torch.tensor([0, V - 1, -100, 5, -100, 17])
        z = logits.float().requires_grad_()
        ref = F.cross_entropy(z, targets, ignore_index=-100, reduction="none")
        ref.sum().backward()
        ours = logits.clone()
        loss = layers.cross_entropy_(ours, targets)
        torch.testing.assert_close(loss, ref.detach(), atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(ours, z.grad.to(dtype), atol=1e-6 if dtype == torch.float32 else 0, rtol=0 if
                                   dtype == torch.float32 else 1e-2)
        assert loss[2] == loss[4] == 0 and not ours[2].any() and not ours[4].any()


@pytest.mark.parametrize("chunked_loss", [False, True])
def test_training_with_the_layer_kernels_equals_pytorch(monkeypatch, chunked_loss):
    """A QLoRA step (LoRA on every projection, embedding and head; checkpointing) with the norms, SwiGLU, RoPE
    and (``chunked_loss``: the loss in chunks of 7 positions) the cross-entropy through the kernels, against
    PyTorch on the whole logits: the loss and every LoRA gradient, float32."""
    from bailong import lora
    from bailong import memory
    from bailong_kernels import layers
    results = []
    for layer_kernels in [False, True]:
        with monkeypatch.context() as patch:
            gpu_path(patch, fused_step=False, layer_kernels=layer_kernels)
            if layer_kernels and chunked_loss:
                patch.setattr(memory, "_chunked_loss", True)
                patch.setattr(memory, "LOSS_CHUNK_LOGITS", 7 * 512)
                patch.setattr(layers, "CROSS_ENTROPY_BLOCK", 128)
            model = tiny_nf4()
            torch.manual_seed(1)
            lora.mark_only_lora_trainable(lora.inject_lora(model, lora.LoRAConfig(r=4, dropout=0.0)))
            for name, p in model.named_parameters():
                if "lora_B" in name or "lora_embedding_A" in name:
                    torch.nn.init.normal_(p, std=0.02)
            model.checkpointing = True
            model.train()
            ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
            loss = model(ids[:, :-1], targets=ids[:, 1:])
            loss.backward()
            results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (kernels, kernel_grads) = results
    assert abs(plain - kernels) < 1e-5 and len(plain_grads) == 32
    for name in plain_grads:
        torch.testing.assert_close(kernel_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def gpu_path(monkeypatch, fused_step, layer_kernels=False):
    """Run the model on the CPU as it runs on CUDA: NF4 projections through the kernels, (``fused_step``) the
    decoding step's fused kernels, (``layer_kernels``) the training layer kernels; all interpreted."""
    from bailong import lora, model, quantized
    from bailong_kernels import decode, layers
    for module in (quantized, lora):
        monkeypatch.setattr(module, "nf4_linear", lambda x, w: nf4_matmul(x, w))
    monkeypatch.setattr(lora, "nf4_dequantized", lambda w, dtype: nf4_dequantize(w, dtype))
    monkeypatch.setattr(model, "decode_kernels", lambda x: decode if fused_step and not torch.is_grad_enabled()
                        else None)
    monkeypatch.setattr(model, "layer_kernels", lambda x: layers if layer_kernels and torch.is_grad_enabled()
                        else None)


def tiny_nf4(layers=2):
    import bailong
    from bailong import quantized
    from bailong.config import preset
    from bailong.model import init_weights
    config = preset("tiny")
    config.num_hidden_layers, config.intermediate_size = layers, 192  # every projection takes the GEMV kernel
    torch.manual_seed(0)
    return quantized.quantize_model(init_weights(bailong.Llama(config)).eval())


def test_fused_decode_step_decodes_as_pytorch_does(monkeypatch):
    from bailong.generation import GraphDecoder, Sampling, generate
    greedy = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    model, prompt = tiny_nf4(layers=1), list(range(3, 66))  # 63 tokens: the steps write positions 63..66
    gpu_path(monkeypatch, fused_step=False)
    expected = generate(model, prompt, 5, greedy, stop_ids=[])  # past one 64-position block of the cache
    gpu_path(monkeypatch, fused_step=True)
    assert generate(model, prompt, 5, greedy, stop_ids=[]) == expected  # the growing cache
    decoder = GraphDecoder(model, 128, graph=False)  # the static cache the CUDA graph replays
    logits, ids = decoder.prefill(torch.tensor([prompt])), []
    for _ in range(5):
        ids.append(int(logits[0].argmax()))
        logits = decoder.step(ids[-1])
    assert ids == expected


# Launches of one batch-1 decoding step of a 2-layer NF4 model on the GPU's path, and per layer: today's default
# (recorded when the GEMV kernel replaced the split-K kernels: one launch per projection instead of two) and with
# the fused decoding step switched on (13 a layer when recorded first; 9 since q/k/v and gate/up + SwiGLU are one
# GEMV launch each; 7 since o and down add the residual on the way out). Cut these as the step is fused further;
# never raise them without a reason.
DECODE_STEP_BUDGET = {False: {"per layer": 36, "whole step": 97}, True: {"per layer": 7, "whole step": 34}}


@pytest.mark.parametrize("fused_step", [False, True])
def test_decode_step_launches_stay_within_budget(monkeypatch, fused_step):
    from launch_count import count_launches
    gpu_path(monkeypatch, fused_step)
    counts = {}
    for layers in [1, 2]:
        model = tiny_nf4(layers)
        cache = model.new_cache(1, 64, static=True)  # as the CUDA graph decoder runs it
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3]]), cache, last_only=True)
            with count_launches(monkeypatch) as launches:
                model(torch.tensor([[4]]), cache, last_only=True)
        # seven projections a layer: one launch each, or with the fused step q/k/v as one and gate/up as one
        gemv = ["_nf4_gemv_kernel"] * (3 if fused_step else 7) + ["_nf4_gemv_swiglu_kernel"] * fused_step
        assert sorted(n for n in launches.triton if "gemv" in n) == sorted(gemv * layers)
        counts[layers] = len(launches.aten) + len(launches.triton)
    per_layer = counts[2] - counts[1]
    print(f"decode step{' (fused)' if fused_step else ''}: {counts[2]} launches, {per_layer} a layer")
    budget = DECODE_STEP_BUDGET[fused_step]
    assert per_layer <= budget["per layer"] and counts[2] <= budget["whole step"], counts


# Launches of one QLoRA training step (forward and backward, bf16 autocast, activation checkpointing, LoRA r = 8 on
# the seven projections, embedding and head) of a 2-layer NF4 model on the GPU's path, and per layer, by (fused LoRA,
# layer kernels, LoRA dropout): recorded before any training-side fusion (False, False), with each LoRA projection
# one autograd node (bailong.lora.LoRAProjection: the frozen base's matmul inside, the scaling in the matmuls'
# alpha, the compute-dtype copies of every LoRA weight made in one multi-tensor copy a step, a node's LoRA gradients
# cast to float32 in one pass; without dropout, q/k/v and gate/up one node each, LoRAShared), with the training layer
# kernels as well (True, True).
TRAIN_STEP_BUDGET = {(False, False, 0.05): {"per layer": 382, "whole step": 851},
                     (True, False, 0.05): {"per layer": 238, "whole step": 551},
                     (True, True, 0.05): {"per layer": 152, "whole step": 359},
                     (False, False, 0.0): {"per layer": 333, "whole step": 749},
                     (True, True, 0.0): {"per layer": 115, "whole step": 283}}


@pytest.mark.parametrize("fused_lora,layer_kernels,dropout", list(TRAIN_STEP_BUDGET))
def test_training_step_launches_stay_within_budget(monkeypatch, fused_lora, layer_kernels, dropout):
    from bailong import lora
    from launch_count import count_launches
    gpu_path(monkeypatch, fused_step=False, layer_kernels=layer_kernels)
    monkeypatch.setattr(lora, "_fused", fused_lora)
    counts = {}
    for layers in [1, 2]:
        model = tiny_nf4(layers)
        lora.mark_only_lora_trainable(lora.inject_lora(model.to(torch.bfloat16), lora.LoRAConfig(r=8, dropout=dropout)))
        model.checkpointing = True  # as train.py runs on CUDA
        model.train()
        ids = torch.randint(0, model.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(0))
        with count_launches(monkeypatch) as launches:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as train.py on CUDA: the compute dtype
                logits = model(ids[:, :-1])
            targets = ids[:, 1:]  # train.py's loss: summed over the batch's tokens, divided by their count
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="sum") / (targets != -100).sum().clamp(min=1)
            loss.backward()
        counts[layers] = len(launches.aten) + len(launches.triton)
    per_layer = counts[2] - counts[1]
    print(f"training step (fused LoRA {fused_lora}, layer kernels {layer_kernels}, dropout {dropout}): {counts[2]} "
          f"launches, {per_layer} a layer")
    budget = TRAIN_STEP_BUDGET[fused_lora, layer_kernels, dropout]
    assert per_layer <= budget["per layer"] and counts[2] <= budget["whole step"], counts
