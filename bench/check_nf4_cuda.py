"""NF4 on CUDA against bitsandbytes' CUDA kernels: same bytes? same values?

bitsandbytes quantizes the double-quantized absmax differently on the CPU (a
65,536-bin lookup table) and on CUDA (a search for the nearest code), so the two
can write different 8-bit absmax codes for the same weight. This script
measures how often, that our quantizer matches the CPU path on the GPU too, and
that our dequantization of a checkpoint bitsandbytes wrote on CUDA gives exactly
bitsandbytes' CUDA values. Also times quantize/dequantize of a 4096 x 11008 matrix.

    python bench/check_nf4_cuda.py
"""

import argparse

import torch

from bailong.nf4 import NF4Tensor, quantize
from bench_model_gpu import cuda_time, need_gpu


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    need_gpu("check_nf4_cuda.py")
    import bitsandbytes as bnb_module
    import bitsandbytes.functional as bnb
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb_module.__version__}")
    torch.manual_seed(0)
    print(f"{'shape':>14} {'bs':>5} {'dq':>3} | bytes=bnb.cuda  absmax=bnb.cuda  cpu==cuda(ours) | "
          "ours(bnb.cuda state) == bnb.cuda dequant | max|ours - bnb.cuda| dequant")
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008), (64, 96), (33, 65)]:
        for blocksize in [64, 128]:
            for dq in [True, False]:
                w = (torch.randn(shape) * 0.02).bfloat16()
                packed, state = bnb.quantize_4bit(w.cuda(), blocksize=blocksize, compress_statistics=dq,
                                                  quant_type="nf4")
                ours_cpu, ours = quantize(w, blocksize, dq), quantize(w.cuda(), blocksize, dq)
                same_bytes = (ours.data == packed).float().mean().item()
                same_absmax = (ours.absmax == state.absmax).float().mean().item()
                cpu_cuda = all(torch.equal(a.cpu(), b) for a, b in zip(ours.tensors().values(),
                                                                       ours_cpu.tensors().values()))
                saved = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
                read = NF4Tensor.from_bnb_dict(saved)  # what a checkpoint written on CUDA holds
                exact = torch.equal(read.dequantize(), bnb.dequantize_4bit(packed, state))
                diff = (ours.dequantize().float() - bnb.dequantize_4bit(packed, state).float()).abs().max().item()
                print(f"{str(shape):>14} {blocksize:5d} {dq:3d} | {same_bytes:14.6f} {same_absmax:15.6f} "
                      f"{str(cpu_cuda):>16} | {str(exact):>40} | {diff:.3g}")
    w = (torch.randn(4096, 11008) * 0.02).bfloat16().cuda()
    q = quantize(w)
    packed, state = bnb.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
    n = w.numel()
    for name, fn in [("bailong quantize", lambda: quantize(w)),
                     ("bailong dequantize (PyTorch reference)", lambda: q.dequantize(torch.bfloat16)),
                     ("bitsandbytes quantize_4bit", lambda: bnb.quantize_4bit(w, compress_statistics=True,
                                                                               quant_type="nf4")),
                     ("bitsandbytes dequantize_4bit", lambda: bnb.dequantize_4bit(packed, state))]:
        ms = cuda_time(fn, repeat=20)
        print(f"4096 x 11008: {name:40s} {ms:8.3f} ms {n / ms / 1e6:8.2f} G elements/s")


if __name__ == "__main__":
    main()
