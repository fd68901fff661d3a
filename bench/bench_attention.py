"""SDPA's attention kernels on a GPU at the training settings' shapes: which one torch takes, and how fast each is.

Causal attention of the Llama-2-7B shape (32 heads of 128, bf16, batch 1) at sequence 2,048 (setting (a)) and
8,192 (setting (b)) of bench/bench_train.py, by each kernel SDPA has (flash, cuDNN, memory-efficient), each alone
(``sdpa_kernel``): the forward, and the forward and backward as training runs them, in milliseconds and TFLOP/s
(a causal forward 2 x 2 x T^2 / 2 x D FLOPs a head, the backward 2.5 times that). Before it is timed, each
kernel's output and gradients are compared with the flash kernel's, and the attention kept by
``bailong.layer_fused._kept_attention`` (``train.py --keep-attention``; with ``--cudnn-attention`` by cuDNN's kernel)
with SDPA's through autograd: the same kernel, so the same values. It also prints SDPA's own choice in training
(gradients wanted), as torch orders its kernels and with cuDNN's first (``train.py --cudnn-attention``).

    python bench/bench_attention.py              # a GPU; a minute
    python bench/bench_attention.py --seq-len 4096
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bailong.layer_fused import _kept_attention, _kept_backward, attention_kernels
from bench_model_gpu import cuda_time, need_gpu

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(T, heads=32, D=128, seed=0):
    """q, k, v (1, heads, T, D), views of one (1, T, 3 x heads x D) output as a layer's q/k/v projection gives
    them, wanting gradients; and dL/dout (1, heads, T, D) laid out as attention's output."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(1, T, 3 * heads * D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = (t.view(1, T, heads, D).transpose(1, 2).detach().requires_grad_() for t in qkv.split(heads * D, -1))
    grad = torch.randn(1, T, heads, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    return q, k, v, grad


def by_sdpa(q, k, v, grad):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out, torch.autograd.grad(out, (q, k, v), grad)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048, 8192])
    args = p.parse_args()
    need_gpu("bench_attention.py")
    names = {int(b): n for n, b in KERNELS.items()} | {int(SDPBackend.MATH): "math"}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for T in args.seq_len:
        q, k, v, grad = inputs(T)
        flops = 4 * T * T * 128 * 32 / 2  # the causal forward's
        for cudnn_first in [False, True]:
            with attention_kernels(cudnn_first):
                choice = torch._fused_sdp_choice(q, k, v, is_causal=True)
            print(f"T={T}: SDPA takes {names.get(choice, choice)} in training"
                  + (" with cuDNN's first" if cudnn_first else ", as torch orders its kernels"))
            plain = [t.detach() for t in (q, k, v)]
            kept = _kept_attention(*plain, cudnn_first)
            if kept is not None:  # the same kernel as SDPA's: the same values
                with attention_kernels(cudnn_first):
                    out, grads = by_sdpa(q, k, v, grad)
                kept_grads = _kept_backward(*plain, *kept, grad.transpose(1, 2).reshape(1, T, -1))
                same = torch.equal(kept[0], out) and all(
                    torch.equal(a.transpose(1, 2).reshape(1, T, -1), b) for a, b in zip(grads, kept_grads))
                print(f"  kept attention ({names.get(choice, choice)}) against SDPA's: "
                      + ("the same, bit for bit" if same else "DIFFERENT"))
        reference = None
        for name, backend in KERNELS.items():
            with sdpa_kernel(backend):
                try:
                    out, grads = by_sdpa(q, k, v, grad)
                except RuntimeError as error:
                    print(f"  {name:9s} cannot take it: {str(error).splitlines()[0]}")
                    continue
                reference = reference or (out, grads)
                errors = [(a.float() - b.float()).abs().max().item() for a, b in zip((out, *grads),
                                                                                     (reference[0], *reference[1]))]
                forward = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeat=10)
                both = cuda_time(lambda: by_sdpa(q, k, v, grad), repeat=10)
            print(f"  {name:9s} forward {forward:7.3f} ms ({flops / forward / 1e9:5.0f} TFLOP/s), forward and "
                  f"backward {both:7.3f} ms ({3.5 * flops / both / 1e9:5.0f} TFLOP/s); largest difference from "
                  f"flash's: out {errors[0]:.2e}, dq {errors[1]:.2e}, dk {errors[2]:.2e}, dv {errors[3]:.2e}")


if __name__ == "__main__":
    main()
