"""One training step's loss and LoRA gradients, for tests/test_processes.py: run alone or under torchrun,
stepped as train.py steps (``accumulate``); each process saves its own."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bailong import load_preset, memory
from bailong.data import TokenData, read_corpus
from bailong.token_cache import tokenize
from bailong.training import SAMPLES
from bailong.lora import LoRAConfig, inject_lora, lora_parameters, mark_only_lora_trainable, use_fused_lora
from bailong.memory import use_chunked_mlp
from bailong.step_graph import accumulate, processes_normalizer


def main(out, batch_size, chunked=False, checkpointed=False):
    """``chunked``: the fused LoRA path with the MLP in chunks of 24 tokens (bailong.memory.ChunkedMLP), whose
    parameters' gradients come out of its own node; ``checkpointed``: that, and each layer checkpointed as a node
    of its own (bailong.recompute.Recomputed), the gradients of its parameters coming out of it."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model, tokenizer = load_preset("tiny", device="cpu", seed=0)
    if chunked or checkpointed:
        use_fused_lora(True)
        use_chunked_mlp(True)
        memory.MLP_CHUNK_VALUES = 24 * model.config.intermediate_size
    model.checkpointing = checkpointed
    model.train(checkpointed)  # checkpointing is for training (dropout is off)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    mark_only_lora_trainable(model)
    torch.manual_seed(1)
    with torch.no_grad():  # a nonzero update, the same in every process
        for p in lora_parameters(model).values():
            p.normal_(0, 0.05)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ids, labels, offsets = tokenize(tokenizer, read_corpus([SAMPLES / "en_sample.txt"]), Path(out) / "cache", 1)
    data = TokenData(ids, labels, offsets, 32)
    inputs, targets = data.batch(data.indices(0, batch_size, seed=0, rank=rank, world=world))
    for row, first in zip(targets, inputs[:, 0]):  # as SFT's answers: each example learns from a position of its own
        row[:int(first) % 29] = -100  # on, so the processes' counts of targeted tokens differ
    normalizer = processes_normalizer(targets, "cpu") if world > 1 else None  # as train.py steps
    loss = accumulate(lambda x, y: F.cross_entropy(ddp(x).flatten(0, 1), y.flatten()), inputs[None], targets[None],
                      normalizer)
    grads = {n: p.grad for n, p in lora_parameters(model).items()}
    torch.save({"loss": loss, "grads": grads}, Path(out) / f"step-{world}-{rank}.pt")
    if world > 1:
        del ddp  # DDP's reducer first, then the process group: the other order can abort at exit
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)  # c10d's static teardown sometimes aborts a finished process (torch 2.13, gloo)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["chunked"], sys.argv[3:] == ["checkpointed"])
