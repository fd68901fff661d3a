"""The fast training paths against the plain ones: LoRA projections as one autograd node
(bailong/lora_fused.py), those reading one input as one node, the residual added in the matmul, and the
loss chunk by chunk (bailong/memory.py); float32 to 1e-5, bf16 within rounding."""
import pytest
import torch
from conftest import ROOT, needs_triton
from test_lora import randomize

import bailong
from bailong.lora import LoRAConfig, LoRALinear, inject_lora, mark_only_lora_trainable


def fused_and_plain_steps(quantize, dtype, checkpointing, steps=3, dropout=0.1):
    """Per-step losses and the last LoRA gradients of a few AdamW steps, plain and fused (``LoRAProjection``;
    q/k/v and gate/up through ``LoRAShared``, checked)."""
    import copy

    import torch.nn.functional as F

    from bailong import lora
    from bailong.quantized import quantize_model
    base, _ = bailong.load_preset("tiny", device="cpu")
    if quantize:
        quantize_model(base)
    results = []
    for fused in [False, True]:
        previous = lora.use_fused_lora(fused)
        try:
            model = copy.deepcopy(base).to(dtype)
            torch.manual_seed(5)  # the same A and B, and the same dropout masks
            mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, alpha=16.0, dropout=dropout)))
            for name, p in model.named_parameters():  # B (and the embedding's A) start at zero: give them values
                if "lora_B" in name or "lora_embedding_A" in name:
                    torch.nn.init.normal_(p, std=0.02)
            model.checkpointing = checkpointing
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            losses = []
            for step in range(steps):
                ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(step))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    logits = model(ids[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
                nodes = autograd_nodes(loss, inside=True)
                assert nodes["RecomputedBackward"] == 2 * (fused and checkpointing)  # bailong.recompute.checkpoint
                assert fused == ("LoRAProjectionBackward" in nodes) == (nodes["LoRASharedBackward"] == 4), nodes
                loss.backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            results.append((losses, grads))
        finally:
            lora.use_fused_lora(previous)
    return results


def autograd_nodes(tensor, inside=False):
    """How many of each kind of node the autograd graph behind ``tensor`` holds; ``inside``: with those that a
    checkpointed layer's own node (``bailong.recompute.Recomputed``) builds in its backward, by running its
    recomputation (with the forward's random state, which is left as it was; unseen by any dispatch mode, a
    count's)."""
    import collections

    from torch.utils._python_dispatch import _disable_current_modes

    from bailong.recompute import as_forward, recomputing, replayed
    nodes, todo, seen, outputs = collections.Counter(), [tensor.grad_fn], set(), []
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes[type(node).__name__] += 1
            todo += [next_node for next_node, _ in node.next_functions]
            if inside and type(node).__name__ == "RecomputedBackward":
                x, = node.saved_tensors
                with _disable_current_modes(), replayed(x, node.state), as_forward(x, node.state), recomputing():
                    outputs.append(node.layer(x.detach().requires_grad_(), *node.args))  # kept: an output let go
                todo.append(outputs[-1].grad_fn)  # frees its node's graph on some torch versions (2.11)
    return nodes


@pytest.mark.parametrize("quantize,checkpointing,dropout", [(True, True, 0.1), (True, False, 0.1), (False, False, 0.1),
                                                        (True, True, 0.0), (False, False, 0.0)])
def test_fused_lora_trains_as_the_plain_path_in_float32(quantize, checkpointing, dropout):
    (plain, plain_grads), (fused, fused_grads) = fused_and_plain_steps(quantize, torch.float32, checkpointing,
                                                                       dropout=dropout)
    assert max(abs(a - b) for a, b in zip(plain, fused)) < 1e-5, (plain, fused)
    # A and B of 2 layers x 7 projections, the embedding and the head
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 32
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_fused_lora_in_bfloat16_stays_within_rounding_of_the_plain_path(dropout):
    (plain, _), (fused, _) = fused_and_plain_steps(True, torch.bfloat16, True, dropout=dropout)
    assert max(abs(a - b) for a, b in zip(plain, fused)) < 2e-2, (plain, fused)


@pytest.mark.parametrize("autocast", [False, True])
def test_a_checkpointed_layer_as_its_own_node_trains_as_torchs_checkpoint(monkeypatch, autocast):
    """Fused LoRA, NF4, dropout, checkpointing: each layer one node (``bailong.recompute.Recomputed``) gives the
    losses and LoRA gradients of torch's checkpoint bit for bit (float32, and under bf16 autocast: the
    recomputation replays the forward's masks and autocast). (``torch.autograd.grad`` of some weights through
    it: tests/test_step_count.py.)"""
    import bailong.model
    from test_chunked_mlp import steps
    results = []
    for own in [False, True]:
        monkeypatch.setattr(bailong.model, "frozen_matmul_skipped", lambda down: own)
        results.append(steps(monkeypatch, False, True, True, dropout=0.1, autocast=autocast))
    (losses, grads), (own_losses, own_grads) = results
    assert losses == own_losses and grads.keys() == own_grads.keys()
    assert all(torch.equal(own_grads[n], grads[n]) for n in grads)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "v_proj", "down_proj")])
def test_a_layer_is_its_own_checkpointed_node_only_where_its_down_skips_its_frozen_matmul(monkeypatch, targets):
    """Fused LoRA, checkpointing: without LoRA on down (a plain frozen down, which would multiply again in the
    node's whole recomputation) the layers keep torch's checkpoint, whose early stop spares down."""
    from bailong import lora
    monkeypatch.setattr(lora, "_fused", True)
    model, _ = bailong.load_preset("tiny", device="cpu")
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, targets=targets)))
    model.checkpointing = True
    model.train()
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    assert autograd_nodes(loss)["RecomputedBackward"] == 2 * ("down_proj" in targets)
    loss.backward()


def test_fused_lora_trains_after_inference(monkeypatch):
    from bailong import lora
    monkeypatch.setattr(lora, "_fused", True)
    layer = LoRALinear(torch.nn.Linear(32, 24, bias=False), r=4, scaling=2.0)
    x = torch.randn(3, 32)
    with torch.inference_mode():  # as generate() runs: the plain path, nothing cached
        layer(x)
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None


def test_fused_lora_forms_only_the_gradients_wanted(monkeypatch):
    from bailong import lora, lora_fused
    monkeypatch.setattr(lora, "_fused", True)
    products, real = [], lora_fused._scaled_mm
    monkeypatch.setattr(lora_fused, "_scaled_mm", lambda a, b, s, out=None: products.append(out is None) or
                        real(a, b, s, out))  # out: a LoRA weight's gradient; else dx's
    layer = LoRALinear(torch.nn.Linear(32, 24, bias=False), r=4, scaling=2.0)
    layer(torch.randn(3, 32)).sum().backward()  # an input without a gradient (the first layer's, say): no dx
    assert products == [False, False] and layer.lora_A.weight.grad is not None
    assert layer.lora_B.weight.grad is not None
    layer.weight.requires_grad_(True)  # a base someone trains: the plain path, which gives it its gradient
    layer(torch.randn(3, 32)).sum().backward()
    assert layer.weight.grad is not None and len(products) == 2


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_chunked_loss_trains_as_the_whole_logits_do(monkeypatch, dropout):
    """The loss from chunks of 7 positions (LoRA on the head, its dropout included) against the whole logits:
    per-step losses and every LoRA gradient, float32, with the plain and the fused LoRA projections."""
    import copy

    from bailong import lora, memory
    base, _ = bailong.load_preset("tiny", device="cpu")
    monkeypatch.setattr(memory, "LOSS_CHUNK_LOGITS", 7 * base.config.vocab_size)
    results = []
    for chunked in [False, True]:
        model = copy.deepcopy(base)
        torch.manual_seed(5)
        mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, alpha=16.0, dropout=dropout)))
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                torch.nn.init.normal_(p, std=0.02)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        monkeypatch.setattr(memory, "_chunked_loss", chunked)
        losses = []
        for step in range(3):
            monkeypatch.setattr(lora, "_fused", step == 1)
            ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(step))
            targets = ids[:, 1:].clone()
            targets[0, :5] = -100  # a masked prompt, as SFT's
            loss = model(ids[:, :-1], targets=targets)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        with torch.no_grad():
            losses.append(model(ids[:, :-1], targets=targets).item())  # evaluation: no gradients formed
        results.append((losses, grads))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert max(abs(a - b) for a, b in zip(whole, chunked)) < 1e-5, (whole, chunked)
    for name in whole_grads:
        torch.testing.assert_close(chunked_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_projections_sharing_an_input_apply_the_dropout_masks_they_drew(monkeypatch, device):
    """q, k, v with dropout as one node (``LoRAShared``): outputs and every gradient against autograd through
    the masks the node drew (the same call again from the same seed), float32. On CUDA these masks are not
    those of three ``F.dropout`` calls, so this is the check there (torch's masks: the layer kernels, on by
    default, draw theirs from a seed, checked in test_dropout_kernels.py)."""
    import bailong_kernels
    from bailong import lora
    monkeypatch.setattr(lora, "_fused", True)
    monkeypatch.setattr(bailong_kernels, "_layer_kernels", False)
    torch.manual_seed(0)
    layers = [LoRALinear(torch.nn.Linear(48, out, bias=False, device=device), r=4, scaling=2.0, dropout=0.3)
              for out in (48, 16, 16)]
    randomize({i: m.lora_B.weight for i, m in enumerate(layers)})
    x = torch.randn(2, 5, 48, device=device, requires_grad=True)
    g = [torch.randn(2, 5, m.out_features, device=device) for m in layers]
    trained = [x] + [w for m in layers for w in (m.lora_A.weight, m.lora_B.weight)]
    torch.manual_seed(1)
    outs = LoRALinear.shared(x, layers)
    assert outs is not None and "LoRASharedBackward" in type(outs[0].grad_fn).__name__
    grads = torch.autograd.grad(outs, trained, g)
    torch.manual_seed(1)  # the node's one draw of three masks, again, now through autograd
    dropped, mask = torch.native_dropout(x.reshape(10, 48).expand(3, 10, 48), 0.3, True)
    assert 0.5 < mask.float().mean() < 0.9 and not torch.equal(mask[0], mask[1])  # three masks of 1 - p
    ref = [(x.reshape(10, 48) @ m.weight.T + 2.0 * (d @ m.lora_A.weight.T) @ m.lora_B.weight.T).view(2, 5, -1)
           for m, d in zip(layers, dropped)]
    for out, expected in zip(outs, ref):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, torch.autograd.grad(ref, trained, g)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for m in layers:
        m.dropout.p = 1.0  # nothing kept: only the bases are left, and the A's get no gradient
    grads = torch.autograd.grad(LoRALinear.shared(x, layers), trained, g)
    assert all(not grad.any() for grad in grads[1::2])


@pytest.mark.parametrize("last", [False, True])
def test_a_fused_projection_adds_the_residual_in_its_matmul(monkeypatch, last):
    """``add_projection`` (o; down, a layer's ``last``): residual + layer(x) as the LoRA node itself, or for the
    last the update onto the residual and then the base's matmul as a node of its own, against the plain sum,
    with the gradients; a residual in another dtype than the compute dtype (float32 under bf16 autocast) is
    added outside, in float32, as the plain path adds it."""
    from bailong import lora
    from bailong.model import add_projection
    from bailong.quantized import NF4Linear
    torch.manual_seed(0)
    base = NF4Linear.from_linear(torch.nn.Linear(64, 40, bias=False))  # NF4, as QLoRA's
    layer = LoRALinear(base, r=4, scaling=2.0, dropout=0.1)
    randomize({0: layer.lora_B.weight})
    x, residual = torch.randn(2, 3, 64, requires_grad=True), torch.randn(2, 3, 40, requires_grad=True)
    results = []
    for fused in [False, True]:
        monkeypatch.setattr(lora, "_fused", fused)
        torch.manual_seed(1)  # the same dropout mask
        out = add_projection(residual, layer, x, last)
        node = "FrozenAddmmBackward" if last else "LoRAProjectionBackward"
        assert type(out.grad_fn).__name__ == (node if fused else "AddBackward0")
        results.append((out, torch.autograd.grad(out.square().sum(), [x, residual, layer.lora_A.weight])))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(fused_grads, plain_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = add_projection(residual, layer, x, last)
    assert out.dtype == torch.float32 and type(out.grad_fn).__name__ == "AddBackward0"
    out = add_projection(residual[:1], layer, x, last)  # a residual that broadcasts: added outside, as the plain path
    assert out.shape == (2, 3, 40) and type(out.grad_fn).__name__ == "AddBackward0"


@pytest.mark.parametrize("one_at_a_time", [False, True])
@pytest.mark.parametrize("gpus_path", [False, pytest.param(True, marks=needs_triton)])
def test_the_backwards_dequantized_weights_go_before_the_lora_gradients_are_made(monkeypatch, gpus_path,
                                                                                   one_at_a_time):
    """A shared node's backward (q/k/v, gate/up) lets its frozen weights' dequantized copy go once dL/dx has
    them, before it makes the LoRA gradients: at the 7B recipe's shape gate and up's copy is 172 MiB. One at a
    time (``one_at_a_time``, with the casts made by layer), each weight's copy is made only once the one before
    is gone: 86 MiB. On the reference ops and on the GPU's path (there made together in one launch)."""
    import weakref

    from bailong import lora, lora_fused
    from bailong.quantized import quantize_model
    monkeypatch.setattr(lora, "_fused", True)
    monkeypatch.setattr(lora_fused, "_one_at_a_time", one_at_a_time)
    if gpus_path:  # the kernels' wrappers, their launches left out: lifetimes, not values
        monkeypatch.syspath_prepend(str(ROOT / "bench"))
        from bench_host import on_the_gpus_path
        on_the_gpus_path(layer_kernels=False, patch=monkeypatch.setattr)
    model, _ = bailong.load_preset("tiny", device="cpu")
    quantize_model(model)
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, dropout=0.0, targets=lora.PROJECTIONS)))
    copies, checked, made, backward = [], [], [], []
    frozen_weight, master_grads = lora_fused.frozen_weight, lora_fused._master_grads

    def dequantized(W, dtype, keep=False):
        if backward:  # (a forward's frozen_addmm makes copies too)
            made.append((isinstance(W, tuple), sum(ref() is not None for ref in copies)))  # together; others alive
        out = frozen_weight(W, dtype, keep)
        copies.extend(weakref.ref(w.untyped_storage()) for w in (out if isinstance(out, tuple) else (out,)))
        return out

    def grads(products, dtype):
        checked.append([ref() is None for ref in copies])
        return master_grads(products, dtype)
    monkeypatch.setattr(lora_fused, "frozen_weight", dequantized)
    monkeypatch.setattr(lora_fused, "_master_grads", grads)
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    backward.append(True)
    loss.backward()
    n = model.config.num_hidden_layers
    assert len(checked) == 4 * n and all(all(gone) for gone in checked), checked  # o, down and the shared two
    together = [alive for tuple_, alive in made if tuple_]
    # o and down, then gate and up, q, k and v (no dL/dx for layer 0's: the embedding trains nothing), each
    # alone and with no other copy alive; or the shared ones together, with none other alive
    assert len(made) == (7 * n - 3 if one_at_a_time else 4 * n - 1), made
    assert len(together) == (0 if one_at_a_time else 2 * n - 1) and not any(together), made
    assert made.count((False, 0)) == len(made) - len(together), made
