"""What a QLoRA step computes, counted: its matmul FLOPs on the meta device (bench/bench_train.py --count) and
the weights a real NF4 step dequantizes, against the recipe's own count, plain and fused LoRA."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def recipe_passes(layer, i):
    """How often a QLoRA step multiplies by projection i (q k v o gate up down) of ``layer``: forward, in the
    checkpointed recomputation (not down, the layer's last: the recomputation stops once it has made what the
    backward keeps) and for dL/dx (not layer 0's q, k and v: the embedding trains nothing)."""
    return 1 + (i < 6) + (layer > 0 or i > 2)


def projection_shapes(c):
    """(in, out) of q k v o gate up down for a config."""
    C, F, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    return [(C, C), (C, kv), (C, kv), (C, C), (C, F), (C, F), (F, C)]


@pytest.mark.parametrize("fused", ["0", "1"])
def test_a_counted_step_does_the_matmuls_of_the_recipe_and_no_more(fused):
    """bench_train.py --count: one QLoRA step's matmul FLOPs, counted on the meta device (a dense base), plain
    and fused LoRA, against the recipe's own count: each projection's x W^T as often as ``recipe_passes`` says;
    the LoRA matmuls (two forward and again, four backward); the head's forward and g W."""
    from bailong.config import preset
    layers, T, r = 2, 64, 8
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--preset", "tinyllama-1.1b",
                          "--layers", str(layers), "--seq-len", str(T), "--batch", "1", "--rank", str(r), "--count"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "BAILONG_FUSED_LORA": fused})
    assert out.returncode == 0, out.stderr[-2000:]
    c = preset("tinyllama-1.1b")
    flops = 2 * c.hidden_size * c.vocab_size * 2  # the head: forward, dL/dh
    for layer in range(layers):
        for i, (n_in, n_out) in enumerate(projection_shapes(c)):
            dx = layer > 0 or i > 2
            flops += 2 * n_in * n_out * recipe_passes(layer, i)
            # LoRA: x A^T and (x A^T) B^T, twice (fused, down's second (x A^T) B^T skipped: its sum onto the
            # residual, which no one reads, is all it makes); backward g B, dL/dB, dL/dA, and dL/dx
            skipped = fused == "1" and i == 6
            flops += 2 * r * (n_in * 2 + n_out * (2 - skipped)) + 2 * r * (2 * n_out + n_in + n_in * dx)
    assert json.loads(out.stdout.splitlines()[-1])["matmul_flops"] == T * flops, out.stdout


def nf4_step(monkeypatch, fused, keep, device="cpu", dtype=torch.float32, autocast=False, wanted=None,
             kernels=False, chunked=False, keep_attention=False):
    """One QLoRA step of a small NF4 model (2 layers), activation checkpointing on, plain or fused LoRA, the
    recomputation's dequantized weights kept for the backward or not (``keep``; ``keep_attention``: attention's
    output, ``bailong.layer_fused``), (``autocast``) under bf16 autocast,
    (``chunked``) the MLP in chunks of 6 tokens: the number of weights each dequantization expanded (the
    reference's, and on CUDA or where the caller routed the projections through the kernels, ``kernels``, the
    kernel's), the loss and the LoRA gradients (``wanted``: of the parameters whose names it accepts only, by
    ``torch.autograd.grad``)."""
    import bailong
    from bailong import lora, memory
    from bailong.config import preset
    from bailong.model import init_weights
    from bailong.nf4 import NF4Tensor
    from bailong.quantized import quantize_model
    c = preset("tiny")
    c.num_hidden_layers = 2
    torch.manual_seed(0)
    model = quantize_model(init_weights(bailong.Llama(c)).to(dtype)).to(device)
    lora.mark_only_lora_trainable(lora.inject_lora(model, lora.LoRAConfig(r=4, targets=lora.PROJECTIONS)))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 would leave A's gradients 0
            torch.nn.init.normal_(p, std=0.1)
    model.checkpointing, model.keep_dequantized, model.keep_attention = True, keep, keep_attention
    model.train()
    dequantized, dequantize = [], NF4Tensor.dequantize
    if not kernels:  # routed through the kernels, a step must not dequantize by the reference at all
        monkeypatch.setattr(NF4Tensor, "dequantize",
                            lambda q, *args, **kwargs: dequantized.append(q.numel) or dequantize(q, *args, **kwargs))
    if device == "cuda" or kernels:
        from bailong_kernels import nf4_matmul
        kernel = nf4_matmul.dequantize  # every dequantization the model's path makes, of a weight or of a tuple
        monkeypatch.setattr(nf4_matmul, "dequantize", lambda q, dtype: dequantized.append(
            sum(w.numel for w in q) if isinstance(q, tuple) else q.numel) or kernel(q, dtype))
    monkeypatch.setattr(lora, "_fused", fused)
    monkeypatch.setattr(memory, "_chunked_mlp", chunked)
    monkeypatch.setattr(memory, "MLP_CHUNK_VALUES", 6 * c.intermediate_size)  # 16 tokens: 6, 6 and 4
    ids = torch.randint(0, c.vocab_size, (1, 17), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    if wanted is None:
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    else:
        named = {n: p for n, p in model.named_parameters() if p.requires_grad and wanted(n)}
        grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    return dequantized, loss.item(), grads, c


@pytest.mark.parametrize("fused", [False, True])
def test_an_nf4_step_dequantizes_each_weight_as_often_as_the_recipe_multiplies_by_it(monkeypatch, fused):
    """A real QLoRA step of a small NF4 model on the CPU, plain and fused LoRA, activation checkpointing: the
    weights dequantized are those ``recipe_passes`` counts (what bench_train.py --count assumes)."""
    dequantized, _, _, c = nf4_step(monkeypatch, fused, keep=False)
    assert sum(dequantized) == sum(n_in * n_out * recipe_passes(layer, i) for layer in range(2)
                                   for i, (n_in, n_out) in enumerate(projection_shapes(c)))


@pytest.mark.parametrize("fused", [False, True])
def test_kept_from_the_recomputation_each_weight_is_dequantized_once_less_and_the_step_is_the_same(
        monkeypatch, fused):
    """``Llama.keep_dequantized`` (bailong.recompute): the backward's g W takes the copy the recomputation made
    wherever the recomputation multiplied by W (all but down), so a weight is dequantized once for the forward,
    once for the recomputation, and only down again for dL/dx; the loss and every LoRA gradient are the same,
    bit for bit, and no copy outlives the backward."""
    check_kept(monkeypatch, fused)


def test_one_at_a_time_the_recomputations_kept_copies_still_serve(monkeypatch):
    """With a shared node's weights dequantized one at a time in its backward (``bailong.lora_fused.one_at_a_time``,
    as ``--casts-by-layer`` sets it), the copies the recomputation kept are still the ones the backward takes."""
    from bailong import lora_fused
    monkeypatch.setattr(lora_fused, "_one_at_a_time", True)
    check_kept(monkeypatch, True)


def check_kept(monkeypatch, fused, device="cpu", dtype=torch.float32, kernels=False):
    from bailong import recompute
    dequantized, loss, grads, c = nf4_step(monkeypatch, fused, True, device, dtype, kernels=kernels)
    # each weight twice: forward and recomputation (whose copy the backward takes), or down: forward and backward
    assert sum(dequantized) == 2 * 2 * sum(n_in * n_out for n_in, n_out in projection_shapes(c))  # 2 layers
    assert recompute._kept == {}
    _, plain_loss, plain_grads, _ = nf4_step(monkeypatch, fused, False, device, dtype, kernels=kernels)
    assert loss == plain_loss and grads.keys() == plain_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        if device == "cpu":
            assert torch.equal(grad, plain_grads[name]), name
        else:  # the attention kernel's backward may add in another order
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-2, atol=1e-4, msg=name)


def test_no_kept_copy_outlives_its_backward_and_under_autocast_none_is_made_in_vain(monkeypatch):
    """What no backward takes is let go when the backward ends: with torch's early stop off (the recomputation
    then multiplies by down's weight too, after down's backward has run), and with the gradients of some
    parameters only asked for. Under bf16 autocast of a float32 model the copies are made in bf16, the dtype the
    backward multiplies in, so each is taken: each weight still dequantized twice."""
    from bailong import recompute
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        _, loss, grads, _ = nf4_step(monkeypatch, True, True)
    assert recompute._kept == {}
    _, plain_loss, plain_grads, _ = nf4_step(monkeypatch, True, False)
    assert loss == plain_loss and all(torch.equal(grads[n], plain_grads[n]) for n in grads)
    _, _, grads, _ = nf4_step(monkeypatch, False, True, wanted=lambda name: "layers.1.mlp" in name)
    assert recompute._kept == {} and len(grads) == 6
    for fused in [False, True]:
        dequantized, loss, grads, c = nf4_step(monkeypatch, fused, True, autocast=True)
        assert sum(dequantized) == 2 * 2 * sum(n_in * n_out for n_in, n_out in projection_shapes(c))
        assert recompute._kept == {}
        _, plain_loss, plain_grads, _ = nf4_step(monkeypatch, fused, False, autocast=True)
        assert loss == plain_loss and all(torch.equal(grads[n], plain_grads[n]) for n in grads)


@pytest.mark.parametrize("fused,keep", [(False, False), (True, False), (True, True)])
def test_in_chunks_each_mlp_weight_is_dequantized_once_a_way_and_the_step_is_the_same(monkeypatch, fused, keep):
    """The MLP in chunks (``bailong.memory.ChunkedMLP``) in a checkpointed step: gate, up and down dequantized
    once for all the forward's chunks and once for all the backward's (none in the layer's recomputation, which
    skips the chunks), the attention's weights as without; the loss and every LoRA gradient those of the
    step's through the same chunks by autograd (the same dropout masks), and nothing held after the backward."""
    check_chunked(monkeypatch, fused, keep)


def check_chunked(monkeypatch, fused, keep, device="cpu", dtype=torch.float32, kernels=False):
    from bailong import lora_casts, memory, recompute
    dequantized, loss, grads, c = nf4_step(monkeypatch, fused, keep, device, dtype, kernels=kernels, chunked=True)
    shapes = projection_shapes(c)
    attention = sum(n_in * n_out * (2 if keep else recipe_passes(layer, i))
                    for layer in range(2) for i, (n_in, n_out) in enumerate(shapes[:4]))
    assert sum(dequantized) == attention + 2 * 2 * sum(n_in * n_out for n_in, n_out in shapes[4:])
    assert recompute._kept == {} and recompute._once is None and lora_casts._releases is None
    assert not recompute.is_recomputing() and not recompute._keeping
    monkeypatch.setattr(memory.ChunkedMLP, "apply", chunks_by_autograd)
    _, ref_loss, ref_grads, _ = nf4_step(monkeypatch, fused, keep, device, dtype, kernels=kernels, chunked=True)
    assert abs(loss - ref_loss) < 1e-5 and grads.keys() == ref_grads.keys() and len(grads) == 28
    tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **tolerance, msg=name)


def chunks_by_autograd(x, residual, mlp, chunk, *params):
    """What ``ChunkedMLP`` computes, by autograd through the chunks, all of them kept for the backward."""
    from bailong.memory import _rows
    return torch.cat([mlp(*parts) for parts in zip(_rows(x, chunk), _rows(residual, chunk))]).view(residual.shape)


def test_in_chunks_the_gradients_of_some_parameters_only_are_those_of_the_whole_backward(monkeypatch):
    """``torch.autograd.grad`` for two of the MLP's LoRA weights only: ``ChunkedMLP`` forms just those, equal to
    the same weights' gradients of a whole backward."""
    from bailong import recompute
    wanted = lambda name: name.startswith("model.layers.1.mlp.up_proj.")  # noqa: E731
    _, loss, some, _ = nf4_step(monkeypatch, True, False, wanted=wanted, chunked=True)
    _, whole_loss, every, _ = nf4_step(monkeypatch, True, False, chunked=True)
    assert loss == whole_loss and len(some) == 2 and recompute._once is None
    for name, grad in some.items():
        torch.testing.assert_close(grad, every[name], rtol=1e-5, atol=1e-7, msg=name)
