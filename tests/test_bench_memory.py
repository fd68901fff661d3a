"""bench/bench_memory.py counts a training step's memory on fake tensors: what it counts is what the tensors of a
real step hold, on fake tensors it counts the same, and transformers + PEFT + bitsandbytes count too."""
import gc
import sys
import types

import pytest
import torch

from conftest import ROOT, allocator_peak, needs_triton

sys.path.insert(0, str(ROOT / "bench"))
import bench_host  # noqa: E402
from bench_memory import LiveBytes, step_peak  # noqa: E402


def tiny_config():
    from bailong.config import preset
    config = preset("tiny")
    config.num_hidden_layers = 2
    return config


STEP = types.SimpleNamespace(rank=4, dropout=0.05, embedding_and_head=True, batch=2, seq_len=32)


@pytest.mark.parametrize("path", ["plain", "fast, reference ops", *(pytest.param(p, marks=needs_triton) for p in (
    "fast, GPU's path", "fast, GPU's path, offloaded", "fast, GPU's path, offloaded, bf16 gradients")), "theirs"])
def test_a_step_counted_on_fake_tensors_holds_what_it_holds_on_real_ones(monkeypatch, path):
    """Peak and floor byte for byte (every path's switches on, kept dequantized weights or offloaded layer
    inputs, dropout): fake tensors keep the lifetimes of real ones. On the GPU's path the Triton launches are
    left out on both (under the interpreter a launch holds its arguments for a while; on a GPU it does not).
    Theirs too, to a few KiB (bitsandbytes runs on the CPU: its operations take our stand-in weights and
    quantization state; the codes are whatever memory held)."""
    from bailong import layer_fused, lora, memory
    fast = path != "plain"
    monkeypatch.setattr(lora, "_fused", fast)
    monkeypatch.setattr(memory, "_chunked_loss", fast)
    monkeypatch.setattr(memory, "_chunked_mlp", fast)
    monkeypatch.setattr(layer_fused, "_fused_layer", fast)
    if "GPU" in path:
        bench_host.on_the_gpus_path(layer_kernels=True, patch=monkeypatch.setattr)
    offload, theirs, bf16_grads = "offloaded" in path, path == "theirs", path.endswith("bf16 gradients")
    counts = []
    for fake in (False, True):
        torch.manual_seed(0)
        counts.append(step_peak(tiny_config(), STEP, keep=fast and not offload and not theirs, fake=fake,
                                offload=offload, theirs=theirs, bf16_grads=bf16_grads))
    real, fake = counts
    if theirs:  # bitsandbytes' CPU path may keep a buffer of its own between steps (one of 22 KiB seen here); on
        # fake tensors its constant tables are copied where it moves them to the device
        assert abs(real[1] - fake[1]) <= 32 * 1024 and abs(real[0] - fake[0]) <= 32 * 1024, (real, fake)
    else:
        assert real == fake
    assert real[0] > real[1] > 0


def test_offloaded_layer_inputs_leave_the_count():
    """With each checkpointed layer's input in host memory, the peak (in the last layer's backward, on a model
    whose layer inputs outweigh its logits) falls by all but about three layers' inputs: that layer's own,
    fetched back, the one before it, fetched ahead, and one the forward's end still holds."""
    config = tiny_config()
    config.num_hidden_layers, config.vocab_size = 8, 32
    step = types.SimpleNamespace(**{**vars(STEP), "seq_len": 1024})
    layer_input = step.batch * step.seq_len * config.hidden_size * 2  # bf16 under autocast
    peaks = [step_peak(config, step, offload=offload)[0] for offload in (False, True)]
    assert 5 * layer_input <= peaks[0] - peaks[1] <= 8 * layer_input, (peaks, layer_input)


def test_bf16_gradients_take_two_bytes_of_the_floor_a_projection_weight(monkeypatch):
    """``BF16Grads`` (bf16 gradients for the projections' LoRA weights, float32 ones for the embedding's and the
    head's) lowers the floor by 2 bytes a projection LoRA weight, and, with the LoRA casts made by layer (a rank
    large against the activations: the peak at the backward's end, as at the 7B recipe's shape with both), the
    peak."""
    from bailong import lora_casts
    monkeypatch.setattr(lora_casts, "_by_layer", True)
    config = tiny_config()
    step = types.SimpleNamespace(**{**vars(STEP), "rank": 64})
    h, q, kv, inter = (config.hidden_size, config.num_attention_heads * config.head_dim,
                       config.num_key_value_heads * config.head_dim, config.intermediate_size)
    weights = config.num_hidden_layers * step.rank * (2 * (h + q) + 2 * (h + kv) + 3 * (h + inter))
    (peak, floor), (bf16_peak, bf16_floor) = (step_peak(config, step, bf16_grads=b) for b in (False, True))
    assert floor - bf16_floor == 2 * weights and bf16_peak < peak, (floor, bf16_floor, peak, bf16_peak)


def test_theirs_count_on_fake_tensors():
    """transformers + PEFT + bitsandbytes step on fake tensors; between steps they hold what we hold and their
    float32 embedding, head and norms (prepare_model_for_kbit_training) more, give or take small things (the
    NF4 weights' tables, a few KiB of caches and random states)."""
    config, step = tiny_config(), types.SimpleNamespace(**{**vars(STEP), "dropout": 0.0})
    ours, theirs = (step_peak(config, step, theirs=theirs) for theirs in (False, True))
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    float32_more = 2 * (2 * config.vocab_size * config.hidden_size + norms)
    assert float32_more * 0.95 <= theirs[1] - ours[1] <= float32_more * 1.2, (ours, theirs, float32_more)
    assert theirs[0] > ours[0]


def test_what_it_counts_is_what_the_allocator_holds(tmp_path):
    """On a real CPU step the tensors' bytes at the end equal what the allocator holds, and their peak is the
    allocator's less at most the scratch some CPU kernels allocate without a tensor (a few percent)."""
    import bailong
    from bailong import lora
    from bailong.quantized import quantize_model
    torch.manual_seed(0)
    model = quantize_model(bailong.Llama(tiny_config()))
    lora.mark_only_lora_trainable(lora.inject_lora(model, lora.LoRAConfig(r=4, dropout=0.05)))
    model.checkpointing = True
    model.train()
    ids = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(0))
    gc.collect()  # nothing made before is freed inside
    with LiveBytes() as live:
        peak, held = allocator_peak(lambda: model(ids[:, :-1], targets=ids[:, 1:]).backward(), tmp_path)
    assert live.now == held > 0
    assert 0.95 * peak <= live.peak <= peak, (live.peak, peak)


def test_traffic_counts_what_a_kernel_reads_and_writes():
    """A copy reads and writes its bytes; an in-place add reads two and writes one, and an in-place operation
    that returns nothing writes what its schema marks (AdamW's weights and moments); a view, an allocation and
    a matmul move nothing here (matmuls are counted apart); the embedding reads only the rows it writes; a
    Triton launch moves its tensor arguments."""
    from traffic import Traffic
    x, w = torch.ones(4, 8), torch.ones(100, 8)
    ids = torch.tensor([1, 2, 3])
    with Traffic() as traffic:
        y = x.to(torch.float16)  # 128 read, 64 written
        x.add_(x)  # 128 read twice, 128 written
        x.view(8, 4).t()
        torch.empty(1000)
        x @ x.T
        torch.nn.functional.embedding(ids, w)  # 3 rows of 32 bytes, read and written
        traffic.launch("_a_kernel")[(1,)](y, 3, BLOCK=4)  # 64
        torch._foreach_copy_([y], [x])  # 128 read, 64 written
        p = torch.zeros(100)
        torch.optim.AdamW([torch.nn.Parameter(p)], fused=True)  # nothing yet
        param, grad, m, v = (torch.zeros(100) for _ in range(4))
        torch._fused_adamw_([param], [grad], [m], [v], [], [torch.ones(())], lr=0.1, beta1=0.9, beta2=0.99,
                            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)  # 4 x 400 + 4 read, 3 x 400
    assert dict(traffic.bytes) == {"aten::_to_copy": 192, "aten::add_": 384, "aten::embedding": 192, "_a_kernel": 64,
                                   "aten::_foreach_copy_": 192, "aten::zeros": 2000, "aten::ones": 4,
                                   "aten::_fused_adamw_": 4 * 400 + 4 + 3 * 400}
    assert traffic.kernels["aten::_fused_adamw_"] == traffic.kernels["aten::add_"] == 1
    assert dict(traffic.matmuls) == {"aten::mm": 1}


@pytest.mark.parametrize("embedding_and_head", [False, True])
def test_an_offloaded_embedding_leaves_the_count(embedding_and_head):
    """With the embedding's table in host memory, the floor and the peak fall by its bytes exactly, with LoRA
    on it or not; a step's rows are still counted, as the GPU's copy of them."""
    config = tiny_config()
    step = types.SimpleNamespace(**{**vars(STEP), "embedding_and_head": embedding_and_head})
    (peak, floor), (offloaded_peak, offloaded_floor) = (step_peak(config, step, embedding=e) for e in (False, True))
    table = config.vocab_size * config.hidden_size * 2  # bf16
    assert floor - offloaded_floor == table and peak - offloaded_peak == table, (peak, offloaded_peak, table)
