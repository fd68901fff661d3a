"""Training on CUDA: the layer kernels' forward and backward at Llama-2-7B's shapes, and the memory and
speed paths (offloads, kept dequantizations, the MLP in chunks, dropout under autocast, layers by hand) as on
the CPU (skipped without a GPU)."""
import pytest
import torch

import bailong

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_training_layer_kernels_in_bfloat16_at_llama_shapes():  # RMSNorm, SwiGLU, RoPE, cross-entropy
    import torch.nn.functional as F

    import bailong_kernels
    from bailong.model import RMSNorm
    from bailong_kernels.layers import rms_norm, swiglu
    torch.manual_seed(0)
    close = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2  # noqa: E731
    norm = RMSNorm(4096, 1e-5).to("cuda", torch.bfloat16).requires_grad_(False)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    previous = bailong_kernels.use_layer_kernels(False)  # the model's own PyTorch code as the reference
    try:
        ref = norm(x)
    finally:
        bailong_kernels.use_layer_kernels(previous)
    ours = rms_norm(x, norm.weight, 1e-5)
    assert close(ours, ref) and close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    gate, up = (torch.randn(2048, 11008, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn_like(gate)
    ref, ours = F.silu(gate) * up, swiglu(gate, up)
    assert close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (gate, up), g), torch.autograd.grad(ref, (gate, up), g)):
        assert close(a, b)
    from bailong.config import preset
    from bailong.model import apply_rope, rope_cos_sin
    from bailong_kernels.layers import rope
    cos, sin = rope_cos_sin(preset("llama2-7b"), torch.arange(2048, device="cuda"), torch.bfloat16)
    x = torch.randn(2, 2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    ref = apply_rope(x.view(2, 2048, 32, 128).transpose(1, 2), cos, sin).transpose(1, 2).reshape(2, 2048, 4096)
    ours = rope(x, cos, sin, 128)
    assert close(ours, ref) and close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    from bailong_kernels.layers import cross_entropy_
    for vocab in [32000, 59241]:  # Llama 2's; Bailong's (rows not 16-byte aligned)
        logits = torch.randn(283, vocab, device="cuda", dtype=torch.bfloat16) * 4
        targets = torch.randint(0, vocab, (283,), device="cuda")
        targets[::7] = -100
        z = logits.float().requires_grad_()
        ref = F.cross_entropy(z, targets, ignore_index=-100, reduction="none")
        ref.sum().backward()
        loss = cross_entropy_(logits, targets)
        assert torch.allclose(loss, ref, atol=1e-4, rtol=1e-5) and close(logits, z.grad)


def test_offloaded_layer_inputs_on_cuda_train_alike():  # pinned host memory, the copy out on a side stream
    from test_model import offload_step
    (loss, grads, kept), (offloaded_loss, offloaded_grads, offloaded_kept) = offload_step("cuda", torch.bfloat16)
    assert kept == [True, True] and offloaded_kept == [False, False]
    assert loss == offloaded_loss
    for name in grads:  # the attention's backward may add in another order
        torch.testing.assert_close(grads[name], offloaded_grads[name], rtol=1e-2, atol=1e-4, msg=name)


@pytest.mark.parametrize("embedding_lora", [False, True])
def test_an_offloaded_embedding_on_cuda_trains_alike_and_leaves_the_device(embedding_lora):
    from bailong.config import preset
    from bailong.memory import offload_embedding
    from test_model import check_offloaded_embedding
    check_offloaded_embedding("cuda", embedding_lora)  # pinned host memory; rows gathered there, copied in
    model = bailong.Llama(preset("tiny")).cuda().requires_grad_(False)
    before = torch.cuda.memory_allocated()
    moved = offload_embedding(model)
    assert before - torch.cuda.memory_allocated() == moved > 0


@pytest.mark.parametrize("fused", [False, True])
def test_on_cuda_the_recomputation_keeps_its_dequantized_weights_for_the_backward(monkeypatch, fused):
    """The kernel path (dequantize kernel, cuBLAS) with ``Llama.keep_dequantized``, bf16: as on the CPU."""
    from test_step_count import check_kept
    check_kept(monkeypatch, fused, "cuda", torch.bfloat16)


@pytest.mark.parametrize("fused", [False, True])
def test_on_cuda_the_mlp_in_chunks_trains_as_autograd_through_the_chunks(monkeypatch, fused):
    """``bailong.memory.ChunkedMLP`` on the kernel path, bf16, dropout (the CUDA generator's state replayed in
    the backward; fused: the recomputation's copies kept): as on the CPU."""
    from test_step_count import check_chunked
    check_chunked(monkeypatch, fused, fused, "cuda", torch.bfloat16)


@pytest.mark.parametrize("chunked", [False, True])
def test_on_cuda_a_fused_step_with_torchs_dropout_under_autocast_runs_its_backward_outside_it(monkeypatch, chunked):
    """Fused LoRA, torch's dropout (the layer kernels off, as BAILONG_LAYER_KERNELS=0 sets them), bf16 autocast as
    train.py runs it,
    checkpointing, the MLP whole or in chunks: the backward through each recomputation runs outside autocast, as
    autograd's does (under CUDA's autocast a backward's sum returned float32, and the first backward failed on
    dtypes; the CPU's autocast keeps bf16, tests/test_chunked_mlp.py), every LoRA gradient formed and finite."""
    import bailong_kernels
    from bailong.lora_fused import LoRAShared
    from test_step_count import nf4_step
    monkeypatch.setattr(bailong_kernels, "_layer_kernels", False)
    autocast, backward = [], LoRAShared.backward
    monkeypatch.setattr(LoRAShared, "backward", staticmethod(
        lambda ctx, *gs: autocast.append(torch.is_autocast_enabled("cuda")) or backward(ctx, *gs)))
    _, loss, grads, _ = nf4_step(monkeypatch, True, False, "cuda", torch.float32, autocast=True, chunked=chunked)
    assert autocast and not any(autocast) and len(grads) == 28
    assert all(g is not None and g.isfinite().all() for g in grads.values()) and loss == loss


@pytest.mark.parametrize("keep", [False, True])
def test_on_cuda_a_layer_written_out_by_hand_trains_as_autograd_does(monkeypatch, keep):
    """``bailong.layer_fused`` on the kernels, a bf16 model under bf16 autocast as train.py runs it, dropout (the
    recomputation's copies kept or not): the same loss and dequantizations as the layer through autograd, the
    LoRA gradients to bf16 rounding."""
    from test_layer_fused import check_by_hand
    check_by_hand(monkeypatch, keep, "cuda", torch.bfloat16, autocast=True)
