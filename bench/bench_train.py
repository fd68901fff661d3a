"""QLoRA training steps: our tokens/s and peak memory against transformers + PEFT + bitsandbytes.

Both sides get the same random-weight checkpoint, an NF4 base with double quantization, LoRA of the same rank on the
seven projections, AdamW (fused on CUDA: what train.py and transformers' Trainer take; with ``--optimizer adamw8bit``
ours with 8-bit moments, theirs bitsandbytes' AdamW8bit), the same batch; each runs in a fresh process, a few warm-up
steps first. Ours runs up to 21 times (``ROWS``, ``FEATURES``): through autograd (the default until an H200 timed the
rest); each LoRA projection one autograd node (``bailong.lora_fused``; with checkpointing each layer one node too,
``bailong.recompute``); with that the norms, SwiGLU and RoPE through their training kernels
(``bailong_kernels.layers``, CUDA only), each checkpointed layer through autograd, then written out by hand
(``bailong.layer_fused``, as in the rows after); with all that the loss chunk by chunk
(``bailong.memory.chunked_cross_entropy``); then with all that and one more: (CUDA) each layer's saved input offloaded
to host memory (``OffloadedInput``); the recomputation's dequantized NF4 weights kept for the backward; the MLP chunk
by chunk (``ChunkedMLP``); (CUDA) the offload and the chunked MLP; the projections' LoRA gradients kept in bf16
(``BF16Grads``), alone, (CUDA) with the offload, with the LoRA casts made by layer, and (CUDA) with all three and the
embedding's table in host memory (``offload_embedding``); (CUDA) attention's output kept for the backward
(``train.py --keep-attention``), alone and with the offload; (CUDA) SDPA's cuDNN kernel tried first
(``train.py --cudnn-attention``), alone and with the offload and attention kept (theirs too, under
``sdpa_kernel``, in a row of its own); with ``--dropout``, torch's dropout instead of the layer
kernels' (``bailong_kernels.dropout``); and (CUDA) each step's forward and backward replayed from one CUDA graph
(``bailong.step_graph``), captured in the last warm-up step: through autograd (no dropout), by default, and with the
kept dequantized weights.
train.py's default is row ``ours-all``, the fastest without a graph (docs/BENCHMARKS.md). Peak memory is CUDA's
max_memory_allocated on a GPU, the growth of VmHWM (reset through /proc/self/clear_refs) on the CPU. Beside it, each
side's floor: what it holds between steps (the frozen base, the LoRA weights, AdamW's moments, and whatever else a
side keeps) plus the LoRA gradients, all alive at once before the optimizer's step: no step of that recipe takes
less, so the peak's distance to it is what the step's activations and temporaries cost (on a GPU; on the CPU memory
a process freed still counts, so it reads about the peak).

    python bench/bench_train.py --preset tinyllama-1.1b --layers 2 --seq-len 128 --batch 2     # CPU-sized
    python bench/bench_train.py --setting recipe      # a GPU: Llama-2-7B, r 128 with embedding and head, 2048
    python bench/bench_train.py --setting long        # a GPU: Llama-2-7B, r 16 on the projections, 8192
    python bench/bench_train.py --setting long --rows ours-all ours-mlp ours-lean theirs    # some sides only
    python bench/bench_train.py --setting recipe --dropout 0.05       # with train.py's LoRA dropout
    python bench/bench_train.py --setting recipe --optimizer adamw8bit   # AdamW's moments in 8 bits, both sides
    python bench/bench_train.py --setting recipe --count     # what a step computes and moves (no GPU needed)

On a GPU each side loads the 7B checkpoint afresh (the time with loading is printed beside each row): choose --rows
to fit the time at hand. The random checkpoint is drawn on the device and written to a temporary folder, or once to
``--checkpoint DIR`` and read from there by every later run that names it (bench/gpu_suite.sh).

Each step trains on its own seeded batch, the same for every side, and the per-step losses are printed beside the
speeds: the sides start from the same weights (their LoRA A draws differ), so they should stay within bf16 noise.
"""
import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


# the two settings of the training targets: Bailong's recipe (at Llama 2's vocabulary, 32,000: not its 59,241),
# and a long context
SETTINGS = {"recipe": dict(preset="llama2-7b", seq_len=2048, batch=1, rank=128, embedding_and_head=True),
            "long": dict(preset="llama2-7b", seq_len=8192, batch=1, rank=16, embedding_and_head=False)}


# the sides, each run in a process of its own: ours through autograd, then with each fast path added
ROWS = {"ours, autograd": "ours", "ours, fused LoRA": "ours-fused",
        "ours, + layer kernels, layers by autograd": "ours-autograd", "ours, + layer kernels": "ours-layers",
        "ours, + chunked loss (the default)": "ours-all", "ours, + offloaded layer inputs": "ours-offload",
        "ours, + chunked loss, kept dequantized": "ours-keep", "ours, + chunked loss, chunked MLP": "ours-mlp",
        "ours, + offloaded layer inputs, chunked MLP": "ours-lean", "ours, + bf16 gradients": "ours-grads",
        "ours, + offloaded layer inputs, bf16 gradients": "ours-offload-grads",
        "ours, + casts by layer, bf16 gradients": "ours-casts-grads",
        "ours, + offloaded layer inputs and embedding, casts by layer, bf16 gradients": "ours-leanest",
        "ours, + attention kept": "ours-attention",
        "ours, + offloaded layer inputs, attention kept": "ours-offload-attention",
        "ours, + cuDNN's attention first": "ours-cudnn",
        "ours, + offloaded layer inputs, attention kept, cuDNN's first": "ours-offload-attention-cudnn",
        "ours, + chunked loss, torch's dropout": "ours-torch-dropout", "ours, CUDA graph": "ours-plain-graph",
        "ours, + chunked loss, CUDA graph": "ours-graph",
        "ours, + chunked loss, kept dequantized, CUDA graph": "ours-keep-graph",
        "transformers+peft+bitsandbytes": "theirs",
        "transformers+peft+bitsandbytes, cuDNN's attention first": "theirs-cudnn"}
# what each of our rows switches on: the fused LoRA, the layer kernels (with them a checkpointed layer is written out
# by hand, bailong.layer_fused, unless "autograd"), the chunked loss, the offload (CUDA and checkpointing only), the
# embedding's table in host memory (CUDA only), the kept dequantized weights (checkpointing only), the chunked MLP,
# the LoRA casts made by layer, the LoRA gradients in bf16, attention's output kept (CUDA and checkpointing only),
# SDPA's cuDNN kernel tried first (CUDA only; theirs too, in a row of its own); LoRA dropout by torch's kernel, not
# the layer kernels'
# (bailong.lora_fused.seeded_dropout); the step replayed from one CUDA graph (bailong.step_graph: CUDA; dropout only
# through the layer kernels')
BASE = {"fused", "layers", "loss"}
FEATURES = {"ours": set(), "ours-fused": {"fused"}, "ours-autograd": {"fused", "layers", "autograd"},
            "ours-layers": {"fused", "layers"}, "ours-all": BASE,
            "ours-offload": BASE | {"offload"}, "ours-keep": BASE | {"keep"}, "ours-mlp": BASE | {"mlp"},
            "ours-lean": BASE | {"offload", "mlp"}, "ours-torch-dropout": BASE | {"torch-dropout"},
            "ours-grads": BASE | {"grads"}, "ours-offload-grads": BASE | {"offload", "grads"},
            "ours-casts-grads": BASE | {"casts", "grads"},
            "ours-leanest": BASE | {"offload", "embedding", "casts", "grads"},
            "ours-attention": BASE | {"attention"}, "ours-offload-attention": BASE | {"offload", "attention"},
            "ours-cudnn": BASE | {"cudnn"}, "ours-offload-attention-cudnn": BASE | {"offload", "attention", "cudnn"},
            "theirs-cudnn": {"cudnn"},
            "ours-plain-graph": {"graph"}, "ours-graph": BASE | {"graph"}, "ours-keep-graph": BASE | {"keep", "graph"}}


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024


def run_one(which, folder, args):
    """One side's training steps, in this process; prints a JSON line."""
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    targets += ["embed_tokens", "lm_head"] if args.embedding_and_head else []
    if device == "cpu":
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
    if which.startswith("ours"):
        import bailong
        from bailong import lora_fused
        from bailong.layer_fused import use_fused_layer
        from bailong.lora import LoRAConfig, inject_lora, mark_only_lora_trainable, use_fused_lora
        from bailong.lora_casts import use_casts_by_layer
        from bailong.memory import offload_embedding, use_chunked_loss, use_chunked_mlp
        from bailong_kernels import use_layer_kernels
        on = FEATURES[which]
        use_fused_lora("fused" in on)
        use_layer_kernels("layers" in on)
        use_fused_layer("autograd" not in on)
        use_chunked_loss("loss" in on)
        use_chunked_mlp("mlp" in on)
        use_casts_by_layer("casts" in on)
        if "torch-dropout" in on:
            lora_fused.seeded_dropout = lambda x: None
        model, _ = bailong.load(folder, dtype=dtype, device=device, quantize="nf4")
        inject_lora(model, LoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=args.dropout,
                                       targets=tuple(targets)))
        mark_only_lora_trainable(model)
        model.checkpointing = args.checkpointing
        model.offload = "offload" in on and device == "cuda"
        model.keep_dequantized, model.keep_attention = "keep" in on, "attention" in on
        model.cudnn_attention = "cudnn" in on
        if "embedding" in on and device == "cuda":
            offload_embedding(model)
        loss_of = lambda inputs, targets: model(inputs, targets=targets)  # noqa: E731
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig, LlamaForCausalLM
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map=device, dtype=dtype)
        # non-reentrant checkpointing, as transformers' Trainer sets it (peft alone passes {}: torch's reentrant)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                                                 target_modules=targets))
        loss_of = lambda inputs, targets: torch.nn.functional.cross_entropy(  # noqa: E731
            model(input_ids=inputs).logits.flatten(0, 1).float(), targets.flatten())
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if which.startswith("ours") or args.optimizer == "adamw":
        from bailong.optim import build_optimizer
        optimizer = build_optimizer(trainable, args.optimizer, lr=1e-4)  # torch's fused on CUDA, or 8-bit moments
    else:
        import bitsandbytes as bnb
        optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4, weight_decay=0.0)
    from bailong.memory import BF16Grads
    kept = BF16Grads(model) if "grads" in FEATURES.get(which, ()) else None  # LoRA gradients kept in bf16
    vocab = model.config.vocab_size
    batches = torch.Generator().manual_seed(0)
    losses = []

    from bailong.step_graph import GraphedStep, accumulate

    def autocast_loss(inputs, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            return loss_of(inputs.to(device), targets.to(device))
    graphed = None  # the step replayed from a CUDA graph, captured in the last warm-up step
    if "graph" in FEATURES.get(which, ()):
        graphed = GraphedStep(autocast_loss, model, warmup=max(args.warmup - 1, 1))
    step_loss = partial(accumulate, autocast_loss) if graphed is None else graphed  # as train.py steps

    def step():
        ids = torch.randint(0, vocab, (1, args.batch, args.seq_len + 1), generator=batches)  # one micro-batch
        loss = step_loss(ids[..., :-1], ids[..., 1:])
        if kept:
            kept.step(optimizer, trainable)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))

    for _ in range(args.warmup):
        step()
    if graphed is not None and graphed.graph is None:  # else the row would time eager steps
        sys.exit(f"the step was not captured in the warm-up steps: {graphed.failed or '--warmup is under 2'}")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else status("VmHWM") - before
    if graphed is not None:  # replays allocate nothing: the graph's pool holds, besides its live tensors, all that
        # its capture freed (the activations), reserved for the replays; that counts as held too
        peak += sum(s["total_size"] - s["allocated_size"] for s in torch.cuda.memory_snapshot()
                    if tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))
    # between steps: the frozen base, the LoRA weights and AdamW's moments (with a graph, the LoRA gradients too:
    # its own tensors, alive between replays); a step cannot take less than that plus the LoRA gradients
    resident = torch.cuda.memory_allocated() if device == "cuda" else status("VmRSS") - before
    grads = 0 if graphed is not None else sum(p.numel() * p.element_size() for p in trainable)
    grads -= kept.saved_bytes if kept else 0
    result = {"tokens_per_s": args.batch * args.seq_len / seconds, "peak_bytes": peak, "seconds_per_step": seconds,
              "losses": list(losses), "floor_bytes": resident + grads,
              "trainable": sum(p.numel() for p in trainable),  # not the profiled step's
              "state_bytes": sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                 for t in state.values() if torch.is_tensor(t))}  # AdamW's moments
    if args.profile:  # one more step, profiled: where the time goes, and how busy the GPU was
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            if device == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
        busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        result["profile"] = (f"{kernels} GPU kernels, busy {busy / 1e3:.1f} ms of a {seconds * 1e3:.1f} ms step\n"
                             + events.table(sort_by="self_device_time_total" if device == "cuda" else
                                            "self_cpu_time_total", row_limit=15))
    print(json.dumps(result))


def random_checkpoint(config, folder, device):
    """A random checkpoint of ``config`` in bfloat16, as Llama 2's are (half the disk and the reading), written to
    ``folder``: drawn on ``device`` (a GPU draws 7B weights in a second, the CPU in minutes), written from the
    CPU."""
    import bailong
    from bailong.model import init_weights
    with torch.device("meta"):
        model = bailong.Llama(config).to(torch.bfloat16)
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model).cpu()
    if device != "cpu":
        torch.cuda.empty_cache()  # the rows' processes get the whole GPU
    bailong.save(model, folder)


def kept_checkpoint(folder, config, device):
    """``--checkpoint``: ``folder`` read where it holds a checkpoint of ``config``'s shape, or, where it does not
    exist, a random one written there (``bailong.files.atomic_folder``: beside it first, renamed once whole);
    anything else refused with one line, nothing written over."""
    from bailong.config import ModelConfig
    from bailong.errors import BailongError
    from bailong.files import atomic_folder
    try:
        if not (folder.is_symlink() or folder.exists()):
            with atomic_folder(folder) as tmp:
                random_checkpoint(config, tmp, device)
        elif not (folder / "config.json").is_file():
            sys.exit(f"{folder}: not a checkpoint folder (no config.json); name a new folder or one written before")
        elif ModelConfig.from_file(folder / "config.json").to_hf() != config.to_hf():
            sys.exit(f"{folder / 'config.json'}: a checkpoint of another shape than asked for; name another folder")
    except BailongError as e:
        sys.exit(str(e))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--layers", type=int, help="fewer layers than the preset (to fit a CPU)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="one GPU (choose which with CUDA_VISIBLE_DEVICES), or the CPU")
    p.add_argument("--embedding-and-head", action="store_true", help="LoRA on the embedding and head too")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on both sides (train.py's default is "
                   "0.05; the losses then differ by the masks drawn)")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw", help="float32 moments (torch's "
                   "fused AdamW on both sides), or 8-bit moments (bailong.optim.AdamW8bit; bitsandbytes' AdamW8bit)")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto", help="activation "
                   "checkpointing on both sides (auto: on for CUDA)")
    p.add_argument("--setting", choices=SETTINGS, help="one of the settings the targets are set for (sets the "
                   "preset, sequence, batch, rank and targets)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS.values()), default=list(ROWS.values()),
                   help="the sides to run (default: all; theirs is the one the ratios need)")
    p.add_argument("--profile", action="store_true", help="profile one more step of each side: the top operations "
                   "by GPU time, the kernels launched, how busy the GPU was")
    p.add_argument("--count", action="store_true", help="count what one step computes and moves instead of timing "
                   "it: on the meta device, nothing run, no GPU needed")
    p.add_argument("--checkpoint", help="a folder for the random checkpoint: written there once if it does not exist, "
                   "else read (a checkpoint of the same shape), and kept; by default a temporary folder, removed")
    p.add_argument("--which", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    for name, value in SETTINGS.get(args.setting, {}).items():
        setattr(args, name, value)
    args.checkpointing = args.checkpointing == "on" or args.checkpointing == "auto" and args.device == "cuda"
    if args.which:
        from bailong.layer_fused import attention_kernels
        with attention_kernels(args.which == "theirs-cudnn"):  # theirs: for the process; ours: the model's switch
            return run_one(args.which, args.folder, args)
    from bailong.config import preset
    started = time.perf_counter()
    config = preset(args.preset)
    config.num_hidden_layers = args.layers or config.num_hidden_layers
    if args.count:
        from step_count import count  # what a step computes: nothing run
        return count(config, args)
    # stopped by a time limit (bench/gpu_suite.sh), a temporary checkpoint (13.5 GB at 7B) is still removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM" + (
        "" if args.checkpoint else ": the temporary checkpoint removed")))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.checkpoint) if args.checkpoint else Path(tmp)
        if args.checkpoint:
            kept_checkpoint(folder, config, args.device)
        else:
            random_checkpoint(config, folder, args.device)
        print(f"{args.preset} checkpoint in {folder}, {time.perf_counter() - started:.0f} s", flush=True)
        where = "7 projections" + (", embedding and head" if args.embedding_and_head else "")
        print(f"{args.preset} ({config.num_hidden_layers} layers), sequence {args.seq_len}, batch {args.batch}, "
              f"LoRA r={args.rank} on {where}, dropout {args.dropout}, NF4 base, {args.optimizer}, activation "
              f"checkpointing {'on' if args.checkpointing else 'off'}, {args.device}, torch {torch.__version__}")
        results = {}

        def ratios(which):  # ours against each of theirs timed so far
            for side in [w for w in results if w.startswith("transformers")]:  # theirs, and with cuDNN's first
                theirs, named = results[side], "" if side == "transformers+peft+bitsandbytes" else f" ({side})"
                ours = results[which]
                print(f"{which}: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x their tokens/s{named} at "
                      f"{ours['peak_bytes'] / theirs['peak_bytes']:.2f}x their peak memory (the floor: "
                      f"{ours['floor_bytes'] / theirs['peak_bytes']:.2f}x)", flush=True)

        # theirs first: each of our rows is compared as it ends, whatever a time limit cuts after it
        for which, flag in sorted(ROWS.items(), key=lambda row: not row[0].startswith("transformers")):
            on = FEATURES.get(flag, set())
            if (flag not in args.rows or on & {"offload", "graph", "attention", "cudnn"} and args.device != "cuda"
                    or on & {"offload", "keep", "attention"} and not args.checkpointing  # nothing recomputed
                    or "graph" in on and args.dropout and not {"fused", "layers"} <= on):  # torch's dropout
                continue
            started = time.perf_counter()
            cmd = [sys.executable, __file__, "--which", flag, "--folder", str(folder), *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            took = f"({time.perf_counter() - started:.0f} s with loading)"
            if out.returncode:
                print(f"{which}: failed {took}: {(out.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                continue
            results[which] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{which:32s} {r['tokens_per_s']:10.1f} tokens/s  {r['seconds_per_step']:8.3f} s/step  "
                  f"peak memory {r['peak_bytes'] / 2**30:.2f} GiB (floor {r['floor_bytes'] / 2**30:.2f})  "
                  f"{r['trainable']:,} trained, moments {r['state_bytes'] / 2**30:.3f} GiB  losses {r['losses']} "
                  f"{took}", flush=True)
            if "profile" in r:
                print(r["profile"], flush=True)
            if which.startswith("ours"):
                ratios(which)


if __name__ == "__main__":
    main()
