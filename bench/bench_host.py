"""Host time of a QLoRA training step on the GPU's path: what the CPU spends issuing a step's work.

A GPU runs a step no faster than the CPU can issue it: Python, autograd, the
dispatcher, and each kernel's launch. At batch 1 that can be the larger part: on
an H200 the GPU was busy for 72.5 ms of an 8-layer step of 143.6 ms at the
Llama-2-7B shape (docs/BENCHMARKS.md, "The host's share"). This measures the
issuing alone, on any machine and without a GPU: a tiny NF4 model (hidden 64,
sequence 32) trains on the CPU through the code the GPU takes (the NF4
projections through ``bailong_kernels``' matmul and dequantize, and per row the
fused LoRA and the training layer kernels), with every Triton kernel's launch
replaced by nothing: the Python around each launch counts, the kernel does not.
The aten operations still run, on tensors so small that each costs a few
microseconds, about what issuing it to a GPU costs; the Triton launcher's own
work and the driver's are not counted. In float32 without autocast: a CPU
without bf16 arithmetic takes ~90 us a bf16 matmul however small, which would
swamp the rest; so autocast's own casts (a few a layer on the fused path) are
left out too. The figure is a floor for the GPU's host time, not a reading of it.

With ``--triton`` the launches go through Triton's own Python instead of being
left out (the arguments bound and specialized, the compiled kernel looked up,
the grid and launch metadata made), into a driver that launches nothing: each
kernel is compiled once for sm_90 with Triton's ptxas (no GPU needed, as
bench/check_kernels_compile.py does), and its launcher does nothing. The
difference between the two is what Triton's launch Python adds on the host, a
floor: its C launcher (the arguments packed, the driver's launch call) is left
out as well.

Per row: one training step (forward, checkpointed recomputation, backward; LoRA
r = 8 on the seven projections, embedding and head; the model's own loss, as
train.py takes it) at 2 and at 6 layers, the best of 5 runs of 30 steps on
one thread, the rows' runs taken in turn; a layer's host time is their
difference over the 4 layers.

    python bench/bench_host.py
    python bench/bench_host.py --dropout 0.05 --steps 50
    python bench/bench_host.py --parts      # and where a step's time goes: forward, checkpointing, backward
    python bench/bench_host.py --triton     # Triton's launches through its own Python, launching nothing
"""
import argparse
import importlib
import time

import torch

import bailong
from bailong import layer_fused, lora, lora_fused, model, quantized
from bailong.config import preset
from bailong.model import init_weights
from bailong.quantized import quantize_model

# (fused LoRA, layer kernels, a layer written out by hand where it applies: bailong.layer_fused) by row
ROWS = {"plain LoRA": (False, False, False), "fused LoRA": (True, False, False),
        "fused LoRA + layer kernels": (True, True, False),
        "fused LoRA + layer kernels, layers by hand": (True, True, True)}
# with --parts, the fastest path's step taken apart: the forward alone, then with what checkpointing adds
PARTS = ("forward", "forward with checkpointing", "step", "step with checkpointing")
KERNEL_MODULES = ("bailong_kernels.nf4_dequant", "bailong_kernels.nf4_gemv", "bailong_kernels.layers",
                  "bailong_kernels.decode", "bailong_kernels.dropout")


class NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def launching_nothing(arch=90):
    """Triton's launches go through its own Python, then launch nothing: a compile-only driver (each kernel
    compiled for sm_<arch> at its first launch) whose launcher only counts and loads no binary. Returns the
    count, a list of one number."""
    from compiled_code import CompileOnly, require_nvidia_tools
    from triton.runtime import driver
    require_nvidia_tools()
    launched = [0]

    def launch(*args):  # the launcher: counts, runs nothing
        launched[0] += 1

    class LaunchNothing(CompileOnly):
        class utils:
            @staticmethod
            def load_binary(name, kernel, shared, device):  # module, function (not None: loaded), registers,
                return 0, 0, 0, 0, 1024  # spills, threads

            @staticmethod
            def get_device_properties(device):
                return {"max_shared_mem": 232448, "multiprocessor_count": 132}  # an H100's or H200's

        @staticmethod
        def launcher_cls(src, metadata):
            return launch

    driver.set_active(LaunchNothing(arch))
    return launched


def on_the_gpus_path(layer_kernels, patch=setattr, triton=False):
    """Make the CPU take the code a CUDA tensor takes (``bailong.quantized.kernels_take`` says yes for every
    tensor), the Triton launches left out, or with ``triton`` through Triton's own Python into nothing
    (``launching_nothing``, set first); ``patch(module, name, value)`` sets each (a test's undoes them)."""
    from bailong_kernels import dropout, layers
    if not triton:
        for module in map(importlib.import_module, KERNEL_MODULES):
            for name, kernel in list(vars(module).items()):
                if name.endswith("_kernel") and hasattr(kernel, "fn"):
                    patch(module, name, NoLaunch())
    patch(quantized, "kernels_take", lambda t: True)
    patch(model, "layer_kernels", lambda x: layers if layer_kernels and torch.is_grad_enabled() else None)
    patch(lora_fused, "seeded_dropout", lambda x: dropout if layer_kernels else None)


def step_ms(layers, fused, dropout, steps, part=PARTS[-1], by_hand=False):
    """Milliseconds of one ``part`` (``PARTS``) of a training step, over a run of ``steps`` after 3 unmeasured."""
    config = preset("tiny")
    config.num_hidden_layers, config.intermediate_size = layers, 192
    torch.manual_seed(0)
    llama = quantize_model(init_weights(bailong.Llama(config)))
    lora.mark_only_lora_trainable(lora.inject_lora(llama, lora.LoRAConfig(r=8, dropout=dropout)))
    llama.checkpointing = part.endswith("checkpointing")
    llama.train()
    lora.use_fused_lora(fused)
    layer_fused.use_fused_layer(by_hand)
    ids = torch.randint(0, config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(0))

    def step():
        loss = llama(ids[:, :-1], targets=ids[:, 1:])  # as train.py: the model's own loss
        if part.startswith("step"):
            loss.backward()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (train.py's default: 0.05)")
    parser.add_argument("--steps", type=int, default=30, help="steps a run")
    parser.add_argument("--rounds", type=int, default=5, help="runs of every row in turn; each row's best is shown")
    parser.add_argument("--parts", action="store_true", help="also the fastest path's step taken apart (PARTS)")
    parser.add_argument("--triton", action="store_true",
                        help="Triton's launches through its own Python, launching nothing (kernels compiled for sm_90)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    launched = launching_nothing() if args.triton else None
    launches = "through Triton's Python, launching nothing" if args.triton else "left out"
    print(f"host time of one training step on the GPU's path, Triton launches {launches}; LoRA dropout {args.dropout}")
    print("| path | 2 layers | 6 layers | a layer |\n| --- | --- | --- | --- |")
    rows = [(row, *switches, PARTS[-1]) for row, switches in ROWS.items()]
    rows += [(f"fused LoRA + layer kernels, layers by hand: {part}", True, True, True, part) for part in PARTS
             if args.parts]
    best = {}
    for _ in range(args.rounds):  # the rows in turn, so that a slower spell of the machine touches them alike
        for row, fused, kernels, by_hand, part in rows:
            on_the_gpus_path(kernels, triton=args.triton)
            for n in (2, 6):
                ms = step_ms(n, fused, args.dropout, args.steps, part, by_hand)
                best[row, n] = min(best.get((row, n), ms), ms)
    for row, *_ in rows:
        two, six = best[row, 2], best[row, 6]
        print(f"| {row} | {two:.2f} ms | {six:.2f} ms | {(six - two) / 4:.2f} ms |")
    if launched:
        print(f"Triton launches made, into nothing: {launched[0]:,}")


if __name__ == "__main__":
    main()
