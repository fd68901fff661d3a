"""The MLP chunk by chunk over the tokens (bailong.memory.ChunkedMLP) against the whole MLP: training steps'
losses and every LoRA gradient in float32, plain and fused LoRA, with and without activation checkpointing;
with dropout against autograd through the same chunks; the matmuls, casts and copies it makes."""
import copy

import pytest
import torch
from test_lora_fused import autograd_nodes
from test_step_count import chunks_by_autograd

import bailong
from bailong import lora, lora_casts, memory
from bailong.lora import LoRAConfig, LoRALinear, inject_lora, mark_only_lora_trainable


def steps(monkeypatch, chunked, fused, checkpointing, keep=False, dropout=0.0, quantize=True, autocast=False,
          by_autograd=False, offload=False, keep_attention=False, cudnn_attention=False):
    """Per-step losses of 3 AdamW steps of a 2-layer model (LoRA on every projection, embedding and head),
    then an evaluation's loss; the last step's LoRA gradients; the MLP in chunks of 5 of the 32 tokens where
    ``chunked`` (``by_autograd``: through the chunks by autograd instead). Batches of 2 x 16 tokens."""
    from bailong.quantized import quantize_model
    if by_autograd:
        monkeypatch.setattr(memory.ChunkedMLP, "apply", chunks_by_autograd)
    monkeypatch.setattr(lora, "_fused", fused)
    monkeypatch.setattr(memory, "_chunked_mlp", chunked)
    model, _ = bailong.load_preset("tiny", device="cpu")
    monkeypatch.setattr(memory, "MLP_CHUNK_VALUES", 5 * model.config.intermediate_size)  # 32 tokens: 7 chunks
    if quantize:
        quantize_model(model)
    torch.manual_seed(5)
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, alpha=16.0, dropout=dropout)))
    for name, p in model.named_parameters():  # B (and the embedding's A) start at zero: give them values
        if "lora_B" in name or "lora_embedding_A" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.checkpointing, model.keep_dequantized, model.offload = checkpointing, keep, offload
    model.keep_attention, model.cudnn_attention = keep_attention, cudnn_attention
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(3):
        ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        nodes = autograd_nodes(loss, inside=True)  # with the nodes inside a layer that is one (fused, checkpointed)
        own = checkpointing and bailong.model.frozen_matmul_skipped(model.model.layers[0].mlp.down_proj)
        assert nodes["RecomputedBackward"] + nodes["FusedLayerBackward"] == 2 * own  # or bailong.layer_fused
        assert nodes["ChunkedMLPBackward"] == 2 * (chunked and not by_autograd)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(ids[:, :-1], targets=ids[:, 1:]).item())  # evaluation: the MLP whole
    return losses, grads


@pytest.mark.parametrize("fused,checkpointing,keep", [(False, False, False), (True, False, False),
                                                      (False, True, False), (True, True, False), (True, True, True)])
def test_the_mlp_in_chunks_trains_as_the_whole_mlp(monkeypatch, fused, checkpointing, keep):
    """NF4 base, float32, no dropout: per-step losses within 1e-5 and the LoRA gradients as the whole MLP's."""
    whole, whole_grads = steps(monkeypatch, False, fused, checkpointing, keep)
    chunked, chunked_grads = steps(monkeypatch, True, fused, checkpointing, keep)
    assert max(abs(a - b) for a, b in zip(whole, chunked)) < 1e-5, (whole, chunked)
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) == 32
    for name in whole_grads:
        torch.testing.assert_close(chunked_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused,checkpointing", [(False, False), (True, False), (True, True)])
def test_with_dropout_each_chunks_backward_draws_the_masks_its_forward_drew(monkeypatch, fused, checkpointing):
    """LoRA dropout 0.1: the chunks' backward runs their forward again from the random state the forward had,
    so its masks are those drawn: the same losses and gradients as autograd through the same chunks (whose
    masks are other draws than the whole MLP's)."""
    chunked, chunked_grads = steps(monkeypatch, True, fused, checkpointing, dropout=0.1)
    reference, reference_grads = steps(monkeypatch, True, fused, checkpointing, dropout=0.1, by_autograd=True)
    assert max(abs(a - b) for a, b in zip(reference, chunked)) < 1e-5, (reference, chunked)
    for name in reference_grads:
        torch.testing.assert_close(chunked_grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_with_the_layer_inputs_offloaded_the_chunks_train_alike_and_only_layer_inputs_leave(monkeypatch):
    """Fused LoRA, dropout, checkpointing: with the layer inputs in host memory (``OffloadedInput``) the same
    losses and gradients, and each step offloads the layers' inputs only, none of the chunks' tensors."""
    from bailong.memory import HostCopy
    copies, init = [], HostCopy.__init__
    monkeypatch.setattr(HostCopy, "__init__", lambda self, t: copies.append(t.shape) or init(self, t))
    kept, kept_grads = steps(monkeypatch, True, True, True, dropout=0.1)
    assert copies == []
    offloaded, offloaded_grads = steps(monkeypatch, True, True, True, dropout=0.1, offload=True)
    assert copies == [(2, 16, 64)] * 2 * 3  # 2 layers, 3 steps
    assert kept == offloaded and all(torch.equal(kept_grads[n], offloaded_grads[n]) for n in kept_grads)


def test_under_autocast_the_chunks_backward_runs_in_the_forwards_dtype(monkeypatch):
    """bf16 autocast of a float32 model, fused LoRA, checkpointing: the backward's forward runs under the
    autocast the forward had (else in float32, and the gradients are others): the LoRA gradients those of
    autograd through the same chunks, within bf16 rounding, and the losses within it of the whole MLP's."""
    whole, _ = steps(monkeypatch, False, True, True, autocast=True)
    chunked, grads = steps(monkeypatch, True, True, True, autocast=True)
    reference, reference_grads = steps(monkeypatch, True, True, True, autocast=True, by_autograd=True)
    assert max(abs(a - b) for a, b in zip(whole, chunked)) < 2e-2, (whole, chunked)
    for name in reference_grads:
        torch.testing.assert_close(grads[name], reference_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_in_chunks_a_checkpointed_step_multiplies_no_more_than_the_whole_mlps(monkeypatch, fused):
    """Checkpointing, a dense base, counted: with the fused LoRA the same matmul FLOPs as the whole MLP's step.
    The layer's recomputation skips the chunks (the whole MLP's recomputation runs gate and up), and the
    backward's forward skips down's frozen matmul, whose output nothing reads. The plain LoRA layer cannot skip
    it: one matmul by down more a layer (and the count's module hooks on the chunks' inputs work)."""
    from torch.utils.flop_counter import FlopCounterMode
    flops = []
    for chunked in [False, True]:
        with FlopCounterMode(display=False) as counter:
            steps(monkeypatch, chunked, fused, True, quantize=False)
        flops.append(counter.get_total_flops())
    c = bailong.load_preset("tiny", device="cpu")[0].config
    down = 3 * c.num_hidden_layers * 2 * 32 * c.hidden_size * c.intermediate_size  # 3 steps of 32 tokens
    assert flops[1] == flops[0] + (0 if fused else down), flops


def test_in_chunks_the_lora_weights_are_cast_once_a_step_and_let_go_in_the_backward(monkeypatch):
    """Fused LoRA under bf16 autocast, checkpointing: one multi-tensor cast of every A and B a forward, none
    in the chunks' backward (a layer's backward would otherwise let its copies go after the first chunk, and the
    next chunk cast anew every layer the backward has passed), and none held once the backward is done."""
    monkeypatch.setattr(lora, "_fused", True)
    monkeypatch.setattr(memory, "_chunked_mlp", True)
    model, _ = bailong.load_preset("tiny", device="cpu")
    monkeypatch.setattr(memory, "MLP_CHUNK_VALUES", 5 * model.config.intermediate_size)
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, dropout=0.0, targets=lora.PROJECTIONS)))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    model.checkpointing = True
    model.train()
    copies, cast = [], torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda out, masters: copies.append(len(out)) or cast(out, masters))
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids[:, :-1], targets=ids[:, 1:]).backward()
        assert all(m.casts.weights is None and m.casts.shared_A is None for m in layers)
        assert lora_casts._releases is None
    assert copies == [2 * len(layers)] * 2


def test_chunks_give_the_gradients_of_a_trained_base_and_of_the_residual_but_none_for_an_input_without():
    """``ChunkedMLP`` on an MLP with dense weights that train (no LoRA), an input that wants no gradient and a
    residual that does, odd sizes: the weights' gradients summed over the chunks and the residual's, as autograd
    gives them through the whole MLP."""
    from bailong.config import preset
    from bailong.model import MLP
    c = preset("tiny")
    torch.manual_seed(0)
    mlp = MLP(c)
    x = torch.randn(3, 7, c.hidden_size)
    residual = torch.randn(3, 7, c.hidden_size, requires_grad=True)
    g = torch.randn(3, 7, c.hidden_size)
    whole = mlp.unchunked(x, residual)
    expected = torch.autograd.grad(whole, [residual, *mlp.parameters()], g)
    chunked = memory.ChunkedMLP.apply(x, residual, mlp.unchunked, 4, *mlp.parameters())  # 21 rows: 6 chunks
    got = torch.autograd.grad(chunked, [residual, *mlp.parameters()], g)
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_switch_chunks_only_where_a_gradient_is_wanted_and_the_tokens_make_more_than_one_chunk(monkeypatch):
    monkeypatch.setattr(memory, "_chunked_mlp", True)
    model, _ = bailong.load_preset("tiny", device="cpu")
    mlp = model.model.layers[0].mlp
    width = mlp.gate_proj.out_features
    monkeypatch.setattr(memory, "MLP_CHUNK_VALUES", 8 * width)
    x, residual = torch.randn(1, 8, model.config.hidden_size), torch.randn(1, 8, model.config.hidden_size)
    assert memory.chunked_mlp(mlp.unchunked, x, residual, width, mlp.parameters()) is None  # one chunk
    x, residual = torch.randn(2, 8, model.config.hidden_size), torch.randn(2, 8, model.config.hidden_size)
    assert memory.chunked_mlp(mlp.unchunked, x, residual, width, mlp.parameters()).grad_fn is not None
    with torch.no_grad():
        assert memory.chunked_mlp(mlp.unchunked, x, residual, width, mlp.parameters()) is None
    frozen = copy.deepcopy(mlp).requires_grad_(False)
    assert memory.chunked_mlp(frozen.unchunked, x, residual, width, frozen.parameters()) is None
    assert memory.use_chunked_mlp(False) is True and memory._chunked_mlp is False
    assert memory.chunked_mlp(mlp.unchunked, x, residual, width, mlp.parameters()) is None


@pytest.mark.parametrize("chunked,chunked_loss", [(False, False), (True, False), (False, True)])
def test_the_backwards_run_outside_the_forwards_autocast(monkeypatch, chunked, chunked_loss):
    """bf16 autocast, fused LoRA, dropout, checkpointing (each layer one node), the MLP whole or in chunks, the
    loss whole or in chunks (whose forward runs the head's backward): a recomputation runs under the autocast
    its forward had, every backward under none, as autograd's own backward does. (Under CUDA's autocast ``sum``
    returns float32, where CPU's keeps bf16: the dropout masks' gradients summed in float32 then met bf16 in a
    matmul, and the first backward failed on CUDA.)"""
    from bailong.lora_fused import LoRAProjection, LoRAShared
    monkeypatch.setattr(memory, "_chunked_loss", chunked_loss)
    autocast = []
    for node in (LoRAProjection, LoRAShared):
        def backward(ctx, *gs, original=node.backward):
            autocast.append(torch.is_autocast_enabled("cpu"))
            return original(ctx, *gs)
        monkeypatch.setattr(node, "backward", staticmethod(backward))
    steps(monkeypatch, chunked, True, True, dropout=0.1, autocast=True)
    assert len(autocast) >= 3 * 2 * 4 and not any(autocast), autocast  # 3 steps, 2 layers: q/k/v, o, gate/up, down
