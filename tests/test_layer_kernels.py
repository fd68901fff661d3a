"""The decoding step's and training's layer kernels against the model's own PyTorch code (on the GPU, or on
the CPU through the interpreter), and the launches a decoding step and a QLoRA training step make, as budgets.

Tolerances as in tests/test_kernels.py: float32 to ~1e-5, float16 to ~2e-3; bfloat16 where the interpreter's
rounding allows, the rest on the GPU (tests/test_gpu.py).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import WITHOUT_TRITON, needs_triton

pytestmark = needs_triton  # the kernels, interpreted


@pytest.mark.parametrize("part_positions", [512, 64, 32])  # the attention in one part, in 4, in 8 (some empty)
def test_decode_kernels_match_pytorch(monkeypatch, part_positions):
    """RMSNorm, SwiGLU and the one-token attention (RoPE, cache write, GQA; the cache read in one program a head,
    or cut into parts and merged) against the model's own PyTorch code; no kernel reads or writes outside its
    tensors."""
    from bounds import checked_bounds

    from bailong.config import preset
    from bailong.model import RMSNorm, apply_rope, rope_cos_sin
    from bailong_kernels import decode
    from bailong_kernels.decode import decode_attention, rms_norm, swiglu
    monkeypatch.setattr(decode, "PART_POSITIONS", part_positions)
    torch.manual_seed(0)
    for dtype, tol in [(torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.float16, dict(atol=2e-3, rtol=2e-3))]:
        norm = RMSNorm(100, 1e-5).to(dtype)
        torch.nn.init.normal_(norm.weight)
        x = torch.randn(3, 5, 100, dtype=dtype)
        for x in (x, x * 0.003):  # and rows of an embedding's size, where epsilon counts
            with torch.no_grad():
                torch.testing.assert_close(rms_norm(x, norm.weight, 1e-5), norm(x), **tol)
        gate, up = torch.randn(2, 1500, dtype=dtype), torch.randn(2, 1500, dtype=dtype)
        torch.testing.assert_close(swiglu(gate, up), F.silu(gate) * up, **tol)
        config = preset("tiny")
        config.head_dim = 24  # halves of 12, not a power of two
        B, H, KV, D, S = 2, 8, 2, config.head_dim, 200
        # no past, one, a whole block, blocks and a part, the last slot; scores in the hundreds (float32: the
        # softmax's maxima matter)
        for p, size in [(0, 1), (1, 1), (64, 1), (150, 1), (199, 1)] + [(150, 8)] * (dtype == torch.float32):
            k_cache, v_cache = torch.randn(B, KV, S, D, dtype=dtype) * size, torch.randn(B, KV, S, D, dtype=dtype)
            q, k, v = (torch.randn(B, 1, n * D, dtype=dtype) * s for n, s in [(H, size), (KV, size), (KV, 1)])
            positions = torch.tensor([p])
            cos, sin = rope_cos_sin(config, positions, dtype)
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            k_ref[:, :, p] = apply_rope(k.view(B, 1, KV, D).transpose(1, 2), cos, sin)[:, :, 0]
            v_ref[:, :, p] = v.view(B, KV, D)
            q_ref = apply_rope(q.view(B, 1, H, D).transpose(1, 2), cos, sin)
            ref = F.scaled_dot_product_attention(q_ref, k_ref[:, :, :p + 1], v_ref[:, :, :p + 1], enable_gqa=True)
            with checked_bounds():
                y = decode_attention(q, k, v, cos, sin, positions, k_cache, v_cache)
            torch.testing.assert_close(y, ref.transpose(1, 2).reshape(B, 1, H * D), **tol)
            torch.testing.assert_close(k_cache, k_ref, **tol)
            assert torch.equal(v_cache, v_ref)
        buffers = torch.randn(2, 2, B, KV, S, D, dtype=dtype)  # (k or v, layer, ...): a full cache of 2 layers
        before = buffers.clone()
        keys = torch.cat([buffers[0, 0], apply_rope(k.view(B, 1, KV, D).transpose(1, 2), cos, sin)], dim=2)
        values = torch.cat([buffers[1, 0], v.view(B, 1, KV, D).transpose(1, 2)], dim=2)
        ref = F.scaled_dot_product_attention(q_ref, keys, values, enable_gqa=True).transpose(1, 2)
        for p in [S, S + 70]:  # the new token past a full cache: attention over the S cached positions and its own
            with checked_bounds():
                y = decode_attention(q, k, v, cos, sin, torch.tensor([p]), buffers[0, 0], buffers[1, 0])
            assert torch.equal(buffers, before)  # nothing written past the end, into the next layer or anywhere
            torch.testing.assert_close(y, ref.reshape(B, 1, H * D), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_training_layer_kernels_match_the_models_pytorch_code(dtype):
    """RMSNorm (frozen weight), SwiGLU and RoPE, forward and backward, on rows that are not a power of two long
    and element counts that are not whole blocks, against autograd through the model's own code; RMSNorm's backward
    adding a residual's gradient, SwiGLU and RoPE reading columns of one tensor, RoPE in place."""
    from bailong.model import RMSNorm, apply_rope
    from bailong_kernels.layers import RMSNormFunction, rms_norm, rms_norm_backward, rope, rope_, swiglu
    from bailong.layer_fused import Ctx
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
    ctx, plus = Ctx(True, False, False), torch.randn(3, 7, 100, dtype=dtype)  # + a residual's gradient, one launch
    RMSNormFunction.forward(ctx, x.detach(), norm.weight, 1e-5)
    torch.testing.assert_close(rms_norm_backward(ctx, g, plus), (dx_ref.float() + plus.float()).to(dtype), **tol)
    gate, up = (torch.randn(5, 3001, dtype=dtype, requires_grad=True) for _ in range(2))
    g = torch.randn(5, 3001, dtype=dtype)
    ref = F.silu(gate) * up  # MLP.forward's own line
    out = swiglu(gate, up)
    torch.testing.assert_close(out, ref, **tol)
    d_ref = torch.autograd.grad(ref, (gate, up), g)
    for ours, theirs in zip(torch.autograd.grad(out, (gate, up), g), d_ref):
        torch.testing.assert_close(ours, theirs, **tol)
    both = torch.cat((gate, up, gate[:, :5]), 1).detach().requires_grad_()  # gate and up as columns of one tensor
    out = swiglu(both[:, :3001], both[:, 3001:6002])
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(torch.autograd.grad(out, both, g)[0][:, :6002], torch.cat(d_ref, 1), **tol)
    B, T, H, D = 2, 9, 3, 20  # halves of 10: not a power of two
    angles = torch.arange(T)[:, None] * 0.37 ** torch.arange(D // 2)[None]
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    x = torch.randn(B, T, H * D, dtype=dtype, requires_grad=True)
    g = torch.randn(B, T, H * D, dtype=dtype)
    ref = apply_rope(x.view(B, T, H, D).transpose(1, 2), cos, sin).transpose(1, 2).reshape(B, T, H * D)
    out = rope(x, cos, sin, D)
    torch.testing.assert_close(out, ref, **tol)
    dx = torch.autograd.grad(ref, x, g)[0]
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], dx, **tol)
    qkv = torch.cat((x, x, x), -1).detach()  # x as the first columns of one output (q of q, k, v)
    torch.testing.assert_close(rope(qkv[..., :H * D], cos, sin, D), ref, **tol)
    rope_(qkv[..., :H * D], cos, sin, D)  # in place, the rest untouched
    torch.testing.assert_close(qkv, torch.cat((ref.detach(), x.detach(), x.detach()), -1), **tol)
    with pytest.raises(ValueError, match="not evenly spaced"):  # rows a view cannot step through: refused
        rope_(qkv.transpose(0, 1).contiguous().transpose(0, 1)[..., :H * D], cos, sin, D)
    with pytest.raises(ValueError, match="rows overlap"):  # an expanded batch: its one row rotated B times
        rope_(x.detach()[:1, :1].clone().expand(B, 1, H * D), cos[:1], sin[:1], D)
    qkv[..., H * D:2 * H * D] = g
    rope_(qkv[..., H * D:2 * H * D], cos, sin, D, -1.0)  # the backward's rotation, in place
    torch.testing.assert_close(qkv[..., H * D:2 * H * D], dx, **tol)


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
            from test_step_graph import qlora_model
            model = qlora_model(torch.float32)
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
    decoding step's fused kernels, (``layer_kernels``) the training layer kernels and the fused LoRA's dropout
    kernels; all interpreted. The dequantize kernel takes 16,384 weights a program here: interpreted, each program
    costs about the same whatever its size (a graphed-step test took 102 s with small ones, 65 s so), and its own tests
    run it on several."""
    pytest.importorskip("triton", reason=WITHOUT_TRITON)
    from bailong import lora_fused, model, quantized
    from bailong_kernels import decode, dropout, layers, nf4_dequant
    monkeypatch.setattr(quantized, "kernels_take", lambda t: True)
    monkeypatch.setattr(nf4_dequant, "word_steps", lambda: (2048, 1, 1))
    monkeypatch.setattr(lora_fused, "seeded_dropout", lambda x: dropout if layer_kernels else None)
    monkeypatch.setattr(model, "decode_kernels", lambda x: decode if fused_step and not torch.is_grad_enabled()
                        else None)
    monkeypatch.setattr(model, "layer_kernels", lambda x: layers if layer_kernels and torch.is_grad_enabled()
                        else None)


def tiny_nf4(layers=2, quantized=True):
    """A tiny model in eval mode: float32 with NF4 projections (``quantized``), or float16 (the GEMV's dense loop
    takes 16-bit weights)."""
    import bailong
    from bailong.config import preset
    from bailong.model import init_weights
    from bailong.quantized import quantize_model
    config = preset("tiny")
    config.num_hidden_layers, config.intermediate_size = layers, 192  # every projection takes the GEMV kernel
    torch.manual_seed(0)
    model = init_weights(bailong.Llama(config)).eval()
    return quantize_model(model) if quantized else model.half()


@pytest.mark.parametrize("part_positions,quantized", [(512, True), (16, True), (512, False)])
def test_fused_decode_step_decodes_as_pytorch_does(monkeypatch, part_positions, quantized):
    """Greedy ids of the fused step equal PyTorch's: NF4 projections (the cache read by one program a head, or
    in parts) and dense ones (the GEMV's dense loop)."""
    from bailong.generation import GraphDecoder, Sampling, generate
    from bailong_kernels import decode
    monkeypatch.setattr(decode, "PART_POSITIONS", part_positions)
    greedy = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    model, prompt = tiny_nf4(1, quantized), list(range(3, 66))  # 63 tokens: the steps write positions 63..66
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


def test_the_fused_step_takes_only_the_weights_the_gemv_reads():
    """One GEMV launch takes bare NF4 projections quantized alike, or bare bias-free 16-bit linear layers in x's
    dtype; anything else (a bias, float32, LoRA, autocast, NF4 and dense mixed, a module without a weight) keeps
    its own forward."""
    from torch import nn

    from bailong.lora import LoRALinear
    from bailong_kernels import decode
    x = torch.randn(1, 1, 64, dtype=torch.float16)
    plain = nn.Linear(64, 32, bias=False).half()
    assert decode._one_launch_weights(x, (plain, plain)) is not None
    nf4 = tiny_nf4(1).model.layers[0].self_attn.q_proj
    assert decode._one_launch_weights(x.float(), (nf4,)) is not None
    with torch.autocast("cpu", dtype=torch.float16):
        assert decode._one_launch_weights(x, (plain,)) is None
    for x_, layers in [(x, (nn.Linear(64, 32).half(),)), (x.float(), (plain.float(),)),
                       (x, (LoRALinear(plain, 4, 1.0),)), (x.float(), (nf4, plain.float())), (x, (nn.Identity(),)),
                       (torch.randn(1, 5, 64, dtype=torch.float16), (plain,))]:
        assert decode._one_launch_weights(x_, layers) is None, layers


# Launches of one batch-1 decoding step of a 2-layer NF4 model on the GPU's path, and per layer: today's default
# (recorded when the GEMV kernel replaced the split-K kernels: one launch per projection instead of two) and with
# the fused decoding step switched on (13 a layer when recorded first; 9 since q/k/v and gate/up + SwiGLU are one
# GEMV launch each; 7 since o and down add the residual on the way out), and the fused step of a float16 model (its
# projections and head by the GEMV's dense loop; 2 more launches than float32 outside the layers, RoPE's angles cast
# to float16). Cut these as the step is fused further; never raise them without a reason.
DECODE_STEP_BUDGET = {(False, True): {"per layer": 36, "whole step": 97},
                      (True, True): {"per layer": 7, "whole step": 34},
                      (True, False): {"per layer": 7, "whole step": 36}}


@pytest.mark.parametrize("fused_step,quantized", list(DECODE_STEP_BUDGET))
def test_decode_step_launches_stay_within_budget(monkeypatch, fused_step, quantized):
    from launch_count import count_launches
    gpu_path(monkeypatch, fused_step)
    counts = {}
    for layers in [1, 2]:
        model = tiny_nf4(layers, quantized)
        cache = model.new_cache(1, 64, static=True)  # as the CUDA graph decoder runs it
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3]]), cache, last_only=True)
            with count_launches(monkeypatch) as launches:
                model(torch.tensor([[4]]), cache, last_only=True)
        # seven projections a layer: one launch each, or with the fused step q/k/v as one and gate/up as one; and
        # with the fused step the float16 model's head (the float32 one's stays a PyTorch matmul)
        gemv = ["_nf4_gemv_kernel"] * (3 if fused_step else 7) + ["_nf4_gemv_swiglu_kernel"] * fused_step
        head = ["_nf4_gemv_kernel"] * (fused_step and not quantized)
        assert sorted(n for n in launches.triton if "gemv" in n) == sorted(gemv * layers + head)
        counts[layers] = len(launches.aten) + len(launches.triton)
    per_layer = counts[2] - counts[1]
    print(f"decode step{' (fused)' if fused_step else ''}{'' if quantized else ', dense'}: {counts[2]} launches, "
          f"{per_layer} a layer")
    budget = DECODE_STEP_BUDGET[fused_step, quantized]
    assert per_layer <= budget["per layer"] and counts[2] <= budget["whole step"], counts


# Launches of one QLoRA training step (forward and backward, bf16 autocast, activation checkpointing, LoRA r = 8 on
# the seven projections, embedding and head) of a 2-layer NF4 model on the GPU's path, and per layer, by (fused LoRA,
# layer kernels, LoRA dropout): recorded before any training-side fusion (False, False), with each LoRA projection
# one autograd node (bailong.lora_fused.LoRAProjection: the frozen base's matmul inside, the scaling in the matmuls'
# alpha, the compute-dtype copies of every LoRA weight made in one multi-tensor copy a step, a node's LoRA gradients
# cast to float32 in one pass; q/k/v and gate/up one node each, LoRAShared, their dropout masks drawn in one launch;
# o and down add the residual in their base's matmul), with the training layer kernels as well (True, True). The
# goal was a third of the first count (382 / 3 = 127); the first fused counts were 238, 152 and 115. Since the
# recomputation stops before down's frozen matmul (its dequantization and matmul not made again), 2 fewer a layer
# on the plain path, 1 fewer fused (one more add of dL/dx). With the recomputation's dequantized weights kept for
# the backward (Llama.keep_dequantized, the last key: bailong.recompute), 6 dequantize launches fewer a layer.
# Fused, the recomputation no longer adds down's update onto the residual (1 fewer); with the layer kernels a
# layer written out by hand (bailong.layer_fused) forms down's dL/dh in one matmul (1 fewer). Those fused counts (210,
# 123, 109, 117) left out a kernel CUDA launches: an addmm into a new tensor copies its 2-d input there first
# (tests/launch_count.py now counts it); 22 or 23 a layer, so 232, 146, 132 and 140. With the LoRA updates and the
# base's dL/dx added into their matmuls' own outputs (addmm_), 214, 126, 112 and 120; with the residual stream's
# gradient added by the hand-written layer's RMSNorm backward kernels (2 adds fewer), 124, 110 and 118. With q, k, v
# and gate, up each one dequantize launch and one matmul (bailong_kernels.nf4_matmul, a tuple of weights; RoPE and
# SwiGLU reading their outputs' columns in place), 199, 109, 95 and 106. With the layer kernels, LoRA dropout's
# backward one kernel a node (bailong_kernels.dropout: the masks drawn again from their seed, summed in the same
# pass), 107 and 104. With q and k rotated in one launch where they lie side by side in q/k/v's output (the layer
# by hand, forward and recomputation), 105, 93 and 102. With the dropout kernels' seed drawn on the device once a
# forward (bailong.recompute.MaskSeeds: so a CUDA graph can hold a step with dropout), where the host read the
# generator before, one launch more a step, none a layer: 265 and 259 the step. With q/k/v's and gate/up's stacked
# LoRA A's views of one buffer, not copies (bailong.lora_casts.stacked), 197, 103, 91 and 100.
TRAIN_STEP_BUDGET = {(False, False, 0.05, False): {"per layer": 380, "whole step": 847},
                     (True, False, 0.05, False): {"per layer": 197, "whole step": 468},
                     (True, True, 0.05, False): {"per layer": 103, "whole step": 261},
                     (False, False, 0.0, False): {"per layer": 331, "whole step": 745},
                     (True, True, 0.0, False): {"per layer": 91, "whole step": 234},
                     (False, False, 0.05, True): {"per layer": 374, "whole step": 835},
                     (True, True, 0.05, True): {"per layer": 100, "whole step": 255}}


@pytest.mark.parametrize("fused_lora,layer_kernels,dropout,keep", list(TRAIN_STEP_BUDGET))
def test_training_step_launches_stay_within_budget(monkeypatch, fused_lora, layer_kernels, dropout, keep):
    from bailong import lora
    from launch_count import step_launches
    gpu_path(monkeypatch, fused_step=False, layer_kernels=layer_kernels)
    monkeypatch.setattr(lora, "_fused", fused_lora)
    counts = {layers: step_launches(monkeypatch, layers, dropout, keep) for layers in [1, 2]}
    per_layer = counts[2] - counts[1]
    print(f"training step (fused LoRA {fused_lora}, layer kernels {layer_kernels}, dropout {dropout}, kept "
          f"dequantized {keep}): {counts[2]} launches, {per_layer} a layer")
    budget = TRAIN_STEP_BUDGET[fused_lora, layer_kernels, dropout, keep]
    assert per_layer <= budget["per layer"] and counts[2] <= budget["whole step"], counts


def test_an_addmm_into_a_new_tensor_counts_its_copy():
    """tests/launch_count.py as CUDA launches: ``addmm`` with a 2-d input, into a new tensor, two kernels (the
    copy, the GEMM); in place, with beta 0, or with a 1-d bias, one."""
    from launch_count import Launches
    c, a, b = torch.randn(4, 5), torch.randn(4, 3), torch.randn(3, 5)
    for op, kernels in [(lambda: torch.addmm(c, a, b), 2), (lambda: c.clone().addmm_(a, b), 2),  # clone + GEMM
                        (lambda: torch.addmm(c, a, b, beta=0), 1), (lambda: torch.addmm(c[0], a, b), 1),
                        (lambda: torch.addmm(c, a, b, out=torch.empty(4, 5)), 2)]:
        with Launches() as launches:
            op()
        assert len(launches.aten) == kernels, launches.aten


@pytest.mark.parametrize("triton", [False, True])  # True: ptxas compiles the kernels met (seconds)
def test_host_time_benchmark_runs(triton):
    """bench/bench_host.py: a training step on the GPU's path with the Triton launches left out, every row; or
    (``--triton``) through Triton's own Python, the kernels compiled for sm_90 and launched into nothing."""
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no kernel runs at all
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_host.py"), "--steps", "2", "--rounds", "1",
                          "--dropout", "0.05"] + ["--triton"] * triton,
                         env=env, capture_output=True, text=True, timeout=600)
    if triton and "no NVIDIA backend tools" in out.stderr:
        pytest.skip(out.stderr.strip())
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("through Triton's Python" in out.stdout) == triton
    launched = re.search(r"Triton launches made, into nothing: ([\d,]+)", out.stdout)
    assert (launched is not None and int(launched[1].replace(",", "")) > 0) == triton, out.stdout  # they ran
    rows = re.findall(r"^\| (plain LoRA|fused LoRA|fused LoRA \+ layer kernels(?:, layers by hand)?) \| [\d.]+ ms \| "
                      r"[\d.]+ ms \| -?[\d.]+ ms \|$", out.stdout, re.M)
    assert rows == ["plain LoRA", "fused LoRA", "fused LoRA + layer kernels",
                    "fused LoRA + layer kernels, layers by hand"], out.stdout


@pytest.mark.parametrize("fused,one_at_a_time", [(False, False), (True, False), (True, True)])
def test_on_the_gpus_path_the_recomputation_keeps_its_dequantized_weights_for_the_backward(monkeypatch, fused,
                                                                                           one_at_a_time):
    """``Llama.keep_dequantized`` through the kernels (the dequantize kernel interpreted, NF4MatmulKernel; fused:
    with the layer kernels), bf16: each weight dequantized twice a step, the loss and LoRA gradients those of the
    step without, nothing kept after the backward (tests/test_step_count.py's check); also where the backward
    would dequantize a shared node's weights one at a time (``bailong.lora_fused.one_at_a_time``), since the
    copy kept of them together serves."""
    from bailong import lora_fused
    from test_step_count import check_kept
    monkeypatch.setattr(lora_fused, "_one_at_a_time", one_at_a_time)
    gpu_path(monkeypatch, fused_step=False, layer_kernels=fused)
    check_kept(monkeypatch, fused, dtype=torch.bfloat16, kernels=True)


@pytest.mark.parametrize("fused", [False, True])
def test_on_the_gpus_path_the_mlp_in_chunks_dequantizes_each_weight_once_a_way(monkeypatch, fused):
    """The MLP in chunks (``bailong.memory.ChunkedMLP``) through the kernels (the dequantize kernel interpreted,
    NF4MatmulKernel; fused: with the layer kernels, the recomputation's copies kept), bf16: gate, up and down
    dequantized once for the forward's chunks and once for the backward's, the loss and LoRA gradients those of
    autograd through the same chunks (tests/test_step_count.py's check)."""
    from test_step_count import check_chunked
    gpu_path(monkeypatch, fused_step=False, layer_kernels=fused)
    check_chunked(monkeypatch, fused, keep=fused, dtype=torch.bfloat16, kernels=True)
