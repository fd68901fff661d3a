"""The projections' LoRA gradients kept in bf16 (bailong.memory.BF16Grads) against float32 ones: in bf16
training the same steps bit for bit, clipped or not, through the fused path and autograd, with and without
activation checkpointing; over micro-batches a sum in float32 rounded once each."""
import copy

import pytest
import torch

import bailong
from bailong.lora import LoRAConfig, LoRALinear, inject_lora, mark_only_lora_trainable, use_fused_lora
from bailong.memory import BF16Grads
from bailong.optim import AdamW8bit
from bailong.quantized import quantize_model


@pytest.fixture(scope="module")
def base():
    model, _ = bailong.load_preset("tiny", device="cpu")
    quantize_model(model)
    return model.to(torch.bfloat16)


def with_lora(base):
    model = copy.deepcopy(base)
    torch.manual_seed(5)  # the same A and B, and the same dropout masks
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, alpha=16.0, dropout=0.1)))
    for name, p in model.named_parameters():  # B (and the embedding's A) start at zero: give them values
        if "lora_B" in name or "lora_embedding_A" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    return model


def backward(model, seed, scale=1.0):
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    (loss * scale).backward()


def train(model, bf16_grads, optimizer=torch.optim.AdamW, max_norm=0.05, steps=3):
    """The norms of ``steps`` clipped steps (``max_norm`` None: not clipped), as train.py steps."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer(trainable, lr=1e-2, weight_decay=0.01)
    kept = BF16Grads(model) if bf16_grads else None
    norms = []
    torch.manual_seed(7)  # the same dropout masks
    for step in range(steps):
        backward(model, step)
        if kept:
            norms.append(kept.step(optimizer, trainable, max_norm))
            continue
        norms.append(torch.nn.utils.clip_grad_norm_(trainable, max_norm) if max_norm else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize("fused,checkpointing,optimizer,max_norm", [
    (True, False, torch.optim.AdamW, 0.05), (True, True, torch.optim.AdamW, 0.05),
    (False, True, torch.optim.AdamW, 0.05), (True, False, torch.optim.AdamW, None), (True, True, AdamW8bit, 0.05)])
def test_bf16_gradients_step_as_float32_ones_do(base, fused, checkpointing, optimizer, max_norm, monkeypatch):
    monkeypatch.setattr(BF16Grads, "GROUP_BYTES", 4096)  # several calls of the optimizer's step a step
    previous = use_fused_lora(fused)
    try:
        models = [with_lora(base) for _ in range(2)]
        for model in models:
            model.checkpointing = checkpointing
        norms = [train(model, bf16_grads, optimizer, max_norm) for model, bf16_grads in zip(models, (False, True))]
    finally:
        use_fused_lora(previous)
    if max_norm:
        assert all(n > max_norm for n in norms[0]), norms  # every step clipped
        assert all(torch.equal(a, b) for a, b in zip(*norms)), norms
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name


def test_bf16_gradients_take_half_the_bytes_and_sum_micro_batches_in_float32(base):
    models = [with_lora(base) for _ in range(2)]
    kept = BF16Grads(models[1])
    heads = {models[1].lm_head.lora_A.weight, models[1].lm_head.lora_B.weight}
    projections = [p for m in models[1].modules() if isinstance(m, LoRALinear) and m is not models[1].lm_head
                   for p in (m.lora_A.weight, m.lora_B.weight)]
    assert kept.params == projections and len(projections) == 2 * 7 * models[1].config.num_hidden_layers
    for model in models:
        torch.manual_seed(7)
        for micro in range(2):
            backward(model, micro, scale=0.5)
    for (name, plain), p in zip(models[0].named_parameters(), models[1].parameters()):
        if not p.requires_grad:
            continue
        if p in heads or "embed" in name:  # float32, as autograd leaves them
            assert torch.equal(p.grad, plain.grad), name
        else:
            assert p.grad is None and kept.kept[p].dtype == torch.bfloat16, name
            assert torch.equal(kept.kept[p], plain.grad.to(torch.bfloat16)), name  # the float32 sum, rounded once
    kept.remove()
    backward(models[1], 2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in projections)
