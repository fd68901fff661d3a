"""A checkpointed decoder layer written out by hand as one node (bailong/layer_fused.py) against the same layer
through autograd (bailong.recompute.Recomputed): on the GPU's path (NF4 through the kernels, the training layer
kernels, all interpreted), training steps' losses and every LoRA gradient in float32 to rounding, with dropout,
the recomputation's dequantized weights kept, the layer inputs offloaded, an input without a gradient; a step's
loss and dequantizations, also for a bf16 model under autocast; the backward's peak memory; where it applies
and where not."""
import pytest
import torch
from conftest import allocator_peak
from test_chunked_mlp import steps
from test_layer_kernels import gpu_path
from test_lora_fused import autograd_nodes

import bailong
from bailong import layer_fused, lora, lora_casts, lora_fused
from bailong.lora import LoRAConfig, inject_lora, mark_only_lora_trainable


def by_hand_and_by_autograd(monkeypatch, **kwargs):
    """``test_chunked_mlp.steps`` (fused LoRA, checkpointing) on the GPU's path, by autograd then by hand (each
    layer of each step one ``FusedLayer``, checked)."""
    gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    results, layers = [], counted_layers(monkeypatch)
    for by_hand in [False, True]:
        monkeypatch.setattr(layer_fused, "_fused_layer", by_hand)
        results.append(steps(monkeypatch, False, True, True, **kwargs))
        assert len(layers) == 2 * 3 * by_hand
    return results


def counted_layers(monkeypatch):
    """A list that grows by one at each ``FusedLayer`` taken."""
    apply, layers = layer_fused.FusedLayer.apply, []
    monkeypatch.setattr(layer_fused.FusedLayer, "apply", lambda *args: layers.append(1) or apply(*args))
    return layers


def assert_alike(results):
    (losses, grads), (hand_losses, hand_grads) = results
    assert max(abs(a - b) for a, b in zip(losses, hand_losses)) < 1e-5, (losses, hand_losses)
    assert grads.keys() == hand_grads.keys() and len(grads) == 32  # A and B of 2 x 7 projections, embedding, head
    for name in grads:
        torch.testing.assert_close(hand_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dropout,keep", [(0.0, False), (0.1, False), (0.1, True)])
def test_a_layer_written_out_by_hand_trains_as_autograd_does(monkeypatch, dropout, keep):
    assert_alike(by_hand_and_by_autograd(monkeypatch, dropout=dropout, keep=keep))


@pytest.mark.parametrize("by_hand,chunked", [(True, False), (False, False)])
def test_casts_made_by_layer_train_bit_for_bit_alike(monkeypatch, by_hand, chunked):
    """The LoRA weights' compute-dtype copies made a layer at a time (``bailong.lora_casts.use_casts_by_layer``, and
    with them the backward's shared weights dequantized one at a time), on the GPU's path by hand or through
    autograd, the MLP in chunks or whole, with dropout: the same losses and LoRA gradients as made all at once,
    bit for bit."""
    gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(layer_fused, "_fused_layer", by_hand)
    results = []
    for by_layer in [False, True]:
        monkeypatch.setattr(lora_casts, "_by_layer", by_layer)
        monkeypatch.setattr(lora_fused, "_one_at_a_time", by_layer)  # as use_casts_by_layer sets them
        results.append(steps(monkeypatch, chunked, True, True, dropout=0.1))
    (losses, grads), (by_layer_losses, by_layer_grads) = results
    assert losses == by_layer_losses and grads.keys() == by_layer_grads.keys()
    assert all(torch.equal(grads[name], by_layer_grads[name]) for name in grads)


def test_by_hand_the_layer_inputs_offloaded_train_alike(monkeypatch):
    from bailong.memory import HostCopy
    copies, init = [], HostCopy.__init__
    monkeypatch.setattr(HostCopy, "__init__", lambda self, t: copies.append(t.shape) or init(self, t))
    results = by_hand_and_by_autograd(monkeypatch, dropout=0.1, offload=True)
    assert copies == [(2, 16, 64)] * 2 * 3 * 2  # 2 layers, 3 steps, both ways
    assert_alike(results)


def test_by_hand_a_bf16_model_under_autocast_steps_as_autograd_does(monkeypatch):
    """As train.py runs on CUDA: the model in bf16 under bf16 autocast, which the recomputation replays."""
    check_by_hand(monkeypatch, False, dtype=torch.bfloat16, autocast=True)


def check_by_hand(monkeypatch, keep, device="cpu", dtype=torch.float32, autocast=False):
    """One step of ``test_step_count.nf4_step`` (fused LoRA, dropout, checkpointing; the model in ``dtype``,
    under bf16 ``autocast``) through the kernels (on the CPU interpreted, ``gpu_path``), by autograd and by
    hand: the same loss and dequantizations, the LoRA gradients to rounding (in bf16 down's g W is added in
    another order); by hand every layer one ``FusedLayer``."""
    from test_step_count import nf4_step
    if device == "cpu":
        gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    else:
        import bailong_kernels
        monkeypatch.setattr(bailong_kernels, "_layer_kernels", True)
    layers, results = counted_layers(monkeypatch), []
    for by_hand in [False, True]:
        with monkeypatch.context() as patch:  # each step's own count of the dequantizations
            patch.setattr(layer_fused, "_fused_layer", by_hand)
            results.append(nf4_step(patch, True, keep, device, dtype, autocast, kernels=True))
    (dequantized, loss, grads, _), (hand_dequantized, hand_loss, hand_grads, _) = results
    assert layers == [1, 1] and hand_loss == loss and hand_dequantized == dequantized
    assert grads.keys() == hand_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        if dtype == torch.float32:
            torch.testing.assert_close(hand_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        else:  # bf16 keeps 8 bits: a gradient off by a few roundings of its largest values (a wrong one: all)
            assert (hand_grads[name] - grad).abs().max() <= 0.05 * grad.abs().max(), name


@pytest.mark.parametrize("keep", [False, True])
def test_by_hand_a_step_makes_the_loss_and_dequantizations_of_autograd(monkeypatch, keep):
    check_by_hand(monkeypatch, keep)


def tiny_lora(targets=None):
    model, _ = bailong.load_preset("tiny", device="cpu")
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=8, targets=targets) if targets else LoRAConfig(r=8)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.checkpointing = True
    return model.train()


def test_by_hand_the_first_layer_forms_no_gradient_for_an_input_without_one(monkeypatch):
    """LoRA on the projections alone: the embedding trains nothing, so no dL/dx for the first layer's input;
    the same gradients as autograd's."""
    gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(lora, "_fused", True)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for by_hand in [False, True]:
        monkeypatch.setattr(layer_fused, "_fused_layer", by_hand)
        torch.manual_seed(5)
        model = tiny_lora(projections)
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        assert autograd_nodes(loss)["FusedLayerBackward"] == 2 * by_hand
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 28
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", ["kernels off", "switched off", "MLP in chunks", "no LoRA on o", "plain LoRA",
                                  "trained norm", "float32 under autocast", "a hook", "a hook on every module"])
def test_a_layer_is_written_out_only_where_all_it_writes_out_applies(monkeypatch, case):
    from torch.nn.modules import module as nn_module

    from bailong import memory
    gpu_path(monkeypatch, fused_step=False, layer_kernels=case != "kernels off")
    monkeypatch.setattr(lora, "_fused", case != "plain LoRA")
    monkeypatch.setattr(layer_fused, "_fused_layer", case != "switched off")
    monkeypatch.setattr(memory, "_chunked_mlp", case == "MLP in chunks")
    monkeypatch.setattr(memory, "MLP_CHUNK_VALUES", 5 * 176)  # 32 tokens: 7 chunks
    targets = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj") if case == "no LoRA on o" else None
    model = tiny_lora(targets)
    ran = []
    if case == "trained norm":
        model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    if case == "a hook":
        model.model.layers[0].mlp.register_forward_hook(lambda *args: ran.append(1))
    if case == "a hook on every module":
        monkeypatch.setattr(nn_module, "_global_forward_pre_hooks", {0: lambda *args: ran.append(1)})
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "float32 under autocast"):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    assert autograd_nodes(loss)["FusedLayerBackward"] == (1 if case in ("trained norm", "a hook") else 0)
    assert ran if case.startswith("a hook") else not ran
    loss.backward()


def test_by_hand_a_backward_holds_no_more_than_autograds(monkeypatch, tmp_path):
    """Each part's saved tensors are let go once its backward has run, as autograd lets a node's go: the
    backward's peak no higher than through autograd (2 x 128 tokens, dropout)."""
    gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(lora, "_fused", True)
    ids = torch.randint(0, 260, (2, 129), generator=torch.Generator().manual_seed(0))
    peaks = []
    for by_hand in [False, True]:
        monkeypatch.setattr(layer_fused, "_fused_layer", by_hand)
        torch.manual_seed(5)
        model = tiny_lora()
        peaks.append(allocator_peak(model(ids[:, :-1], targets=ids[:, 1:]).backward, tmp_path)[0])
    autograd, by_hand = peaks
    assert 0 < by_hand <= autograd, peaks


@pytest.mark.parametrize("dropout,offload", [(0.0, False), (0.1, False), (0.1, True)])
def test_attention_kept_trains_bit_for_bit_as_recomputed(monkeypatch, dropout, offload):
    """``keep_attention``: attention's output, its log-sum-exp and x_2 kept by the forward, the recomputation
    skipping attention (the flash kernel's backward from what was kept) and o's matmul: the same losses and
    LoRA gradients, bit for bit, with dropout, the kept tensors offloaded with the layer input (3 copies a
    layer instead of 1); SDPA never called in a step."""
    from bailong.memory import HostCopy
    gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(layer_fused, "_fused_layer", True)
    layers, copies, init = counted_layers(monkeypatch), [], HostCopy.__init__
    monkeypatch.setattr(HostCopy, "__init__", lambda self, t: copies.append(t.shape) or init(self, t))
    sdpa, calls = layer_fused.F.scaled_dot_product_attention, []
    monkeypatch.setattr(layer_fused.F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs))
    results = []
    for keep_attention in [False, True]:
        copies.clear()
        results.append(steps(monkeypatch, False, True, True, dropout=dropout, offload=offload,
                             keep_attention=keep_attention))
        assert len(copies) == 2 * 3 * (1 + 2 * keep_attention) * offload  # 2 layers, 3 steps
        assert len(calls) == 2 * 3 * 2 * (not keep_attention) + 2, calls  # the evaluation's 2 layers
        calls.clear()
    assert len(layers) == 2 * 3 * 2
    (losses, grads), (kept_losses, kept_grads) = results
    assert losses == kept_losses and grads.keys() == kept_grads.keys() and len(grads) == 32
    assert all(torch.equal(grads[name], kept_grads[name]) for name in grads)


def check_attention_kept(monkeypatch, device="cpu", dtype=torch.float32, autocast=False):
    """A step of ``test_step_count.nf4_step`` through the kernels (on the CPU interpreted, ``gpu_path``), every
    layer written out by hand, with attention kept and without: the same loss; o's weight (64 x 64) dequantized
    once fewer a layer, nothing else; the LoRA gradients the same, bit for bit in float32 (on CUDA in bf16, to
    the order in which the flash kernel's backward adds)."""
    import collections

    from test_step_count import nf4_step
    if device == "cpu":
        gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(layer_fused, "_fused_layer", True)
    kernel, results = layer_fused._kept_attention, []
    for keep_attention in [False, True]:
        with monkeypatch.context() as patch:  # each step's own count of the dequantizations
            taken = []
            patch.setattr(layer_fused, "_kept_attention", lambda *args: taken.append(1) or kernel(*args))
            results.append(nf4_step(patch, True, False, device, dtype, autocast, kernels=True,
                                    keep_attention=keep_attention))
            assert len(taken) == 2 * keep_attention  # the forward's 2 layers, by the flash kernel
    (dequantized, loss, grads, _), (kept_dequantized, kept_loss, kept_grads, _) = results
    assert collections.Counter(dequantized) - collections.Counter(kept_dequantized) == {64 * 64: 2}
    assert not collections.Counter(kept_dequantized) - collections.Counter(dequantized)
    assert kept_loss == loss and kept_grads.keys() == grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        if device == "cpu":
            assert torch.equal(kept_grads[name], grad), name
        else:
            torch.testing.assert_close(kept_grads[name], grad, rtol=1e-2, atol=1e-4, msg=name)


def test_attention_kept_the_recomputation_skips_os_matmul(monkeypatch):
    check_attention_kept(monkeypatch)


def test_attention_kept_a_layer_launches_5_kernels_fewer(monkeypatch):
    """A training step's launches (tests/launch_count.py), attention kept: per layer the recomputation's attention,
    o's dequantization, its matmul (with the copy an addmm into a new tensor makes) and its update gone,
    91 -> 86."""
    from launch_count import step_launches
    gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(lora, "_fused", True)
    per_layer = [step_launches(monkeypatch, 2, 0.0, False, kept) - step_launches(monkeypatch, 1, 0.0, False, kept)
                 for kept in [False, True]]
    assert per_layer[0] - per_layer[1] == 5 and per_layer[1] <= 86, per_layer


def test_attention_is_kept_only_where_sdpa_takes_the_flash_kernel(monkeypatch):
    """Where SDPA would take another kernel (here: told to take the math path), nothing more is kept: a step's
    layers save their input alone and recompute attention, the same loss."""
    q = torch.randn(1, 4, 8, 16)
    out, lse, _ = layer_fused._kept_attention(q, q[:, :2], q[:, :2])  # grouped-query attention too
    assert out.shape == q.shape and lse.shape == (1, 4, 8)
    gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(lora, "_fused", True)
    ids = torch.randint(0, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    kept, forward = [], layer_fused._forward  # what each layer's forward keeps beyond x
    monkeypatch.setattr(layer_fused, "_forward", lambda *args, **kwargs: kept.append(
        (result := forward(*args, **kwargs))[1] is not None and not kwargs.get("recompute")) or result)
    losses = []
    for choice in [None, 0]:
        if choice is not None:
            monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *args, **kwargs: choice)
        kept.clear()
        torch.manual_seed(5)
        model = tiny_lora()
        model.keep_attention = True
        losses.append(model(ids[:, :-1], targets=ids[:, 1:]).item())
        assert kept == [choice is None] * 2  # x_2, attention's output and log-sum-exp; or nothing
    assert losses[0] == losses[1]


@pytest.mark.parametrize("by_hand", [False, True])
def test_cudnn_attention_is_tried_first_in_the_forward_and_the_recomputation(monkeypatch, by_hand):
    """``Llama.cudnn_attention`` (``train.py --cudnn-attention``): every SDPA call of three steps and an evaluation,
    the checkpointed layers' recomputations included, through autograd or written out by hand, is made with cuDNN's
    kernel first in SDPA's order, and torch's order is back after each; on the CPU, which has no cuDNN kernel, the
    same losses and LoRA gradients, bit for bit."""
    from torch.nn.attention import SDPBackend
    gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(layer_fused, "_fused_layer", by_hand)
    sdpa, firsts, before = torch.nn.functional.scaled_dot_product_attention, [], torch._C._get_sdp_priority_order()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *args, **kwargs: firsts.append(
        torch._C._get_sdp_priority_order()[0]) or sdpa(*args, **kwargs))
    results = []
    for cudnn in [False, True]:
        firsts.clear()
        results.append(steps(monkeypatch, False, True, True, cudnn_attention=cudnn))
        first = int(SDPBackend.CUDNN_ATTENTION) if cudnn else before[0]
        assert set(firsts) == {first} and len(firsts) >= 3 * 2 * 2 + 2  # 3 steps of 2 layers, each again in the
        # backward; the evaluation (and, through autograd, the test's look inside each layer's node)
        assert torch._C._get_sdp_priority_order() == before
    (losses, grads), (cudnn_losses, cudnn_grads) = results
    assert losses == cudnn_losses and grads.keys() == cudnn_grads.keys() and len(grads) == 32
    assert all(torch.equal(grads[name], cudnn_grads[name]) for name in grads)


def test_attention_kept_by_cudnns_kernel_calls_it_as_sdpa_does(monkeypatch):
    """Where SDPA would take cuDNN's kernel (CUDA; on fake CUDA tensors that run nothing, told so): attention is
    kept by that kernel, asked for its log-sum-exp, without a bias, causal, and its backward is given what the
    forward returned; the output reads as (B, T, heads * D) without a copy, the gradients as the layer takes them.
    The values are for a GPU to check (tests/test_gpu_attention.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in str(func):
                self.calls.append((str(func), args))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *args, **kwargs: int(SDPBackend.CUDNN_ATTENTION))
    with FakeTensorMode():
        qkv = torch.empty(2, 64, 3 * 4 * 16, device="cuda", dtype=torch.bfloat16)  # q, k, v's one output
        q, k, v = (t.view(2, 64, 4, 16).transpose(1, 2) for t in qkv.split(64, -1))  # (B, heads, T, D)
        with Calls() as seen:
            out, lse, backward = layer_fused._kept_attention(q, k, v, cudnn_first=True)
            a = out.transpose(1, 2).reshape(2, 64, -1)
            grads = layer_fused._kept_backward(q, k, v, out, lse, backward, torch.empty_like(a))
    (forward, forward_args), (backward_op, backward_args) = seen.calls
    assert forward == "aten._scaled_dot_product_cudnn_attention.default"
    assert forward_args[:3] == (q, k, v) and forward_args[3:] == (None, True, 0.0, True)  # bias, lse, dropout, causal
    assert backward_op == "aten._scaled_dot_product_cudnn_attention_backward.default"
    assert backward_args[1:6] == (q, k, v, out, lse) and backward_args[8] is None and backward_args[13:] == (0.0, True)
    assert out.shape == q.shape and lse.shape == (2, 4, 64, 1) and a._base is out  # a view
    assert [g.shape for g in grads] == [(2, 64, 64)] * 3


def test_train_py_says_which_attention_kernel_a_step_takes_and_whether_it_is_kept(monkeypatch):
    """``training_attention``, train.py's line on CUDA: SDPA's choice for a step's attention (asked with cuDNN's
    kernel first under ``cudnn_attention``), and with ``keep_attention`` whether that kernel's output is kept; here
    on the CPU, whose choice is its flash kernel, and told another."""
    from torch.nn.attention import SDPBackend
    model, choice, firsts = tiny_lora(), torch._fused_sdp_choice, []
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *args, **kwargs: firsts.append(
        torch._C._get_sdp_priority_order()[0]) or choice(*args, **kwargs))
    line = layer_fused.training_attention
    assert line(model, 2, 16, torch.float32, "cpu") == "attention: SDPA's flash kernel"
    model.keep_attention = model.cudnn_attention = True
    assert line(model, 2, 16, torch.float32, "cpu") == ("attention: SDPA's flash kernel (cuDNN's tried first: "
                                                        "--cudnn-attention); its output kept for the backward")
    assert firsts[1] == int(SDPBackend.CUDNN_ATTENTION) != firsts[0]
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *args, **kwargs: int(SDPBackend.EFFICIENT_ATTENTION))
    model.cudnn_attention = False
    assert line(model, 2, 16, torch.float32, "cpu") == ("attention: SDPA's memory-efficient kernel; --keep-attention "
                                                        "keeps nothing with it: attention is recomputed")
