"""Decoding speed at batch 1 and 8: our generate() against transformers' generate() on the same weights.

A model of a preset's shape with random weights (Llama-2-7B on a GPU, the tiny
preset on the CPU), random prompts, greedy decoding of a fixed number of new
tokens (no early stop). Batch 1 is generate(), what chat.py runs; a batch of B
prompts of one length decodes together through ``GraphDecoder(batch=B)`` (each
weight read once a step for all B sequences), against transformers' generate()
on the same B prompts. Rows, fast ones first: ours in the compute dtype; ours on
NF4 with the kernels, with CUDA graphs and eagerly; each as by default on CUDA,
with the fused decoding step (``bailong_kernels.decode``; in the compute dtype its
projections and head run the GEMV's loop for bf16 weights), and with CUDA graphs
also without it (``BAILONG_DECODE_KERNELS=0``); at batch 1 the fused step with
another tile of the GEMV's at-end loop (``AT_END``), and with the attention cut
into parts of fewer positions (``PARTS_OF``); on Hopper and later, the
fused step with programmatic dependent launch too (``BAILONG_PDL``), bf16 and NF4;
transformers in the compute dtype; transformers with bitsandbytes 4-bit (the
NF4 weights we quantized, saved and loaded back, so both read the same bits);
ours on NF4 through the PyTorch reference, with CUDA graphs and eagerly. At
batch 1, one more row samples as chat.py does by default (temperature, top-k,
top-p, repetition penalty: ``Sampling()``) on NF4 as generate() runs it, to set
against the greedy row of the same path: what choosing a token costs.
Each row runs once to warm up (compilation, graph capture), is probed for its
rate, then timed over the new tokens that fit in its time limit (``--limit``):
a slow row is timed over fewer tokens instead of holding up the rest.
tokens/s counts the new tokens of all B sequences over the whole call, prefill
included; on CUDA each row also gives its share of the ceiling set by reading its
weights once a step (the embedding's one row a token left out) at the card's
copy bandwidth (B tokens a step). The slow eager and reference rows run at
batch 1 only.

    python bench/bench_decode.py                      # llama2-7b on CUDA, tiny on CPU; batches 1 and 8
    python bench/bench_decode.py --batch 1            # batch 1 only
    python bench/bench_decode.py --preset tinyllama-1.1b --layers 2    # CPU, shapes bitsandbytes takes
    python bench/bench_decode.py --batch 1 --profile  # and where a step's time goes, kernel by kernel

``--profile``: after the rows, batch-1 steps of the default decoder (CUDA graph,
fused step) on NF4 (with PDL too where it runs) and bf16, timed, then profiled:
kernels a step, the time the GPU spends in kernels against the step's time (the
rest: gaps between kernels), and the kernels that take the most.
"""
import argparse
import contextlib
import tempfile
import time

import torch

import bailong
import bailong_kernels
from bailong import generation
from bailong.config import preset
from bailong.generation import GraphDecoder, Sampling, generate, graph_decoder
from bailong.model import init_weights
from bailong.quantized import quantize_model
from bailong_kernels import decode, nf4_gemv
from bailong_kernels.decode import PART_POSITIONS
from bailong_kernels.nf4_dequant import pdl_possible
from bailong_kernels.nf4_gemv import gemv_tile
from bench_nf4_matmul import copy_bandwidth

GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
CHAT = Sampling(seed=0)  # chat.py's default sampling
# another GEMV tile of the at-end loop (shuffled codes) for one row than the default: 4 rows of W a thread, the
# fewest instructions a weight, and no spills under Triton 3.6 as under 3.9 (2 rows spill 48 bytes under 3.6)
AT_END = (4, 1024, 1, True)
# cache positions a program of the fused step's attention reads, at most, in the row that tries it against the
# default (decode.PART_POSITIONS, 512): at Llama-2-7B's 32 heads, one program a head leaves most of an H200's 132
# multiprocessors idle; parts of 128 positions give 128 programs at 256 to 512 positions, for a merging launch
PARTS_OF = 128


def seconds(fn, n, device):
    """Wall seconds of ``fn(n)`` and its result."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(n)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def timed_row(fn, n, limit, device):
    """(tokens/s, new tokens timed, ids, seconds of the warm-up): one warm-up call of 16 tokens
    (graph capture), a probe of 16 to estimate the rate, then ``n`` tokens, or as many as fit in
    ``limit`` seconds (at least 16)."""
    few = min(16, n)
    warm, _ = seconds(fn, few, device)
    probe, _ = seconds(fn, few, device)
    n = min(n, max(few, int(limit * few / probe)))
    elapsed, ids = seconds(fn, n, device)
    return n / elapsed, n, ids, warm


def ours(model, prompts, graph, max_new, kernels_on=True, fused_step=True, sampling=GREEDY, tile=None, pdl=False,
         part_positions=None):
    """Ids (B lists) of ``n`` new tokens after each prompt: generate() with ``sampling`` for one prompt, else
    one ``GraphDecoder`` for the batch, greedy. Decoders are made, with every graph they replay for ``max_new`` tokens
    captured, at the first call: the warm-up. ``tile``: the GEMV's tile in place of ``gemv_tile``'s; ``pdl``:
    programmatic dependent launch (``bailong_kernels.use_pdl``); ``part_positions``: the fused step's attention
    cut into parts of that many cache positions (``decode.PART_POSITIONS``)."""
    decoders = []

    def run(n):
        previous = (bailong_kernels.use_kernels(kernels_on), bailong_kernels.use_decode_kernels(fused_step),
                    bailong_kernels.use_pdl(pdl))
        if tile or part_positions:  # graphs bake in their launches: this row's decoder, captured so, is generate()'s
            generation._decoders.pop(model, None)  # only while the row runs
            if decoders:
                generation._decoders[model] = decoders[0]
            nf4_gemv.gemv_tile = (lambda M: tile) if tile else gemv_tile
            decode.PART_POSITIONS = part_positions or PART_POSITIONS
        try:
            with torch.inference_mode():
                use_graph = model.lm_head.weight.is_cuda if graph is None else graph  # None: as generate() decides
                if not decoders and (use_graph or len(prompts) > 1):
                    length = len(prompts[0]) + max_new
                    decoders.append(GraphDecoder(model, length, use_graph, batch=len(prompts)) if len(prompts) > 1
                                    else graph_decoder(model, length))  # the one generate() takes
                    decoders[0].capture()
                    if use_graph and decoders[0].graphs is None:  # a failed capture decodes eagerly: not this row
                        raise RuntimeError("the CUDA graph capture failed (warned above)")
                if len(prompts) == 1:
                    return [generate(model, prompts[0], n, sampling, stop_ids=[], cuda_graph=graph)]
                logits, ids = decoders[0].prefill(torch.tensor(prompts, device=decoders[0].token.device)), []
                for _ in range(n):
                    ids.append(logits.argmax(-1))  # on the device: the step takes it from there
                    if len(ids) < n:
                        logits = decoders[0].step(ids[-1])
                return torch.stack(ids, 1).tolist()
        finally:
            bailong_kernels.use_kernels(previous[0])
            bailong_kernels.use_decode_kernels(previous[1])
            bailong_kernels.use_pdl(previous[2])
            if tile or part_positions:
                nf4_gemv.gemv_tile, decode.PART_POSITIONS = gemv_tile, PART_POSITIONS
                generation._decoders.pop(model, None)
    return run


def theirs(model, prompts, device):
    ids = torch.tensor(prompts, device=device)
    return lambda n: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False)[:, ids.shape[1]:].tolist()


def weight_bytes(model):
    """The bytes of weights a decoding step reads: all but the embedding's, of which a token reads one row (unless
    it is the head's too)."""
    from bailong.quantized import nf4_weights
    embedding = model.model.embed_tokens.weight
    dense = {id(p): p for p in model.parameters() if p is not embedding or p is model.lm_head.weight}.values()
    return sum(p.numel() * p.element_size() for p in dense) + sum(q.nbytes for q in nf4_weights(model))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="one GPU (choose which with CUDA_VISIBLE_DEVICES), or the CPU")
    p.add_argument("--preset", help="default: llama2-7b on CUDA, tiny on the CPU")
    p.add_argument("--layers", type=int, help="fewer layers than the preset (to fit a CPU)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--limit", type=float, default=20, help="seconds each row may take, past its warm-up")
    p.add_argument("--profile", action="store_true", help="then profile batch-1 steps: kernels, busy time, the top")
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = args.preset or ("llama2-7b" if device == "cuda" else "tiny")
    config = preset(name)
    config.num_hidden_layers = args.layers or config.num_hidden_layers
    torch.manual_seed(0)
    with torch.device("meta"):
        dense = bailong.Llama(config)
    dense.to_empty(device=device)
    init_weights(dense).to(dtype).eval()
    torch.set_default_dtype(dtype)  # made where it runs, in its dtype: a 7B model's init takes minutes on a CPU
    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig(**config.to_hf())).eval()
    torch.set_default_dtype(torch.float32)
    hf.load_state_dict(dense.state_dict())
    with torch.device("meta"):
        nf4 = bailong.Llama(config)
    nf4.load_state_dict(dense.state_dict(), assign=True)  # shares the dense tensors until quantized
    nf4 = quantize_model(nf4.eval())
    batches = [int(b) for b in args.batch.split(",")]
    prompts = torch.randint(0, config.vocab_size, (max(batches), args.prompt),
                            generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name} ({config.num_hidden_layers} layers) on {gpu}, {dtype}, torch {torch.__version__}; "
          f"prompt {args.prompt}, {n} new tokens, greedy, batch {args.batch}")

    with tempfile.TemporaryDirectory() as tmp:
        bailong.save(nf4, tmp)  # bitsandbytes' 4-bit format: transformers reads the same bits back
        try:
            hf_bnb = LlamaForCausalLM.from_pretrained(tmp, device_map=device, dtype=dtype).eval()
        except Exception as e:  # bitsandbytes missing, or without a backend for this device
            hf_bnb = None
            print(f"transformers + bitsandbytes: not run ({type(e).__name__}: {str(e).splitlines()[0]})")
    bandwidth = None
    if device == "cuda":
        bandwidth = copy_bandwidth()  # bytes read + written a second by the faster of two device copies
    ceiling = {kind: bandwidth / weight_bytes(m) if bandwidth else None for kind, m in [("dense", dense), ("nf4", nf4)]}
    if bandwidth:
        print(f"weight-read ceiling at the copy bandwidth {bandwidth / 1e12:.2f} TB/s, batch 1: "
              f"{ceiling['dense']:.0f} tokens/s dense, {ceiling['nf4']:.0f} NF4 (batch B: B times as many)")
    cuda = device == "cuda"
    for batch in batches:
        run_batch(batch, prompts[:batch], dense, nf4, hf, hf_bnb, cuda, ceiling, args)
    if args.profile:
        for label, model, pdl in [("NF4", nf4, False), ("NF4 with PDL", nf4, True), ("bf16", dense, False)]:
            if not pdl or (cuda and pdl_possible(torch.empty(1, device="cuda"))):
                profile_steps(label, model, prompts[0], min(n, 64), pdl)


def profile_steps(label, model, prompt, steps, pdl):
    """Where a batch-1 step's time goes: ``steps`` steps of the decoder ``generate()`` takes (on CUDA a graph
    replayed), timed, then the same again profiled (the profiler slows the host, not the kernels)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = model.lm_head.weight.is_cuda
    previous = bailong_kernels.use_pdl(pdl)
    try:
        with torch.inference_mode():
            decoder = GraphDecoder(model, len(prompt) + 2 * steps + 1, graph=cuda)
            decoder.capture()
            logits = decoder.prefill(torch.tensor([prompt], device=model.lm_head.weight.device))
            walls = []
            for profiled in (False, True):
                with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) \
                        if profiled else contextlib.nullcontext() as prof:
                    start = time.perf_counter()
                    for _ in range(steps):
                        logits = decoder.step(logits.argmax(-1))
                    if cuda:
                        torch.cuda.synchronize()
                    walls.append((time.perf_counter() - start) / steps)
    finally:
        bailong_kernels.use_pdl(previous)
    events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if cuda else "CPU")]
    spent = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    busy = sum(spent(e) for e in events) / steps  # us a step
    print(f"profile, {label}: {walls[0] * 1e3:.3f} ms a step ({1 / walls[0]:.1f} tokens/s; profiled "
          f"{walls[1] * 1e3:.3f}), {sum(e.count for e in events) / steps:.0f} "
          f"{'kernels' if cuda else 'operations'} a step, busy {busy / 1e3:.3f} ms ({busy / 1e3 / walls[0] / 1e3:.0%} "
          f"of the unprofiled step)")
    for e in sorted(events, key=spent, reverse=True)[:12]:
        print(f"  {spent(e) / steps:9.1f} us a step, {e.count / steps:5.1f} a step  {e.key[:100]}")


def run_batch(batch, prompts, dense, nf4, hf, hf_bnb, cuda, ceiling, args):
    """Time every row at one batch size and compare their greedy ids."""
    device, n, one = ("cuda" if cuda else "cpu"), args.new_tokens, batch == 1
    hopper = cuda and pdl_possible(torch.empty(1, device="cuda"))  # where PDL runs: else its rows are left out
    print(f"-- batch {batch}")
    rows = [("ours" + (", CUDA graph" if cuda else ""), "dense", ours(dense, prompts, None, n)),  # fast first
            ("ours, CUDA graph, PDL", "dense", hopper and ours(dense, prompts, None, n, pdl=True)),
            ("ours, CUDA graph, unfused step", "dense", cuda and ours(dense, prompts, True, n, True, False)),
            ("ours NF4, CUDA graph + kernels", "nf4", cuda and ours(nf4, prompts, True, n)),
            ("ours NF4, CUDA graph + kernels, PDL", "nf4", hopper and ours(nf4, prompts, True, n, pdl=True)),
            ("ours NF4, CUDA graph + kernels, unfused step", "nf4", cuda and ours(nf4, prompts, True, n, True, False)),
            (f"ours NF4, CUDA graph + kernels, at-end GEMV {','.join(map(str, AT_END[:3]))}", "nf4",
             cuda and one and ours(nf4, prompts, True, n, True, True, tile=AT_END)),
            (f"ours NF4, CUDA graph + kernels, attention in parts of {PARTS_OF}", "nf4",
             cuda and one and ours(nf4, prompts, True, n, part_positions=PARTS_OF)),
            ("ours NF4, eager + kernels", "nf4", cuda and one and ours(nf4, prompts, False, n)),
            ("ours NF4, " + ("CUDA graph + kernels, " if cuda else "") + "sampled as chat.py", "nf4",
             one and ours(nf4, prompts, None, n, sampling=CHAT)),
            ("transformers", "dense", theirs(hf, prompts, device)),
            ("transformers + bitsandbytes", "nf4", hf_bnb and theirs(hf_bnb, prompts, device)),
            ("ours NF4, CUDA graph, reference", "nf4", cuda and one and ours(nf4, prompts, True, n, False)),
            ("ours NF4, eager, reference", "nf4", one and ours(nf4, prompts, False, n, False))]
    results = {}
    while rows:  # each row let go once timed (a batch decoder holds its KV cache)
        label, weights, fn = rows.pop(0)
        if not fn:
            continue
        try:
            tps, timed_n, ids, warm = timed_row(fn, n, args.limit, device)
        except Exception as e:
            print(f"{label:44s} failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        tps *= batch
        results[label] = (tps, ids, weights)
        share = f"{tps / (batch * ceiling[weights]):6.1%} of its weight-read ceiling" if ceiling[weights] else ""
        print(f"{label:44s} {tps:9.1f} tokens/s over {timed_n:4d} steps {share}  (warm-up {warm:6.2f} s)",
              flush=True)

    dense_ids = results.get("transformers", (0, None))[1]
    nf4_ids = results.get("transformers + bitsandbytes", (0, None))[1]
    ours_nf4 = results.get("ours NF4, CUDA graph, reference", results.get("ours NF4, eager, reference"))
    for label, (tps, ids, weights) in results.items():
        reference = dense_ids if weights == "dense" else nf4_ids
        if label.startswith("ours NF4") and ours_nf4 is not None and ids is not ours_nf4[1]:
            reference = ours_nf4[1]  # the kernels against our own reference: the same ids expected
        if reference is not None and ids is not reference and "sampled" not in label:
            common = min(len(ids[0]), len(reference[0]))
            same = min(next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), common)
                       for row, ref in zip(ids, reference))
            print(f"{label}: greedy ids equal the reference's for the first {same} of {common}"
                  + (" in every sequence" if batch > 1 else ""))
    for label in [label for label in results if label.endswith(", PDL")]:  # the same kernels: the same bits
        without = results.get(label.removesuffix(", PDL"))
        if without is not None:
            common = min(len(results[label][1][0]), len(without[1][0]))
            same = all(a[:common] == b[:common] for a, b in zip(results[label][1], without[1]))
            print(f"{label}: greedy ids {'equal' if same else 'DIFFER FROM'} those without PDL ({common} tokens)")
    for base in ["transformers", "transformers + bitsandbytes", "ours, CUDA graph"]:
        if base in results:
            print(f"against {base}: " + ", ".join(f"{label} {tps / results[base][0]:.2f}x"
                                                 for label, (tps, _, _) in results.items() if label.startswith("ours")))


if __name__ == "__main__":
    main()
