"""Our Llama against transformers' LlamaForCausalLM on one CUDA GPU, same weights.

At the Llama-2-7B shape with random bfloat16 weights (no download needed):
checks that the logits agree, then times a prefill forward pass (tokens/s) and
batch-1 greedy decoding (tokens/s, against the ceiling set by reading every
weight once per token, at the copy rate bench_nf4_matmul.py measures). Ours as
the package runs by default (its decoding step through the fused Triton kernels,
the prefill's RMSNorm and SwiGLU by Triton too), transformers eager; CUDA-graph
decoding and the NF4 kernels alone are measured by bench_decode.py and
bench_nf4_matmul.py.

    python bench/bench_model_gpu.py [--preset llama2-7b] [--prefill 2048] [--decode 256]
"""
import argparse
import statistics

import torch

import bailong
from bailong.config import preset
from bailong.generation import Sampling, generate


def need_gpu(script, tiny=None):
    """One line, not a traceback, where ``script`` cannot run here: its timings of CUDA kernels without a GPU, or
    its CPU smoke run (``tiny``: True for --tiny, None for a script without one) outside Triton's interpreter,
    which is chosen before Triton loads."""
    if tiny and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(f"--tiny runs the kernels in Triton's interpreter: TRITON_INTERPRET=1 python bench/{script} "
                         "--tiny")
    if not tiny and not torch.cuda.is_available():
        raise SystemExit(f"{script} times CUDA kernels: it needs a GPU" + (" (--tiny: a smoke run on the CPU, "
                                                                           "under TRITON_INTERPRET=1)" if tiny is False
                                                                           else ""))


def cuda_time(fn, repeat=5):
    """Median milliseconds of fn() over `repeat` runs after one warm-up, timed with CUDA events."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--decode", type=int, default=256)
    args = p.parse_args()
    need_gpu("bench_model_gpu.py")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = preset(args.preset)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(LlamaConfig(**config.to_hf())).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # Llama's initialiser: normal(0, 0.02)
        for name, w in hf.named_parameters():
            if "norm" not in name:
                w.normal_(0, 0.02)
    with torch.device("meta"):
        ours = bailong.Llama(config)
    ours.load_state_dict(hf.state_dict(), assign=True)  # same names: the same tensors, shared
    ours.tie_weights()
    ours.eval()
    weight_bytes = sum(w.numel() * w.element_size() for w in ours.parameters())
    layer_params = sum(w.numel() for w in ours.model.layers.parameters())
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.preset}: "
          f"{weight_bytes / 2**30:.2f} GiB of bf16 weights")

    ids = torch.randint(0, config.vocab_size, (1, args.prefill), device="cuda")
    with torch.no_grad():
        a, b = ours(ids[:, :512]).float(), hf(ids[:, :512]).logits.float()
    rel = ((a - b).norm() / b.norm()).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"logits vs transformers: relative error {rel:.2e}, argmax agreement {agree:.4f}")
    assert rel < 2e-2, "logits disagree with transformers"

    rows = []
    with torch.no_grad():
        for name, fn in [("ours", lambda: ours(ids, last_only=True)), ("transformers", lambda: hf(ids, logits_to_keep=1))]:
            torch.cuda.reset_peak_memory_stats()
            ms = cuda_time(fn)
            peak = (torch.cuda.max_memory_allocated() - weight_bytes) / 2**30
            rows.append((name, ms, peak))
    for name, ms, peak in rows:
        print(f"prefill {args.prefill} tokens, {name:12s}: {ms:7.1f} ms = {args.prefill / ms * 1e3:8.0f} tokens/s "
              f"({2 * layer_params * args.prefill / ms / 1e9:.0f} TFLOP/s in the layers' matmuls), "
              f"activation peak {peak:.2f} GiB; ratio to transformers {rows[1][1] / ms:.2f}x")

    greedy = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    prompt = ids[0, :32].tolist()
    generate(ours, prompt, 8, greedy, stop_ids=[], cuda_graph=False)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out_ours = generate(ours, prompt, args.decode, greedy, stop_ids=[], cuda_graph=False)
    end.record()
    torch.cuda.synchronize()
    ours_tps = args.decode / (start.elapsed_time(end) / 1e3)
    hf.generate(ids[:, :32], max_new_tokens=8, do_sample=False)  # warm-up
    start.record()
    out_hf = hf.generate(ids[:, :32], max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)
    end.record()
    torch.cuda.synchronize()
    hf_tps = args.decode / (start.elapsed_time(end) / 1e3)
    same = next((i for i, (x, y) in enumerate(zip(out_ours, out_hf[0, 32:].tolist())) if x != y), args.decode)
    from bench_nf4_matmul import copy_bandwidth
    floor = weight_bytes / copy_bandwidth()  # each weight read once per token
    print(f"decode batch 1, {args.decode} tokens: ours {ours_tps:.1f} tokens/s, transformers {hf_tps:.1f} tokens/s "
          f"(ratio {ours_tps / hf_tps:.2f}x); bandwidth ceiling {1 / floor:.0f} tokens/s; "
          f"greedy ids identical for the first {same} tokens")


if __name__ == "__main__":
    main()
