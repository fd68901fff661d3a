"""Batch-1 decoding speed: our generate() against transformers' generate() on the same weights.

A model of a preset's shape with random weights (Llama-2-7B on a GPU, the tiny
preset on the CPU), a random prompt, greedy decoding of a fixed number of new
tokens (no early stop). Rows: transformers in the compute dtype; transformers
with bitsandbytes 4-bit (the NF4 weights we quantized, saved and loaded back, so
both read the same bits); ours in the compute dtype; ours on NF4 through the
PyTorch reference, eagerly and with CUDA graphs; ours on NF4 with CUDA graphs
and the kernels (the default on CUDA).
Each row runs once to warm up (autotuning, graph capture) and is then timed;
tokens/s counts the new tokens over the whole call, prefill included.

    python bench/bench_decode.py                      # llama2-7b on CUDA, tiny on CPU
    python bench/bench_decode.py --preset tinyllama-1.1b --layers 2    # CPU, shapes bitsandbytes takes
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bailong  # noqa: E402
import kernels  # noqa: E402
from bailong.config import preset  # noqa: E402
from bailong.generate import Sampling, generate  # noqa: E402
from bailong.model import init_weights  # noqa: E402
from bailong.quantized import quantize_model  # noqa: E402

GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)


def timed(fn, device):
    """(seconds of the first call, seconds of the second, the second's result)."""
    times, out = [], None
    for _ in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[0], times[1], out


def ours(model, prompt, n, graph, fused=False):
    def run():
        previous = kernels.use_kernels(fused)
        try:
            return generate(model, prompt, n, GREEDY, stop_ids=[], cuda_graph=graph)
        finally:
            kernels.use_kernels(previous)
    return run


def theirs(model, prompt, n, device):
    ids = torch.tensor([prompt], device=device)
    return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


def weight_bytes(model):
    from bailong.quantized import nf4_weights
    dense = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in dense) + sum(q.nbytes for q in nf4_weights(model))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", help="default: llama2-7b on CUDA, tiny on the CPU")
    p.add_argument("--layers", type=int, help="fewer layers than the preset (to fit a CPU)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256)
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
    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf())).to(device=device, dtype=dtype).eval()
    hf.load_state_dict(dense.state_dict())
    with torch.device("meta"):
        nf4 = bailong.Llama(config)
    nf4.load_state_dict(dense.state_dict(), assign=True)  # shares the dense tensors until quantized
    nf4 = quantize_model(nf4.eval())
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    n = args.new_tokens
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name} ({config.num_hidden_layers} layers) on {gpu}, {dtype}, torch {torch.__version__}; prompt {args.prompt}, {n} new tokens, greedy")

    with tempfile.TemporaryDirectory() as tmp:
        bailong.save(nf4, tmp)  # bitsandbytes' 4-bit format: transformers reads the same bits back
        try:
            hf_bnb = LlamaForCausalLM.from_pretrained(tmp, device_map=device, dtype=dtype).eval()
        except Exception as e:  # bitsandbytes missing, or without a backend for this device
            hf_bnb = None
            print(f"transformers + bitsandbytes: not run ({type(e).__name__}: {str(e).splitlines()[0]})")
    rows = [("transformers", "dense", theirs(hf, prompt, n, device)),
            ("transformers + bitsandbytes", "nf4", hf_bnb and theirs(hf_bnb, prompt, n, device)),
            ("ours" + (", CUDA graph" if device == "cuda" else ""), "dense", ours(dense, prompt, n, None)),
            ("ours NF4, eager, reference", "nf4", ours(nf4, prompt, n, False)),
            ("ours NF4, CUDA graph, reference", "nf4", device == "cuda" and ours(nf4, prompt, n, True)),
            ("ours NF4, CUDA graph + kernels", "nf4", device == "cuda" and ours(nf4, prompt, n, True, True))]
    results = {}
    for label, weights, fn in rows:
        if not fn:
            continue
        try:
            first, seconds, ids = timed(fn, device)
        except Exception as e:
            print(f"{label:32s} failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        results[label] = (n / seconds, ids, weights)
        print(f"{label:32s} {n / seconds:9.1f} tokens/s   (first call {first:6.2f} s: warm-up/capture)")

    dense_ids = results.get("transformers", (0, None))[1]
    nf4_ids = results.get("transformers + bitsandbytes", (0, None))[1]
    for label, (tps, ids, weights) in results.items():
        reference = dense_ids if weights == "dense" else nf4_ids
        if reference is not None and ids is not reference:
            same = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), n)
            print(f"{label}: greedy ids equal transformers' for the first {same} of {n}")
    for base in ["transformers", "transformers + bitsandbytes"]:
        if base in results:
            print(f"against {base}: " + ", ".join(f"{label} {tps / results[base][0]:.2f}x"
                                                 for label, (tps, _, _) in results.items() if label.startswith("ours")))
    if device == "cuda":
        x = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
        seconds = timed(lambda: torch.empty_like(x).copy_(x), device)[1]
        bandwidth = 2 * x.numel() / seconds  # bytes read plus written
        print(f"ceiling from reading the weights once per token at {bandwidth / 1e12:.2f} TB/s: "
              f"{bandwidth / weight_bytes(dense):.0f} tokens/s dense, {bandwidth / weight_bytes(nf4):.0f} NF4")


if __name__ == "__main__":
    main()
