"""Train Bailong: vocabulary transfer + QLoRA pre-training, then multi-turn chat fine-tuning.

    python train.py --stage pretrain          # the embedded default: a few minutes on a CPU
    python train.py --stage sft               # continues from out/pretrain
    python chat.py                            # chats with out/sft
    python train.py --stage pretrain --model meta-llama/Llama-2-7b-hf --data zh_tw/ --new-pieces 27241

Sections below follow the recipe in order; the pieces live in bailong/.
Several GPUs: torchrun --nproc-per-node N train.py ... (each rank reads its share; rank 0 writes).
"""
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from bailong import load, load_preset, save
from bailong.adapter import save_adapter
from bailong.data import TokenData, data_paths, read_conversations, split, tokenize
from bailong.errors import BailongError, run_cli
from bailong.lora import LoRAConfig, inject_lora, lora_summary, mark_only_lora_trainable, merge_lora
from bailong.quantized import memory_report, quantize_model
from bailong.tokenizer import Tokenizer
from bailong.training import (Metrics, estimate_memory, latest_checkpoint, load_checkpoint, lr_at, parse_config,
                              prepare_output, save_checkpoint)
from bailong.vocab import add_pieces, read_corpus, tokens_per_char
from bailong.zip_tie import extend_model


def main(argv=None):
    config = parse_config(argv)

    # ---- processes and devices -------------------------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    torch.manual_seed(config.seed)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.startswith("cuda"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    if main_process:
        prepare_output(config)
    if world > 1:
        dist.barrier()
    out = Path(config.out)

    # ---- data first (so that mistakes in it surface before minutes of loading), then the base model ------
    items = read_corpus(data_paths(config.data)) if config.stage == "pretrain" else \
        read_conversations(data_paths(config.data))
    base_name = None
    if config.stage == "pretrain":
        if config.model:
            # projections quantized while loading, matrix by matrix; embedding and head stay dense to grow
            model, tokenizer = load(config.model, dtype=dtype, device=device,
                                    quantize="nf4" if config.quantize == "nf4" else None)
            base_name = config.model
            if tokenizer is None:
                raise BailongError(f"{config.model}: no tokenizer.model; vocabulary transfer needs one")
        else:  # the embedded default: a tiny random Llama that spells everything in bytes
            model, tokenizer = load_preset("tiny", dtype=dtype, device=device, seed=config.seed)
    else:
        if not Path(config.init).exists():
            raise BailongError(f"{config.init}: no such folder (run python train.py --stage pretrain first, "
                               "or pass --init)")
        model, tokenizer = load(config.init, dtype=dtype, device=device)
        merge_lora(model)  # Bailong-instruct starts from the merged Bailong model

    # ---- vocabulary transfer: new pieces, zip-tie embeddings ------------------------------------------
    if config.stage == "pretrain" and config.new_pieces:
        extended, added = add_pieces(tokenizer.proto(), items, config.new_pieces)
        new_tokenizer = Tokenizer(model_proto=extended.SerializeToString())
        say(f"vocabulary: +{len(added)} pieces ({tokenizer.vocab_size} -> {new_tokenizer.vocab_size}); "
            f"tokens per character {tokens_per_char(tokenizer, items):.3f} -> {tokens_per_char(new_tokenizer, items):.3f}")
        extend_model(model, tokenizer, new_tokenizer, config.init_method)
        tokenizer = new_tokenizer
    if config.seq_len > model.config.max_position_embeddings:
        raise BailongError(f"--seq-len {config.seq_len} is longer than the model's context "
                           f"({model.config.max_position_embeddings})")
    if base_name is None and main_process:  # a base that exists nowhere else: keep it beside the adapter
        save(model, out / "base")
        (out / "base" / "tokenizer.model").write_bytes(tokenizer.sp.serialized_model_proto())

    # ---- QLoRA: a frozen NF4 base, LoRA on every projection, the embedding and the head ----------------
    if config.quantize == "nf4":
        quantize_model(model)  # what is still dense (the embedded default, the merged SFT base)
    elif config.quantize != "none":
        raise BailongError(f"--quantize must be nf4 or none, not {config.quantize!r}")
    lora = LoRAConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, rslora=config.rslora)
    inject_lora(model, lora)
    mark_only_lora_trainable(model)
    model.checkpointing = config.checkpointing == "on" or (config.checkpointing == "auto" and "cuda" in device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # ---- tokenized data ----------------------------------------------------------------------------------
    train_items, eval_items = split(items, config.held_out, config.seed)
    if world > 1:  # rank 0 fills the token cache first; the others then read it
        if main_process:
            tokenize(tokenizer, train_items, out / "cache", config.workers)
        dist.barrier()
    data = TokenData(*tokenize(tokenizer, train_items, out / "cache", config.workers), config.seq_len,
                     tokenizer.eos_id)
    held_out = TokenData(*tokenize(tokenizer, eval_items, out / "cache", config.workers), config.seq_len,
                         tokenizer.eos_id, "held-out data") if eval_items else None

    # ---- optimizer, schedule, resume ----------------------------------------------------------------------
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if config.resume and (checkpoint := latest_checkpoint(out)):
        start = load_checkpoint(checkpoint, model, optimizer)
        say(f"resumed from {checkpoint} at step {start}")
    metrics = Metrics(out, keep_until=start) if main_process else None

    # ---- summary --------------------------------------------------------------------------------------------
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len * world
    say(f"stage {config.stage}: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
        f"vocabulary {model.config.vocab_size}, {device}, {world} process(es)")
    say(lora_summary(model))
    if config.quantize == "nf4":
        say(memory_report(model))
    say(f"data: {data.n} training and {held_out.n if held_out else 0} held-out examples of {config.seq_len} tokens; "
        f"{config.steps} steps of {tokens_per_step:,} tokens; memory {estimate_memory(model, config)}")

    def loss_of(inputs, targets):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = ddp_model(inputs.to(device))
        targets = targets.to(device)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               reduction="sum") / (targets != -100).sum().clamp(min=1)

    @torch.no_grad()
    def evaluate():
        model.eval()
        examples = list(range(held_out.n))
        chunks = [examples[i:i + config.batch_size] for i in range(0, len(examples), config.batch_size)]
        losses = [loss_of(*held_out.batch(c)).item() for c in chunks[:config.eval_batches]]
        model.train()
        return sum(losses) / len(losses)

    # ---- training loop ----------------------------------------------------------------------------------------
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, unit="step", dynamic_ncols=True,
               disable=None if main_process else True)  # None: shown on a terminal
    step, started = start, time.perf_counter()
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            total = 0.0
            for micro in range(config.grad_accum):
                batch = data.indices(step * config.grad_accum + micro, config.batch_size, config.seed, rank, world)
                loss = loss_of(*data.batch(batch)) / config.grad_accum
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                raise BailongError(f"the loss is {total} at step {step + 1}; stopped (last good checkpoint: "
                                   f"{latest_checkpoint(out) or 'none'})")
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{(done - start) * tokens_per_step / elapsed:,.0f}")
            if main_process:
                metrics.log(step=done, loss=total, lr=lr_at(step, config), tokens=done * tokens_per_step)
            if held_out and (done % config.eval_every == 0 or done == config.steps):
                eval_loss = evaluate()
                if main_process:
                    metrics.log(step=done, eval_loss=eval_loss, eval_ppl=math.exp(min(eval_loss, 50)))
                    metrics.plot()
                    bar.write(f"step {done}: held-out loss {eval_loss:.4f}, perplexity {math.exp(min(eval_loss, 50)):.2f}")
            if main_process and (done % config.save_every == 0 or done == config.steps):
                save_checkpoint(out, done, model, lora, tokenizer, optimizer, base_name)
    except KeyboardInterrupt:
        bar.close()
        done = step  # the step in progress is not kept
        if main_process and done > start:
            say(f"\ninterrupted: saved {save_checkpoint(out, done, model, lora, tokenizer, optimizer, base_name)}; "
                "continue with --resume")
        return 130
    bar.close()

    # ---- outputs ------------------------------------------------------------------------------------------------
    if main_process:
        save_adapter(model, out / "adapter", lora, base_name)
        (out / "adapter" / "tokenizer.model").write_bytes(tokenizer.sp.serialized_model_proto())
        first = next(r["loss"] for r in metrics.rows if "loss" in r)
        last = [r["loss"] for r in metrics.rows if "loss" in r][-10:]
        say(f"done: training loss {first:.4f} -> {sum(last) / len(last):.4f} (mean of the last 10 steps); "
            f"wrote {out}/adapter, metrics.jsonl, loss.png")
    if world > 1:
        del ddp_model  # DDP's reducer first, then the process group
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # c10d's static teardown sometimes aborts a finished process (seen with torch 2.13, gloo)
    return 0


if __name__ == "__main__":
    run_cli(main)
