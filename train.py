"""Train Bailong: vocabulary transfer + QLoRA pre-training, then multi-turn chat fine-tuning.

    python train.py --stage pretrain          # the embedded default: about 10 seconds on a CPU
    python train.py --stage sft               # continues from out/pretrain
    python chat.py                            # chats with out/sft
    python train.py --stage pretrain --model meta-llama/Llama-2-7b-hf --data zh_tw/ --new-pieces 27241

Sections below follow the recipe in order; the pieces live in bailong/.
Several GPUs: torchrun --nproc-per-node N train.py ... (each rank reads its share; rank 0 writes).
"""
import contextlib
import math
import os
import shutil
import sys
import time
from pathlib import Path

from bailong.errors import BailongError, UsageError, loading, run_cli, signals_held

with loading(__name__):  # Ctrl-C meanwhile: answered once the modules have loaded
    from tqdm import tqdm
    from bailong.files import atomic_folder, own_file
    from bailong.hub import resolve
    from bailong.outputs import check_context, check_model, model_file
    from bailong.run_folder import RunFolder, release_lock
    from bailong.runs import check_output, fingerprints, prepare_output, read_run, seen, start_run, trained_vocabulary
    from bailong.processes import (all_here, called, check_processes, rank_0_done, return_freed_memory,
                                    same_steps_done, tokens_of_rank_0)
    from bailong import progress
    from bailong.progress import GracefulStop, Metrics, estimate_memory, held_out_record, lr_at, progress_line, summary
    from bailong.training import LESS_MEMORY, check_graph_step, check_on_device, parse_config


# what a fine-tuning run's base keeps of its --init's files, where the tokenizer did not write them: the model's
# sampling, tokenizer settings and chat template (which it is fine-tuned in)
SFT_KEPT = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def main(argv=None):
    """The command from Python: ``main(["--steps", "20"])`` (``main()``: the defaults); see processes.called."""
    config = parse_config(argv)
    with contextlib.ExitStack() as undo:  # done, stopped or failed: what the run set in the process undone
        undo.callback(release_lock, config.out)  # the folder free again (for this process too, as in a notebook)
        return called(train, config, undo)


def train(config, undo):
    # ---- the output folder: checked before torch loads, so that a mistake is answered at once ----------------
    world, rank = check_processes(config)
    check_context(config)
    check_model(config)
    done_before = check_output(config, world)  # every process, so that all of them stop on a mistake
    # a fine-tuning run resumed goes on from the merged base it keeps, whatever became of --init
    own_base = config.stage == "sft" and config.resume and done_before and RunFolder(Path(config.out)).has_base()
    for name in SFT_KEPT if config.stage == "sft" and not own_base else ():
        if source := model_file(config.init, name):
            own_file(source)  # not linked from elsewhere (a token file): it would be copied into the run
    seen_before = seen(Path(config.out))  # checked again under the folder's lock: another run may train there meanwhile
    # a run an earlier version began (recording no runs.READING) goes on with the examples it began with
    as_begun = config.resume and bool(done_before) and "reading" not in (read_run(Path(config.out)) or {}).get(
        "inputs", {})
    out = Path(config.out)
    run = RunFolder(out)  # touched only once the data and the model have loaded

    # ---- the libraries (importing torch alone takes about a second) ------------------------------------------
    with signals_held():  # Ctrl-C while torch loads: answered once it has
        import torch
        import torch.distributed as dist

    from bailong.chat_template import model_template
    from bailong.checkpoints import resume, rng_states, save_checkpoint, save_result
    from bailong.data import TokenData, stage_items
    from bailong.layer_fused import training_attention
    from bailong.lora import LoRAConfig, inject_lora, lora_summary, mark_only_lora_trainable, merge_lora
    from bailong.lora_casts import use_casts_by_layer
    from bailong.memory import BF16Grads, offload_embedding
    from bailong.optim import build_optimizer
    from bailong.quantized import memory_report, quantize_model
    from bailong.step_graph import GraphedStep, accumulate, processes_normalizer
    from bailong.token_cache import tokenize
    from bailong.tokenizer import byte_tokenizer, open_tokenizer, tokenizer_found
    from bailong.vocab import extend_tokenizer, extension_from, fewer_tokens, learning_message
    from bailong.weights import default_device, fingerprint, load, load_preset, save
    from bailong.zip_tie import extend_model, extends

    # ---- processes and devices -------------------------------------------------------------------
    device = config.device or default_device()
    if world > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    same_steps_done(done_before if config.resume else 0, out, world, rank)  # (another machine's disk may lack it)
    torch.manual_seed(config.seed)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.startswith("cuda"))
    dtype = torch.bfloat16 if bf16 else torch.float32
    checkpointing = config.checkpointing == "on" or (config.checkpointing == "auto" and device.startswith("cuda"))
    check_on_device(config, device)
    if config.cuda_graph:
        check_graph_step(world, device)

    # ---- data first, so that mistakes in it surface before minutes of loading ------------------------------
    # (read again on each pass, not held; under torchrun rank 0's alone: the others open the tokens it caches)
    items, train_items, eval_items = stage_items(config) if main_process else (None, None, None)

    # ---- vocabulary (pre-training): the base's tokenizer, extended with pieces learned on the data ----------
    base_folder = resolve(config.model) if config.stage == "pretrain" and config.model else None
    new_tokenizer = None
    if config.stage == "pretrain":
        tokenizer = tokenizer_found(open_tokenizer(base_folder), config.model,
                                    "vocabulary transfer and training need one") if base_folder else byte_tokenizer()
        # a resumed run goes on with the pieces its checkpoints learned (this version may learn others); a new one
        # learns them from the training share only: the held-out loss is measured on unseen text
        if config.new_pieces:
            new_tokenizer = trained_vocabulary(Path(config.out)) if config.resume and done_before else None
            if new_tokenizer is None or not extends(tokenizer, new_tokenizer):  # (another base: refused below)
                if main_process:  # learned once (the trainer takes every core, and ~24 bytes a byte of its text)
                    say(learning_message(config.new_pieces, train_items))
                    new_tokenizer, _ = extend_tokenizer(tokenizer, train_items, config.new_pieces,
                                                        not config.all_pieces, say)
                if world > 1:  # the others take rank 0's
                    new_tokenizer = extension_from(tokenizer, rank_0_done(
                        "the vocabulary", world, rank, new_tokenizer.serialized() if main_process else b""))
            if main_process:  # (a large corpus is tokenized whole once, below)
                before, after = tokenizer.vocab_size, new_tokenizer.vocab_size
                say(f"vocabulary: +{after - before} pieces ({before} -> {after}); "
                    + fewer_tokens(tokenizer, new_tokenizer, eval_items, train_items))

    # ---- the model: the base, its embedding and head grown with zip-tie rows for the new pieces --------------
    if base_folder:  # projections quantized while loading, matrix by matrix; embedding and head stay dense to grow
        model, _ = load(base_folder, dtype=dtype, device=device, quantize="nf4" if config.quantize == "nf4" else None)
    elif config.stage == "pretrain":  # the embedded default: a tiny random Llama that spells everything in bytes
        model, _ = load_preset("tiny", dtype=dtype, device=device, seed=config.seed)
    else:  # a fine-tuning run continues on the merged base it started from, whatever --init is now; loaded
        # dense, so that the adapter merges onto the original weights (quantized below, as any base)
        model, tokenizer = load(run.base if own_base else config.init, dtype=dtype, device=device)
        merge_lora(model)  # Bailong-instruct starts from the merged Bailong model
        tokenizer = tokenizer_found(tokenizer, config.init, "training needs one")
    if new_tokenizer is not None:
        extend_model(model, tokenizer, new_tokenizer, config.init_method, config.seed)
        tokenizer = new_tokenizer
    check_context(config, model.config.max_position_embeddings)
    if main_process:  # the folder's lock: nothing was touched before this line
        found = fingerprints(config, items, base_folder, tokenizer)
        prepare_output(config, found, say, world, seen_before)
    rank_0_done("the run folder", world, rank)

    # ---- tokenized data (the token cache: the only write before the run starts) --------------------------------
    # the format chat.py will use the model in: --init's template (a pre-training run's: its base's), or the one
    # the run's kept base holds
    template = model_template(tokenizer, run.base if own_base else config.init) if config.stage == "sft" else None
    if config.stage == "sft":
        say("chat format: " + ("the model's chat_template" if template else "Llama 2's"))

    def tokenized(parts):  # each part's tokens (a part without items: None)
        return [tokenize(tokenizer, part, run.cache, config.workers, template) if part else None for part in parts]
    tokens = tokenized((train_items, eval_items)) if main_process else None  # rank 0 fills the token cache alone
    if world > 1:  # the others open it (where their disk lacks it, another machine's, they tokenize their own)
        tokens = tokens_of_rank_0(tokens, run.cache, world, rank) or tokenized(stage_items(config)[1:])
    del items, train_items, eval_items  # (a pipe's text, held) not kept through training: its tokens are mapped
    return_freed_memory()
    pad_id = max(tokenizer.eos_id, 0)  # padding is masked from the loss; a tokenizer.json may lack eos
    data = TokenData(*tokens[0], config.seq_len, pad_id, bos=tokenizer.adds_bos, leave_out=not as_begun)
    held_out = TokenData(*tokens[1], config.seq_len, pad_id, "held-out data", tokenizer.adds_bos,
                         not as_begun) if tokens[1] else None
    if config.batch_size * world > data.n:  # each batch would hold examples several times over, all in memory
        processes = f" x {world} processes" if world > 1 else ""
        raise UsageError(f"--batch-size {config.batch_size}{processes} is more than the {data.n} training examples")
    if main_process:  # the data make examples: an old run --overwrite replaces goes only now
        start_run(config, found, world, say, data.files() | (held_out.files() if held_out else set()))
    # named in the adapter's config (a local folder by its whole path, found from anywhere); a base without a
    # name is kept in the run
    base_name = str(base_folder.absolute()) if base_folder and Path(config.model).expanduser().is_dir() else \
        config.model or None
    if base_name is None and main_process and not own_base:
        with atomic_folder(run.base) as folder:
            save(model, folder)
            tokenizer.save(folder)
            for name in SFT_KEPT if config.stage == "sft" else ():
                if (source := model_file(config.init, name)) and not (folder / name).exists():
                    shutil.copyfile(source, folder / name)

    # ---- QLoRA: a frozen NF4 base, LoRA on every projection, the embedding and the head ----------------
    if config.quantize == "nf4":
        quantize_model(model)  # what is still dense (the embedded default, the merged SFT base)
    lora = LoRAConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, rslora=config.rslora)
    if main_process:  # the base its adapters are for, which they say: loading one onto another warns
        lora.base_fingerprint = fingerprint(base_folder or run.base)
    if model.config.tie_word_embeddings:  # one matrix is both embedding and head: LoRA leaves it alone
        lora.targets = tuple(t for t in lora.targets if t not in ("embed_tokens", "lm_head"))
        lora.save_embedding_layers = grown = new_tokenizer is not None
        say("tied embeddings: LoRA on the projections only" + (
            "; the embedding, with the new rows as zip-tie set them, is saved with the adapter" if grown else ""))
    inject_lora(model, lora)
    mark_only_lora_trainable(model)
    model.checkpointing, model.offload = checkpointing, config.offload_activations
    model.keep_dequantized, model.keep_attention = config.keep_dequantized, config.keep_attention
    model.cudnn_attention = config.cudnn_attention
    undo.callback(use_casts_by_layer, use_casts_by_layer(config.casts_by_layer))
    try:
        offloaded = offload_embedding(model) if config.offload_embedding else 0
    except ValueError as error:  # a tied embedding
        raise UsageError(f"--offload-embedding: {error}") from None
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    bf16_grads = BF16Grads(model) if config.bf16_grads else None
    all_here("ready to train", world, rank)  # (one may still be tokenizing, or rank 0 saving the base)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if rank:  # each process its own dropout masks (rank 0 draws as one process would); the weights are rank 0's
        torch.manual_seed(config.seed + rank)

    # ---- optimizer, schedule, resume ----------------------------------------------------------------------
    optimizer = build_optimizer(trainable, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    start = resume(out, model, optimizer, say, device, rank, lora.base_fingerprint) if config.resume else 0
    if start:
        say(f"resumed from {run.checkpoint(start)} at step {start}")
    elif config.resume:
        say(f"nothing to resume in {out}: starting at step 0")
    metrics = Metrics(run.metrics, run.plot, keep_until=start) if main_process else None

    # ---- summary --------------------------------------------------------------------------------------------
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len * world  # SFT's padding included

    def step_tokens(step):  # the real tokens of a step's inputs, every process's: SFT's padding left out
        return sum(data.tokens(data.indices(step * config.grad_accum + micro, config.batch_size * world, config.seed))
                   for micro in range(config.grad_accum))

    say(f"stage {config.stage}: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
        f"vocabulary {model.config.vocab_size}, {device}, {world} process(es)")
    say(lora_summary(model))
    if config.quantize == "nf4":
        say(memory_report(model))
    if device.startswith("cuda"):  # which attention kernel runs, and whether --keep-attention keeps anything with it
        say(training_attention(model, config.batch_size, config.seq_len, dtype, device))
    if offloaded:
        say(f"embedding: its table ({offloaded / 2**20:,.1f} MiB) in host memory, a step's rows copied in")
    if bf16_grads and (saved := bf16_grads.saved_bytes):
        say(f"gradients: the projections' LoRA gradients ({saved // 2:,} weights) kept in bf16 until the step, "
            f"{saved / 2**20:,.1f} MiB less than float32")
    measured = min(held_out.n, config.eval_batches * config.batch_size * world) if held_out else 0
    part = f" (the held-out loss over the first {measured}: --eval-batches)" if held_out and measured < held_out.n \
        else ""
    padding = f" ({1 - data.tokens() / (data.n * config.seq_len):.0%} of them padding)" if data.sft else ""
    say(f"data: {data.n} training and {held_out.n if held_out else 0} held-out examples of {config.seq_len} tokens"
        f"{part}; {config.steps} steps of {tokens_per_step:,} tokens{padding}; memory {estimate_memory(model, config)}")
    if data.cut:
        say(data.cut)
    if config.stage == "pretrain" and tokenizer.bos_id < 0 and tokenizer.eos_id < 0:
        say(f"warning: {tokenizer.path or 'the tokenizer'}: has neither a bos nor an eos token: the documents are "
            "joined with nothing between them", file=sys.stderr)
    if config.warmup >= config.steps:
        say(f"note: --warmup {config.warmup} is not below --steps {config.steps}: the learning rate rises toward "
            f"--lr {config.lr:g} for the whole run")

    def loss_of(inputs, targets, ddp=True):  # ddp: a training step's, through DDP; else the model itself
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            return (ddp_model if ddp else model)(inputs.to(device), targets=targets.to(device))

    def diverged(what, n):  # the error for a loss or gradient that is not finite, from the weights after n steps
        if n == 0 and what.startswith("the gradient"):  # (its loss is finite)
            return BailongError(f"{what}, from the weights loaded, whose loss is finite: the gradients overflow (the "
                                f"LoRA scale, --lora-alpha / {'sqrt(--lora-r)' if config.rslora else '--lora-r'}, "
                                f"is {lora.scaling():g})")
        if n == 0:
            return BailongError(f"{what}, from the weights loaded: the model "
                                f"({config.model or config.init or 'the embedded default'}) gives no finite loss")
        good = [f"the last checkpoint before: {c}; " for c in RunFolder(out).saved() if int(c.name[5:]) < n]
        return BailongError(f"{what}: the run diverged, stopped ({(good or [''])[-1]}a lower --lr, or a longer "
                            "--warmup, keeps a run from diverging: begin again, in another --out)")

    def leave(code):  # the exit status; under torchrun every process goes at once, and DDP before its group
        if world == 1:
            return code
        nonlocal ddp_model
        del ddp_model  # DDP's reducer first, then the process group: the other order can abort at exit
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # c10d's static teardown sometimes aborts a finished process (seen with torch 2.13, gloo)

    # a step's micro-batches, forward and backward (--cuda-graph: replayed as one CUDA graph): the mean loss over
    # every targeted token of the step, in every process
    step_loss = GraphedStep(loss_of, model) if config.cuda_graph else lambda inputs, targets: accumulate(
        loss_of, inputs, targets, processes_normalizer(targets, device) if world > 1 else None)

    @torch.no_grad()
    def evaluate():  # the mean over every targeted token of the first --eval-batches batches of --batch-size x
        # processes examples (each process its share)
        model.eval()
        examples = list(range(measured))[rank::world]
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # the loss's sum over the tokens, their count
        for i in range(0, len(examples), config.batch_size):  # each process its share, as in a step
            inputs, targets = held_out.batch(examples[i:i + config.batch_size])
            n = int((targets != -100).sum())
            sums += torch.stack([loss_of(inputs, targets, ddp=False).double() * n, sums.new_tensor(n)])
        if world > 1:
            dist.all_reduce(sums)
        model.train()
        return (sums[0] / sums[1].clamp(min=1)).item()

    # ---- training loop: the result (adapter/) is the adapter with the best held-out loss ---------------------
    if held_out and start == 0:  # where the untrained model stands, to compare with
        untrained = evaluate()
        if not math.isfinite(untrained):
            raise diverged(f"the held-out loss is {untrained}", 0)
        if main_process:
            metrics.log(step=0, eval_loss=untrained, eval_ppl=progress.perplexity(untrained))
    best, best_step, since_best = held_out_record([r for r in metrics.rows if r["step"] > 0] if metrics else [])
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, unit="step", dynamic_ncols=True,
               disable=progress.BAR_HIDDEN if main_process else True)
    step, done, started, stopped, checkpoint = start, start, time.perf_counter(), None, None
    said = started  # where the bar is not shown (a log file), a line every progress.LINE_EVERY seconds
    fed = fed_at_start = sum(map(step_tokens, range(start)))  # real tokens fed: SFT's padding left out
    with GracefulStop(say, echoes=2.0 if "LOCAL_RANK" in os.environ else 0.0) as interrupt:  # under torchrun
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            batches = [data.batch(data.indices(step * config.grad_accum + micro, config.batch_size, config.seed,
                                               rank, world)) for micro in range(config.grad_accum)]
            loss = step_loss(*map(torch.stack, zip(*batches)))
            norm = (bf16_grads.clip if bf16_grads else torch.nn.utils.clip_grad_norm_)(trainable, config.grad_clip)
            total, norm = torch.stack([loss, norm.double()]).tolist()  # the one wait for the device a step
            if not math.isfinite(total + norm):  # the weights stay as they were: no NaN is stepped into them
                raise diverged(f"the {'loss' if not math.isfinite(total) else 'gradient norm'} is "
                               f"{total if not math.isfinite(total) else norm} at step {step + 1}", step)
            if bf16_grads:  # stepped a group of LoRA weights at a time
                bf16_grads.step(optimizer, trainable)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            done, fed = step + 1, fed + step_tokens(step)
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{(fed - fed_at_start) / elapsed:,.0f}", refresh=False)
            if bar.disable and time.perf_counter() - said >= progress.LINE_EVERY:
                said = time.perf_counter()
                say(progress_line(done, config.steps, total, (fed - fed_at_start) / elapsed, elapsed, done - start))
            if main_process:
                metrics.log(step=done, loss=total, lr=lr_at(step, config), tokens=fed)
            if held_out and (done % config.eval_every == 0 or done == config.steps):
                eval_loss = evaluate()
                if not math.isfinite(eval_loss):  # never kept as the result, nor logged (JSON has no NaN)
                    raise diverged(f"the held-out loss is {eval_loss} after step {done}", done)
                if main_process:
                    metrics.log(step=done, eval_loss=eval_loss, eval_ppl=progress.perplexity(eval_loss))
                    metrics.plot()
                    if best is None or eval_loss < best:
                        best, best_step, since_best = eval_loss, done, 0
                        save_result(run.result, model, lora, tokenizer, base_name)
                        note = "the best so far: saved as the result"
                    else:
                        since_best += 1
                        note = f"not better than step {best_step} ({best:.4f}) for {since_best} evaluation(s)"
                        if config.patience and since_best >= config.patience and done < config.steps:
                            stopped = f"held-out loss has not improved for {since_best} evaluations (--patience)"
                    bar.write(f"step {done}: held-out loss {eval_loss:.4f}, perplexity "
                              f"{progress.perplexity(eval_loss):.2f}; {note}")
            interrupted = interrupt.requested
            if world > 1:  # every process stops at the same step (a signal that came during the reduce: the next)
                flags = torch.tensor([interrupt.requested, stopped is not None], dtype=torch.int32, device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                interrupted = bool(flags[0])
                stopped = stopped or ("rank 0 stopped early" if flags[1] else None)
            if not held_out and main_process and done == config.steps:  # the result, then its checkpoint: a
                with torch.no_grad():  # kill between leaves a run to resume; the last step's weights checked first
                    model.eval()
                    last = loss_of(*batches[-1], ddp=False).item()
                    model.train()
                if not math.isfinite(last):
                    raise diverged(f"the loss is {last} after the last step", done)
                save_result(run.result, model, lora, tokenizer, base_name)
            if done % config.save_every == 0 or done == config.steps or stopped or interrupted:
                rng = rng_states(device, world)  # every process's
                if main_process:
                    checkpoint = save_checkpoint(out, done, model, lora, tokenizer, optimizer, base_name, rng)
                if world > 1:  # no process leaves before the save (torchrun would stop the others)
                    dist.barrier()
            if interrupted and done < config.steps:
                bar.close()
                say(f"interrupted after step {done}: saved {checkpoint}; continue with --resume")
                return leave(interrupt.code or 128 + 15)
            if stopped:
                break
    bar.close()

    # ---- outputs ------------------------------------------------------------------------------------------------
    if main_process:  # without held-out data, nothing to choose by: the last step is the result (saved above)
        metrics.plot()
        say(summary(metrics.rows, done, stopped, run, best_step, config.held_out))
    return leave(0)


if __name__ == "__main__":
    run_cli(main, less_memory=LESS_MEMORY)
