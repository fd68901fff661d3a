"""The LoRA weights' compute-dtype copies on the fused path (bailong/lora_casts.py): made once a step for a
model's LoRA layers together (or a decoder layer at a time) and again only when the masters change, a decoder
layer's A's side by side, let go in the backward; a copied, pickled or let-go model keeps none of another's."""
import pytest
import torch
from test_lora import randomize

import bailong
from bailong.lora import LoRAConfig, LoRALinear, inject_lora, mark_only_lora_trainable


def test_fused_lora_casts_its_weights_once_per_optimizer_step():
    layer = LoRALinear(torch.nn.Linear(32, 24, bias=False), r=4, scaling=2.0)
    A, B = layer.compute_weights(torch.bfloat16)
    assert layer.compute_weights(torch.bfloat16)[0] is A  # a second call, or a recomputed forward: no cast
    assert torch.equal(B, layer.lora_B.weight.bfloat16())
    with torch.no_grad():
        layer.lora_A.weight.add_(1.0)  # an update in place
    assert torch.equal(layer.compute_weights(torch.bfloat16)[0], layer.lora_A.weight.bfloat16())
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)  # a fused step keeps the versions
    layer.lora_A.weight.grad = torch.ones_like(layer.lora_A.weight)
    optimizer.step()
    assert torch.equal(layer.compute_weights(torch.bfloat16)[0], layer.lora_A.weight.bfloat16())


@pytest.mark.parametrize("by_layer", [False, True])
def test_fused_lora_casts_once_a_forward_and_lets_the_casts_go_in_the_backward(monkeypatch, by_layer):
    """With activation checkpointing: one multi-tensor cast of every A and B a forward (none in the
    recomputation), and once the backward has passed them no layer holds its compute-dtype copies (they are
    not alive beside every gradient at its end); a second micro-batch casts again and accumulates the same.
    Made by layer (``use_casts_by_layer``): one cast of a layer's A's and B's in its forward, let go after it,
    and one in its recomputation; after the forward no layer holds any."""
    from bailong import lora, lora_casts
    monkeypatch.setattr(lora, "_fused", True)
    monkeypatch.setattr(lora_casts, "_by_layer", by_layer)
    model, _ = bailong.load_preset("tiny", device="cpu")
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, dropout=0.0, targets=lora.PROJECTIONS)))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    randomize({i: m.lora_B.weight for i, m in enumerate(layers)})
    model.checkpointing = True
    model.train()
    copies, copy = [], torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda out, masters: copies.append(len(out)) or copy(out, masters))
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        assert by_layer == all(m.casts.weights is None and m.casts.shared_A is None for m in layers)
        loss.backward()
        assert all(m.casts.weights is None and m.casts.shared_A is None for m in layers)
        grads.append(layers[0].lora_A.weight.grad.clone())
    n = model.config.num_hidden_layers
    assert copies == ([2 * len(layers) // n] * 2 * n if by_layer else [2 * len(layers)]) * 2
    torch.testing.assert_close(grads[1], 2 * grads[0])


def test_a_forward_takes_weights_changed_through_data_since_the_last(monkeypatch):
    """LoRA weights changed through ``.data`` (a hand-written update, an average copied in) change no version
    counter: a training forward after one used the copies the forward before had made (its output 19 away on
    a real checkpoint). It casts again, and gives what the unfused path gives; its recomputation reuses them, and
    so does its backward after a forward without a gradient."""
    from bailong import lora
    monkeypatch.setattr(lora, "_fused", True)
    model, _ = bailong.load_preset("tiny", device="cpu")
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=4, dropout=0.0, targets=lora.PROJECTIONS)))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    ids = torch.randint(0, 260, (1, 9), generator=torch.Generator().manual_seed(0))
    model(ids)  # the casts made, and kept: no backward lets them go
    for m in layers:
        m.lora_B.weight.data.add_(0.05)
    model.checkpointing = True
    model.train()
    copies, copy = [], torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda out, masters: copies.append(len(out)) or copy(out, masters))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    with torch.no_grad():
        model(ids)  # a forward without a gradient between (a teacher's, an evaluation): it uses none
    loss.backward()
    assert copies == [2 * len(layers)]  # once, not again in the recomputation
    fused = model(ids)
    monkeypatch.setattr(lora, "_fused", False)
    torch.testing.assert_close(fused, model(ids), rtol=1e-5, atol=1e-5)


def test_a_model_casts_its_own_lora_layers_and_not_another_models(monkeypatch):
    """Two models with LoRA alive in one process (a notebook's, say): a training forward of one casts all of
    its LoRA layers in one multi-tensor copy, and none of the other's, which casts its own when it trains. A
    deep copy, whose cast cache starts empty and ungrouped, casts its layers one by one until ``group_casts``."""
    import copy

    from bailong import lora
    from bailong.lora_casts import group_casts
    monkeypatch.setattr(lora, "_fused", True)
    models = [mark_only_lora_trainable(inject_lora(bailong.load_preset("tiny", device="cpu")[0],
                                                   LoRAConfig(r=4, dropout=0.0, targets=lora.PROJECTIONS)))
              for _ in range(2)]
    models.append(copy.deepcopy(models[0]))
    copies, foreach_copy = [], torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda out, masters: copies.append(len(out)) or foreach_copy(out,
                                                                                                             masters))
    ids = torch.randint(0, 260, (1, 9), generator=torch.Generator().manual_seed(0))
    layers = [[m for m in model.modules() if isinstance(m, LoRALinear)] for model in models]

    def casts_of_a_forward(i):  # no backward: the casts stay, and are cleared after the checks
        copies.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            models[i](ids[:, :-1], targets=ids[:, 1:])
        assert all(m.casts.weights is not None for m in layers[i])
        assert all(m.casts.weights is None for j in range(3) if j != i for m in layers[j]), i
        for m in layers[i]:
            m.casts.clear()
        return list(copies)
    n = 2 * len(layers[0])  # A and B of each
    assert casts_of_a_forward(0) == [n] and casts_of_a_forward(1) == [n]
    assert casts_of_a_forward(2) == [2] * len(layers[2])
    group_casts(models[2])
    assert casts_of_a_forward(2) == [n]


def test_a_decoder_layers_stacked_as_are_views_of_its_casts(monkeypatch):
    """``cast`` puts a decoder layer's LoRA A's one after another in one buffer, so that q/k/v's and gate/up's
    stacked A's (``stacked``) are views of it, not copies: 2 launches a layer fewer, and at the 7B recipe's
    shape 0.16 GiB fewer held. A's apart, or out of order, are copied, with the same values."""
    from bailong import lora
    from bailong.lora_casts import stacked
    monkeypatch.setattr(lora, "_fused", True)
    model, _ = bailong.load_preset("tiny", device="cpu")
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=4, dropout=0.0, targets=lora.PROJECTIONS)))
    ids = torch.randint(0, 260, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids[:, :-1], targets=ids[:, 1:])  # no backward: the casts stay
    for layer in model.model.layers:
        for shared in [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                       (layer.mlp.gate_proj, layer.mlp.up_proj)]:
            As = [m.casts.weights[0] for m in shared]
            stack = shared[0].casts.shared_A
            assert stack.data_ptr() == As[0].data_ptr() and torch.equal(stack, torch.cat(As))
    flat = torch.randn(12)
    a, b, c = flat[:6].view(2, 3), flat[6:].view(2, 3), torch.randn(2, 3)
    assert stacked([a, b]).data_ptr() == a.data_ptr() and torch.equal(stacked([a, b]), torch.cat([a, b]))
    for apart in ([b, a], [a, c]):
        assert stacked(apart).data_ptr() not in (a.data_ptr(), b.data_ptr())
        assert torch.equal(stacked(apart), torch.cat(apart))


@pytest.mark.parametrize("by_layer", [False, True])
def test_a_trained_model_is_freed_as_soon_as_it_is_let_go(monkeypatch, by_layer):
    """No reference cycle keeps a model with LoRA alive after a training step (the layers' peers are weak
    references): else its LoRA layers would stay among those cast together, and the next model's forward would
    cast them too, until the collector ran."""
    import gc
    import weakref

    from bailong import lora, lora_casts
    monkeypatch.setattr(lora, "_fused", True)
    monkeypatch.setattr(lora_casts, "_by_layer", by_layer)
    model, _ = bailong.load_preset("tiny", device="cpu")
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, dropout=0.1)))
    model.checkpointing = True
    model.train()
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids[:, :-1], targets=ids[:, 1:]).backward()
    alive = weakref.ref(model.model.layers[0].self_attn.q_proj)  # a LoRA layer, not only the model around it
    gc.disable()
    try:
        del model
        assert alive() is None
    finally:
        gc.enable()


def test_a_model_with_lora_copies_and_pickles_with_casts_of_its_own():
    """The LoRA layers' casts (a cache, with weak references to their decoder layer's peers) are not copied: a
    deep copy casts its own weights, not the original's, and ``torch.save`` of a whole model pickles."""
    import copy
    import io
    model, _ = bailong.load_preset("tiny", device="cpu")
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=4)))
    q = model.model.layers[0].self_attn.q_proj
    assert q.casts.peers[0]() is q
    q.compute_weights(torch.bfloat16)
    twin = copy.deepcopy(model).model.layers[0].self_attn.q_proj
    assert twin.casts.peers is None and twin.casts.weights is None
    assert torch.equal(twin.compute_weights(torch.bfloat16)[0], q.lora_A.weight.bfloat16())
    torch.save(model, io.BytesIO())
