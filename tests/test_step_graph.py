"""bailong.step_graph: a training step captured as a CUDA graph trains as the eager step does. The capture and
replay are emulated on the CPU (tests/graph_capture.py: the recorded operations, not the Python, run again), on
the CPU's path and on the GPU's (the kernels interpreted); and the emulation finds what a capture breaks."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from graph_capture import emulated_cuda_graphs
from test_layer_kernels import gpu_path, tiny_nf4

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def qlora_model(dtype, device="cpu", dropout=0.0):
    """``tiny_nf4``'s 2-layer model with LoRA r = 4 (and ``dropout``) on the projections, embedding and head, B's
    not zero (so every LoRA weight has a gradient), in train mode with activation checkpointing,
    as train.py runs it on CUDA."""
    from bailong import lora
    model = tiny_nf4(2).to(device=device, dtype=dtype)
    torch.manual_seed(1)
    lora.mark_only_lora_trainable(lora.inject_lora(model, lora.LoRAConfig(r=4, dropout=dropout)))
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.checkpointing = True
    return model.train()


def train(model, step_loss, steps=5, accum=2):
    """``steps`` optimizer steps as train.py takes them (clipping, AdamW, zero_grad to None): the losses, the
    LoRA weights at the end, and each step's LoRA gradients (as one float32 vector, before clipping)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    data = torch.Generator().manual_seed(0)
    losses, grads = [], []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (accum, 2, 17), generator=data)
        targets = ids[..., 1:].clone()
        targets[0, 0, :5] = -100  # a masked stretch, as SFT's prompts are
        losses.append(step_loss(ids[..., :-1], targets).item())
        grads.append(torch.cat([p.grad.float().flatten() for p in trainable]))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, [p.detach().clone() for p in trainable], grads


def check_graphed(monkeypatch, fast_paths, chunked, device="cpu", dropout=0.0, by_layer=False):
    """Five steps of two micro-batches: one eager warm-up, one captured and replayed, three replayed; the losses,
    each step's gradients and the trained LoRA weights of eager training (on CUDA: the losses and the first two
    steps' gradients, to its kernels' nondeterminism). The model's forward runs only for the warm-up and the
    capture. ``fast_paths``: bf16 autocast, the fused LoRA nodes, the layer kernels and the layer by hand, and
    the NF4 kernels (on the CPU interpreted); else float32 through PyTorch (the CPU's path). ``chunked``: the
    loss and the MLP chunk by chunk, and the recomputation's dequantized weights kept for the backward.
    ``dropout`` (the fast paths only): LoRA dropout through its kernels, each replay drawing the masks the eager
    step draws: every mask a step draws (forward, recomputation, backward), exactly, on CUDA too
    (``recording_masks``). ``by_layer``: the LoRA casts made a layer at a time (``use_casts_by_layer``)."""
    import bailong_kernels
    from bailong import layer_fused, lora, lora_casts, lora_fused, memory
    from bailong.step_graph import GraphedStep, accumulate
    dtype = torch.bfloat16 if fast_paths else torch.float32
    if fast_paths and device == "cpu":
        gpu_path(monkeypatch, fused_step=False, layer_kernels=True)
    monkeypatch.setattr(bailong_kernels, "_layer_kernels", fast_paths)
    monkeypatch.setattr(lora, "_fused", fast_paths)
    monkeypatch.setattr(lora_casts, "_by_layer", by_layer)
    monkeypatch.setattr(lora_fused, "_one_at_a_time", by_layer)  # as use_casts_by_layer sets them
    monkeypatch.setattr(layer_fused, "_fused_layer", fast_paths)
    monkeypatch.setattr(memory, "_chunked_loss", chunked)
    monkeypatch.setattr(memory, "_chunked_mlp", chunked)
    monkeypatch.setattr(memory, "LOSS_CHUNK_LOGITS", 10 * 512)  # 4 chunks of the 32 tokens
    monkeypatch.setattr(memory, "MLP_CHUNK_VALUES", 12 * 192)  # 3 chunks

    def loss_of(model):
        def loss(inputs, targets):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=fast_paths):
                return model(inputs.to(device), targets=targets.to(device))
        return loss
    masks = recording_masks(monkeypatch) if dropout else None
    eager = qlora_model(dtype, device, dropout)
    eager.keep_dequantized = chunked
    eager_step, expected_masks = masks_by_step(lambda x, y: accumulate(loss_of(eager), x, y), masks)
    expected, expected_weights, expected_grads = train(eager, eager_step)

    model, forwards = qlora_model(dtype, device, dropout), []
    model.keep_dequantized = chunked
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: forwards.append(1) or forward(*a, **k))
    step = GraphedStep(loss_of(model), model, warmup=1)
    graphed_step, step_masks = masks_by_step(step, masks)
    with emulated_cuda_graphs(monkeypatch) if device == "cpu" else contextlib.nullcontext():
        losses, weights, grads = train(model, graphed_step)
    assert step.graph is not None and len(forwards) == 4  # 2 micro-batches eagerly, 2 captured; 8 replayed
    assert len(set(losses)) == 5
    if dropout:  # 2 micro-batches: each of 2 layers draws q, k, v and o's masks and gate, up and down's (for each of
        # the MLP's 3 chunks) in the forward, the recomputation and the backward; the head (for each of the loss's 4
        # chunks) in the forward and the backward
        mlp, head = (3 * 3, 4) if chunked else (3, 1)
        drawn = 2 * (2 * 3 * (4 + mlp) + 2 * head)
        assert [len(m) for m in step_masks] == [len(m) for m in expected_masks] == [drawn] * 5
        for i, (ours, theirs) in enumerate(zip(step_masks, expected_masks)):
            assert all(map(torch.equal, ours, theirs)), f"step {i + 1}: replayed masks differ from eager's"
            assert i == 0 or not torch.equal(ours[0], step_masks[i - 1][0]), "a replay drew the last step's masks"
    if device != "cpu":  # atomics in cuBLAS's and attention's backward add in any order
        # the warm-up's and the first replay's gradients, by their distance relative to their norm: emulated on
        # the CPU, masks drawn again from a random state restored on the host put the first replay's 0.30 away,
        # and noise of 1e-2 (relative, each value) in the warm-up's puts the first replay's 4e-3 away (later
        # steps drift further: 2e-2 to 3e-2 by the fifth, through AdamW)
        errors = [float((ours - theirs).norm() / theirs.norm()) for ours, theirs in zip(grads, expected_grads)]
        assert max(errors[:2]) <= 5e-2, f"gradients' relative distance from eager's, step by step: {errors}"
        torch.testing.assert_close(losses, expected, rtol=2e-3, atol=0)  # that mutant's part by more from step 4
        return
    assert losses == expected, f"replayed losses {losses}, eager {expected}"
    assert all(map(torch.equal, grads, expected_grads)), "replayed gradients differ from eager's"
    for ours, theirs in zip(weights, expected_weights, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def recording_masks(monkeypatch):
    """Every mask LoRA dropout's kernels draw from here on, kept as it is drawn (a bool tensor, the values
    kept), in a list: ``bailong_kernels.dropout``'s two wrappers also draw the key's masks of ones. Their
    tensors are made as the step's are: in a capture, the graph's own, which each replay writes again."""
    from bailong_kernels import dropout as kernels
    masks, dropout, dropout_sum = [], kernels.dropout, kernels.dropout_sum

    def dropped(x, n, p, key):
        masks.extend(dropout(torch.ones_like(x), n, p, key) != 0)
        return dropout(x, n, p, key)

    def summed(g, key, p, out=None):
        masks.extend(dropout(torch.ones_like(g[0]), len(g), p, key) != 0)
        return dropout_sum(g, key, p, out)
    monkeypatch.setattr(kernels, "dropout", dropped)
    monkeypatch.setattr(kernels, "dropout_sum", summed)
    return masks


def masks_by_step(step_loss, masks):
    """``step_loss``, and a list to which each call adds a copy of the masks it drew (``recording_masks``): those
    it recorded, or where it recorded none (a graph's replay), those of the last call that did (the capture's,
    which the replay wrote). Masks None: ``step_loss`` itself, nothing recorded."""
    steps, last = [], []
    if masks is None:
        return step_loss, steps

    def step(inputs, targets):
        first = len(masks)
        loss = step_loss(inputs, targets)
        last[:] = masks[first:] or last
        steps.append([m.clone() for m in last])
        return loss
    return step, steps


@pytest.mark.parametrize("fast_paths,chunked,dropout", [(False, False, 0.0), (True, False, 0.0), (True, True, 0.0),
                                                         (True, False, 0.1), (True, True, 0.1)])
def test_graphed_steps_train_as_eager_ones(monkeypatch, fast_paths, chunked, dropout):
    check_graphed(monkeypatch, fast_paths, chunked, dropout=dropout)


def test_graphed_steps_with_casts_by_layer_train_as_eager_ones(monkeypatch):
    check_graphed(monkeypatch, True, False, dropout=0.1, by_layer=True)


def test_the_emulation_finds_masks_drawn_from_a_random_state_restored_on_the_host(monkeypatch):
    """What the dropout cases above rest on: with each mask's seed drawn from the random state and a
    recomputation drawing it again from the state restored on the host (the kernels' keys before, and torch's
    dropout), eager training is right, but the replays train on other masks than the eager steps."""
    from bailong import model
    monkeypatch.setattr(model, "mask_seeds", contextlib.nullcontext)  # no forward's seed: one drawn a mask
    with pytest.raises(AssertionError, match="replayed masks differ from eager.s"):
        check_graphed(monkeypatch, True, False, dropout=0.1)


def test_the_emulated_capture_finds_what_a_graph_breaks(monkeypatch):
    """What the emulation must catch for the test above to mean anything: work a cache skipped while capturing
    is never replayed (its stale result is), a capture changes no memory that existed before it and leaves what
    it made holding nothing, and the host reading a device value inside it fails."""
    weight, cache = torch.ones(3), {}

    def doubled(x):  # caches 2 * weight on the host, as if weight never changed
        if "w" not in cache:
            cache["w"] = weight * 2
        return x * cache["w"]

    x, total = torch.ones(3), torch.zeros(3)
    doubled(x)  # eager: the cache is filled
    with emulated_cuda_graphs(monkeypatch):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = doubled(x)
            total.add_(y)
        assert total.tolist() == [0, 0, 0] and y.isnan().all()  # capturing ran nothing
        weight.fill_(5)
        graph.replay()
        assert y.tolist() == [2, 2, 2] and total.tolist() == [2, 2, 2]  # eagerly 10: the stale cache replayed
        for read, name in [(lambda t: t.sum().item(), "_local_scalar_dense"), (lambda t: t.tolist(), "tolist"),
                           (lambda t: t.cpu(), "cpu"), (lambda t: bool(t.sum()), "is_nonzero|_local_scalar_dense"),
                           (lambda t: t[t > 1], "aten::index"), (lambda t: t.nonzero(), "aten::nonzero")]:
            with pytest.raises(RuntimeError, match=f"({name}).*: the host reads a device value"):
                with torch.cuda.graph(torch.cuda.CUDAGraph()):
                    read(x * 2)


@pytest.mark.parametrize("fused,kernels", [(False, False), (True, False), (False, True)])
def test_a_step_with_torchs_dropout_is_refused(monkeypatch, fused, kernels):
    """LoRA dropout by torch's kernel (the plain path, or the fused one without the layer kernels) is drawn again
    in a recomputation from the random state restored on the host: refused. Through LoRA dropout's kernels, on
    the fused path, taken (the cases above)."""
    from bailong import lora, lora_fused
    from bailong.step_graph import GraphedStep
    monkeypatch.setattr(lora, "_fused", fused)
    monkeypatch.setattr(lora_fused, "seeded_dropout", lambda x: kernels or None)
    model = lora.mark_only_lora_trainable(lora.inject_lora(tiny_nf4(1), lora.LoRAConfig(r=4, dropout=0.05)))
    with pytest.raises(ValueError, match="LoRA dropout's masks only through its kernels .* set LoRA dropout to 0"):
        GraphedStep(lambda x, y: None, model)
    monkeypatch.setattr(lora, "_fused", True)
    monkeypatch.setattr(lora_fused, "seeded_dropout", lambda x: True)
    GraphedStep(lambda x, y: None, model)


@pytest.mark.parametrize("switched", [{}, {"BAILONG_FUSED_LORA": "0"}, {"BAILONG_LAYER_KERNELS": "0"},
                                      {"BAILONG_FUSED_LORA": "1", "BAILONG_LAYER_KERNELS": "1"},
                                      {"BAILONG_FUSED_LORA": "1", "BAILONG_LAYER_KERNELS": "1",
                                       "BAILONG_NF4_KERNELS": "0"}])
@pytest.mark.parametrize("triton", [True, False])
def test_train_py_takes_a_graph_with_dropout_only_through_its_kernels(monkeypatch, switched, triton):
    """train.py's check, before torch loads, as the environment switches the paths (their modules read the same
    variables): ``--cuda-graph`` with LoRA dropout taken with the fused LoRA and the layer kernels (the default;
    NF4 kernels not off), refused where one is switched off; without dropout, taken. On CUDA without Triton,
    refused as ``--keep-attention`` is (their kernels are Triton's)."""
    from bailong import training
    from bailong.errors import UsageError
    from bailong.training import check_on_device, parse_config
    monkeypatch.setattr(training, "triton_installed", lambda: triton)
    for name in ("BAILONG_FUSED_LORA", "BAILONG_LAYER_KERNELS", "BAILONG_NF4_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in switched.items():
        monkeypatch.setenv(name, value)
    taken = "0" not in switched.values()
    check_on_device(config := parse_config(["--cuda-graph", "--lora-dropout", "0"]), "cuda")
    assert config.cuda_graph
    if not taken:
        with pytest.raises(UsageError, match="captures LoRA dropout only through its kernels"):
            parse_config(["--cuda-graph"])
        return
    for args, refused in [(["--cuda-graph"], "captures LoRA dropout only through its kernels, and Triton is not "
                           "installed"), (["--keep-attention"], "with Triton's kernels, and Triton is not installed")]:
        config = parse_config(args)
        if triton:
            check_on_device(config, "cuda")
        else:
            with pytest.raises(UsageError, match=refused):
                check_on_device(config, "cuda")


@pytest.mark.parametrize("fused,in_backward", [(False, False), (True, False), (False, True), (True, True)])
def test_a_step_that_cannot_be_captured_trains_eagerly(monkeypatch, fused, in_backward):
    """A step that reads a device value on the host, in its loss or (``in_backward``) halfway through the
    backward, at the gradient of the second layer's output, with the dequantized weights kept for the
    backward: the capture fails, is warned about, and the steps run eagerly, as without a graph. None of them
    takes a copy the failed capture made, which holds nothing: the LoRA weights' (on the fused path), or the
    dequantized weights a recomputation kept for a backward that never came."""
    from bailong import lora
    from bailong.step_graph import GraphedStep, accumulate
    monkeypatch.setattr(lora, "_fused", fused)
    read = []

    def loss_of(model):
        def loss(inputs, targets):
            value = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
            if not in_backward:
                read.append(value.item())  # the host waits for the device: not capturable
            return value
        return loss

    def qlora(dtype):
        model = qlora_model(dtype)
        model.keep_dequantized = in_backward
        if in_backward:
            def output(module, args, out):  # a recomputation's output wants a gradient
                if out.requires_grad:
                    out.register_hook(lambda g: read.append(g.sum().item()))
            model.model.layers[1].register_forward_hook(output)
        return model
    eager = qlora(torch.float32)
    expected = train(eager, lambda x, y: accumulate(loss_of(eager), x, y), steps=3)[0]
    assert read
    model = qlora(torch.float32)
    with emulated_cuda_graphs(monkeypatch) as graphs:
        step = GraphedStep(loss_of(model), model, warmup=1)
        with pytest.warns(UserWarning, match="CUDA graph capture failed, training without it: .*host reads"):
            assert train(model, step, steps=3)[0] == expected
    assert not graphs and step.graph is None and step.failed.startswith("RuntimeError: ")


def test_a_failed_capture_is_told_by_what_interrupted_it():
    """On CUDA the operation that cannot be captured invalidates the capture, and leaving it raises an error of
    its own, in the handling of the first: both are told, the first first."""
    from bailong.step_graph import capture_failure
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        assert capture_failure(e) == ("RuntimeError: CUDA error: operation not permitted when stream is capturing "
                                      "(then RuntimeError: CUDA error: operation failed due to a previous error "
                                      "during capture)")
    assert capture_failure(ValueError("no cause")) == "ValueError: no cause"


@pytest.mark.parametrize("capturing", [False, True])
def test_while_captured_torchs_checkpoint_keeps_no_random_state(monkeypatch, capturing):
    """On the plain LoRA path a checkpointed layer goes through torch's checkpoint, whose forward reads the CUDA
    generator's state to restore it for the recomputation; many torch versions refuse that read inside a
    capture (a captured step's only masks are LoRA dropout's kernels', keyed without it): told not to, while a
    graph is captured, and only then."""
    import torch.utils.checkpoint

    from bailong import lora, recompute
    told, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(lora, "_fused", False)
    monkeypatch.setattr(recompute, "capturing", lambda x: capturing)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: told.append(k["preserve_rng_state"]) or checkpoint(*a, **k))
    model = qlora_model(torch.float32)
    model(torch.arange(16)[None], targets=torch.arange(1, 17)[None]).backward()
    assert told == [not capturing] * 2  # a layer each


def test_train_py_with_a_cuda_graph_trains_as_without(tmp_path, capsys, monkeypatch):
    """``train.py --cuda-graph`` on the embedded default on the CPU, the capture emulated (its check for CUDA let
    through): the per-step and held-out losses of the run without, bit for bit, with checkpointing on (as on
    CUDA), two micro-batches a step, and evaluations and checkpoints between the replays."""
    import train
    from train_runs import evals, losses, run_train
    monkeypatch.setattr(train, "check_graph_step", lambda world, device=None: None)
    args = ["--steps", "6", "--eval-every", "3", "--save-every", "3", "--lora-dropout", "0", "--checkpointing", "on",
            "--grad-accum", "2", "--batch-size", "4", "--device", "cpu"]
    run_train(capsys, *args, "--out", tmp_path / "eager")
    with emulated_cuda_graphs(monkeypatch) as graphs:
        run_train(capsys, *args, "--cuda-graph", "--out", tmp_path / "graph")
    assert len(graphs) == 1
    eager, graph = tmp_path / "eager", tmp_path / "graph"
    assert losses(graph) == losses(eager) and len(losses(graph)) == 6 and len(set(losses(graph))) == 6
    assert evals(graph) == evals(eager) and len(evals(graph)) == 3


def test_with_torchrun_a_cuda_graph_is_refused_before_any_process_group(tmp_path, monkeypatch):
    """Several processes (torchrun sets WORLD_SIZE): refused in one line before torch starts their group, so
    that each does not stop on its own, and before anything is written."""
    import torch.distributed

    import train
    from bailong.errors import UsageError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("a group started"))
    with pytest.raises(UsageError, match=r"^--cuda-graph captures one process's step, not DDP's exchange .* torchrun"):
        train.main(["--cuda-graph", "--lora-dropout", "0", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fast_paths,chunked,dropout", [(False, False, 0.0), (True, False, 0.0), (True, True, 0.0),
                                                         (True, False, 0.1), (True, True, 0.1)])
def test_on_cuda_graphed_steps_train_as_eager_ones(monkeypatch, fast_paths, chunked, dropout):
    """``bailong.step_graph``, captured and replayed on CUDA: the losses and the first two steps' gradients of
    eager training, to its kernels' nondeterminism, and with dropout every mask of every step exactly the eager
    step's, the recomputation's and the backward's too (the CPU's test emulates the capture; this one is the real
    thing)."""
    check_graphed(monkeypatch, fast_paths, chunked, device="cuda", dropout=dropout)


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_train_py_with_a_cuda_graph_trains_as_without(tmp_path, capsys):
    """``train.py --cuda-graph`` on the embedded default (bf16 on CUDA, checkpointing on; two micro-batches a step,
    no warm-up of the learning rate, so that the losses move at once): captured (no warning of a failed capture),
    and the per-step and held-out losses of the eager run, to bf16 noise, well inside how far they move."""
    import warnings

    from train_runs import evals, losses, run_train
    runs = {}
    for name, graph in [("eager", []), ("graph", ["--cuda-graph"])]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_train(capsys, "--steps", "12", "--eval-every", "6", "--lora-dropout", "0", "--warmup", "0",
                      "--grad-accum", "2", *graph, "--out", tmp_path / name)
        assert not [w for w in caught if "CUDA graph capture failed" in str(w.message)]
        runs[name] = losses(tmp_path / name) + evals(tmp_path / name)
    assert len(runs["graph"]) == 12 + 3  # the untrained model's held-out loss, then at steps 6 and 12
    assert runs["eager"][11][1] < 0.95 * runs["eager"][0][1]  # on the CPU: 6.31 -> 5.70 (float32)
    for (step, ours), (_, theirs) in zip(runs["graph"], runs["eager"], strict=True):
        assert abs(ours - theirs) <= 1e-2 * abs(theirs), step
