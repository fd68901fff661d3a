"""Peak GPU memory of a QLoRA training step at the Llama-2-7B shape, ours and transformers + PEFT +
bitsandbytes', counted without a GPU.

Each side's step runs on fake tensors (torch's ``FakeTensorMode``: shapes,
dtypes and storages, no data, no arithmetic), so the full 7B shape at sequence
8,192 takes seconds to a minute on any CPU. Ours takes the code a CUDA tensor takes
(``bench_host``'s routing: the NF4 work through the kernels' wrappers, the
training layer kernels where a row has them, every Triton launch left out: a
kernel writes into memory its wrapper allocated); theirs is bitsandbytes'
Linear4bit under PEFT's LoRA with transformers' gradient checkpointing. Both
under bf16 autocast, with the fused AdamW, as ``bench/bench_train.py`` runs
each row on a GPU. ``LiveBytes`` adds up the bytes of every storage alive, from
its making to the moment the last tensor on it is let go. Its peak over one
step (forward, checkpointed recomputation, backward, the optimizer's step;
after one step that made AdamW's moments) is what ``torch.cuda.max_memory_allocated``
reads less the caching allocator's rounding (to 512 bytes) and what CUDA code
allocates inside one operation, where no dispatch sees it: cuBLAS's workspace,
FlashAttention's backward accumulator (float32, the size of q: 128 MiB at
sequence 8,192), bitsandbytes' weight dequantized inside its ``gemm_4bit``. The
approximations: the fake tensors are CPU ones (autocast refuses a CUDA device
without one), so CPU autocast's casts stand in for CUDA's, and attention is the
CPU's fused kernel, which keeps, as FlashAttention does, its output and the
softmax's log-sum-exp for the backward; the offloaded layer inputs' copies out
are made in host memory uncounted and their copies back as new tensors, when
the GPU's code makes them; our 8-bit AdamW (``--optimizer adamw8bit``) takes its
PyTorch steps, not its kernel (their temporaries are 262,144 values at a time).
Checked: on the CPU, the count on fake tensors equals the one on real tensors
byte for byte, and on real ones it reads what the allocator holds
(tests/test_bench_memory.py); theirs, counted with the multi-tensor AdamW, comes
within 2.5-6% under their peaks measured on an H200 (docs/BENCHMARKS.md).

Per row: the peak, the ratio to theirs, the floor (what a step cannot go under:
the frozen base, the LoRA weights, AdamW's moments and every LoRA gradient at
once), and, with ``--top``, what the step had made that was alive at the peak.
With ``--traffic``, for our rows, what the same step's kernels move (``traffic.Traffic``):
the bytes every kernel but the matrix multiplications and attention reads and
writes, and their time at a copy's rate, the part of a step's GPU time that
``bench/bench_train.py --count`` leaves out (it counts the FLOPs).

    python bench/bench_memory.py --setting recipe       # Llama-2-7B, r 128 with embedding and head, 2048
    python bench/bench_memory.py --setting long --top 8 # r 16 on the projections, 8192; what fills the peak
    python bench/bench_memory.py --setting long --layers 16 --rows theirs ours-all ours-lean
    python bench/bench_memory.py --setting recipe --dropout 0.05 --traffic --rows ours ours-all
"""
import argparse
import collections
import contextlib
import gc
import importlib
import warnings
import weakref

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench_host import KERNEL_MODULES, NoLaunch, on_the_gpus_path
from bench_train import FEATURES, ROWS, SETTINGS
from traffic import Traffic

GiB = 2**30
FLASH = int(SDPBackend.FLASH_ATTENTION)  # SDPA's kernel as a GPU picks it (``torch._fused_sdp_choice``)
COPY_RATE = 4.3e12  # bytes/s: a copy's on an H200, as measured (docs/BENCHMARKS.md)


class LiveBytes(TorchDispatchMode):
    """The bytes of every tensor storage an operation made while this mode was on, from its making until it
    is freed (a view adds nothing: it shares its base's storage). ``peak`` is the most alive at once since
    ``reset_peak()``; ``at_peak`` lists what was alive then: (bytes, operation, shape, dtype, made since the
    reset)."""

    def __init__(self):
        super().__init__()
        self.alive = {}  # id of a storage -> (bytes, operation, shape, dtype, epoch, weak reference)
        self.now = self.peak = self.epoch = 0
        self.at_peak, self.peak_op = [], None
        self.host = False  # while True (``in_host_memory``), what is made is host memory: not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):  # a view or an in-place result is on an input's storage: nothing made
            if isinstance(t, torch.Tensor) and (key := id(t.untyped_storage())) not in self.alive \
                    and key not in inputs:
                self._made(t, func.name())
        return out

    def _made(self, t, op):
        if self.host:
            return
        storage = t.untyped_storage()  # one Python object a storage, as long as the storage lives
        key, n = id(storage), storage.nbytes()
        self.alive[key] = (n, op, tuple(t.shape), t.dtype, self.epoch, weakref.ref(storage, lambda _: self._freed(key)))
        self.now += n
        if self.now > self.peak:
            node = torch._C._current_autograd_node()  # the backward running, if one is
            self.peak, self.peak_op = self.now, f"{op}{f' in {node.name()}' if node else ''}"
            self.at_peak = [(n, op, shape, dtype, epoch == self.epoch) for n, op, shape, dtype, epoch, _ in
                            self.alive.values()]

    def _freed(self, key):
        self.now -= self.alive.pop(key)[0]

    @contextlib.contextmanager
    def in_host_memory(self):
        """Within: what is made is host memory, not counted."""
        self.host = True
        try:
            yield
        finally:
            self.host = False

    def reset_peak(self):
        self.epoch += 1
        self.peak, self.at_peak, self.peak_op = self.now, [], None


@contextlib.contextmanager
def offloaded_to(live):
    """``bailong.memory.HostCopy`` on the CPU as on CUDA: its copy out made in host memory (not counted by
    ``live``), its copy back a new tensor on the device (on the CPU it would be the host copy itself)."""
    from bailong import memory

    class HostCopy(memory.HostCopy):
        __slots__ = ()

        def __init__(self, t):
            with live.in_host_memory():
                super().__init__(t)

        def fetch(self):
            if self.back is None:
                self.back = self.host.clone(), None
            return self.back

    real, memory.HostCopy = memory.HostCopy, HostCopy
    try:
        yield
    finally:
        memory.HostCopy = real


def adamw(params, args, theirs):
    """The optimizer ``bench/bench_train.py`` gives a side: torch's fused AdamW, as on CUDA (``args.foreach``:
    its multi-tensor one), or with 8-bit moments (``args.optimizer``): ours, or bitsandbytes' for theirs."""
    if getattr(args, "optimizer", "adamw") == "adamw":
        implementation = dict(foreach=True) if getattr(args, "foreach", False) else dict(fused=True)
        return torch.optim.AdamW(params, lr=1e-4, **implementation)
    if theirs:
        import bitsandbytes as bnb
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily():  # its constant tables, made from data
            return bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.0)
    from bailong.optim import AdamW8bit
    return AdamW8bit(params, lr=1e-4, weight_decay=0.0)


def in_bf16(make):
    """``make()`` with floating tensors made in bf16: a fake tensor cannot be converted by ``Module.to()``."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return make()
    finally:
        torch.set_default_dtype(default)


def our_model(config, args, targets, keep, offload, attention=False):
    """Ours as ``bench/bench_train.py`` trains it: NF4 base, LoRA, activation checkpointing; and its loss."""
    import bailong
    from bailong import lora
    from bailong.quantized import quantize_model
    model = in_bf16(lambda: quantize_model(bailong.Llama(config)))
    lora.inject_lora(model, lora.LoRAConfig(r=args.rank, alpha=2.0 * args.rank, dropout=args.dropout,
                                            targets=targets))
    model = lora.mark_only_lora_trainable(model)
    model.checkpointing, model.keep_dequantized, model.offload = True, keep, offload
    model.keep_attention = attention
    return model, lambda ids: model(ids[:, :-1], targets=ids[:, 1:])


def their_model(config, args, targets):
    """transformers + PEFT + bitsandbytes as ``bench/bench_train.py`` trains them: Llama with bitsandbytes'
    Linear4bit (NF4, double quantization), ``prepare_model_for_kbit_training`` (gradient checkpointing; the
    embedding, head and norms in float32), PEFT's LoRA; and the loss over float32 logits. Loading would
    quantize real weights, so each Linear4bit gets fake packed codes and quantization state of the shapes
    bitsandbytes makes; the forward and backward are bitsandbytes' own (its dequantize operations have fake
    implementations). Two things refuse fake tensors and are stepped around: ``Params4bit`` (a tensor
    subclass: the codes are a plain parameter carrying its attributes) and ``Module.to()`` (PEFT moves each
    adapter to its layer's device, here the one fake CPU already: not moved)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, create_dynamic_map, get_4bit_type
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                     num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                     max_position_embeddings=max(args.seq_len, config.max_position_embeddings),
                     attn_implementation="sdpa", use_cache=False)
    model = in_bf16(lambda: LlamaForCausalLM(hf))
    with unset_fake_temporarily():  # constant tables, made from data
        nf4_code, absmax_code = get_4bit_type("nf4", device="cpu"), create_dynamic_map(signed=True)
    for name, linear in [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets[:7]]:
        with unset_fake_temporarily():  # its own Params4bit, replaced below
            q = bnb.nn.Linear4bit(1, 1, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        q.in_features, q.out_features = linear.in_features, linear.out_features
        n = linear.weight.numel()
        nested = QuantState(absmax=torch.empty(-(-n // 64 // 256)), code=absmax_code, blocksize=256,
                            dtype=torch.float32)
        state = QuantState(absmax=torch.empty(n // 64, dtype=torch.uint8), shape=linear.weight.shape, code=nf4_code,
                           blocksize=64, quant_type="nf4", dtype=torch.bfloat16, offset=torch.zeros(()),
                           state2=nested)
        codes = nn.Parameter(torch.empty(n // 2, 1, dtype=torch.uint8), requires_grad=False)
        codes.quant_state, codes.quant_type, codes.blocksize, codes.compress_statistics = state, "nf4", 64, True
        codes.bnb_quantized, codes.module = True, q
        q._parameters["weight"] = codes
        model.set_submodule(name, q)
    model.is_loaded_in_4bit = True
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,  # non-reentrant, as bench_train's
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    to, nn.Module.to = nn.Module.to, lambda self, *args, **kwargs: self
    try:
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                                                 target_modules=list(targets)))
    finally:
        nn.Module.to = to
    return model, lambda ids: nn.functional.cross_entropy(model(input_ids=ids[:, :-1]).logits.flatten(0, 1).float(),
                                                          ids[:, 1:].flatten())


def step_peak(config, args, keep=False, fake=True, top=0, theirs=False, offload=False, traffic=None,
              bf16_grads=False, embedding=False, attention=False):
    """The peak and the floor of one training step of ours (or ``theirs``), in bytes, counted as the module
    docstring says on fake tensors (``fake``), else on real ones; prints what filled the peak (``top``). The
    LoRA (``args``: rank, dropout, embedding_and_head, batch, seq_len) and the paths ours takes are the
    caller's: the switches of ``bailong.lora``, ``bailong.memory``, ``bailong.layer_fused`` and the routing
    (``on_the_gpus_path``); ``keep``: the recomputation's dequantized weights kept for the backward;
    ``offload``: each layer's input kept in host memory (``bailong.memory.OffloadedInput``; here the copy out
    is made uncounted and the copy back is a new tensor, when and as the GPU's would be made); ``traffic``,
    a ``Traffic``: what the kernels of the step counted (the second) read and write; ``bf16_grads``: the
    projections' LoRA gradients kept in bf16 (``bailong.memory.BF16Grads``); ``embedding``: its table in host
    memory (``bailong.memory.offload_embedding``; here its copy made uncounted, a step's rows counted as the
    GPU's copy of them); ``attention``: attention's output kept for the backward (``bailong.layer_fused``)."""
    from bailong import nf4, optim
    from bailong.memory import BF16Grads, offload_embedding
    gc.collect()  # nothing of a row before alive, held in a cycle
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    targets += ("embed_tokens", "lm_head") if args.embedding_and_head else ()
    made_from_data = nf4.dynamic_code  # NF4's constant tables are made from data: made for real, outside
    codes = {signed: made_from_data(signed) for signed in (True, False)}
    nf4._dynamic_lut(torch.device("cpu"))
    optim.tables(torch.device("cpu"))  # and the 8-bit moments' (cached)
    optim.zero_code("exp_avg"), optim.zero_code("exp_avg_sq")
    with contextlib.ExitStack() as on:
        if fake:  # the constants stay real tensors
            on.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            nf4.dynamic_code = lambda signed=True: codes[signed]
            on.callback(setattr, nf4, "dynamic_code", made_from_data)
            on.enter_context(warnings.catch_warnings())  # LoRA's cast cache keys on data pointers: nothing read
            warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
            # asked from Python, SDPA's choice answers the math path on fake tensors (SDPA itself, asking in C++,
            # takes the CPU's flash kernel): the GPU's answer instead
            choice, torch._fused_sdp_choice = torch._fused_sdp_choice, lambda *args, **kwargs: FLASH
            on.callback(setattr, torch, "_fused_sdp_choice", choice)
        live = on.enter_context(LiveBytes())
        if offload:
            on.enter_context(offloaded_to(live))
        model, loss_of = their_model(config, args, targets) if theirs else our_model(config, args, targets, keep,
                                                                                     offload, attention)
        if embedding:
            with live.in_host_memory():
                offload_embedding(model)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(trainable, args, theirs)
        kept = BF16Grads(model) if bf16_grads else None
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1))
        for measured in (False, True):  # the first step makes AdamW's moments
            if measured:
                live.reset_peak()
                floor = live.now + sum(p.numel() * p.element_size() for p in trainable)
                floor -= kept.saved_bytes if kept else 0
                if traffic is not None:
                    on.enter_context(traffic)
                    for module in map(importlib.import_module, KERNEL_MODULES):
                        for name in [name for name, kernel in vars(module).items() if name.endswith("_kernel")
                                     and (hasattr(kernel, "fn") or isinstance(kernel, NoLaunch))]:
                            on.callback(setattr, module, name, getattr(module, name))
                            setattr(module, name, traffic.launch(name))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(ids)
            loss.backward()
            del loss
            if kept:
                kept.step(optimizer, trainable)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    if top:
        made = collections.Counter()
        for n, op, shape, dtype, in_step in live.at_peak:
            if in_step:
                made[op.removeprefix("aten::"), shape, str(dtype).removeprefix("torch.")] += n
        held = sum(n for n, *_, in_step in live.at_peak if not in_step)
        print(f"  at the peak ({live.peak_op}): {held / GiB:.2f} GiB held from before the step, "
              f"{(live.peak - held) / GiB:.2f} GiB made by it, the largest:")
        for (op, shape, dtype), n in made.most_common(top):
            print(f"    {n / 2**20:9.1f} MiB  {op} {shape} {dtype}")
    return live.peak, floor


def main():
    from bailong import layer_fused, lora, lora_casts, lora_fused, memory
    from bailong.config import preset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=SETTINGS, default="recipe")
    p.add_argument("--layers", type=int, help="fewer layers than the preset's")
    p.add_argument("--seq-len", type=int, help="instead of the setting's")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (train.py's default: 0.05)")
    # not the rows with cuDNN's attention first: its tensors are flash's (its log-sum-exp as many bytes), and the
    # fake tensors' choice is flash's (step_peak)
    rows = [flag for flag in ROWS.values() if "cudnn" not in FEATURES.get(flag, ())]
    p.add_argument("--rows", nargs="+", choices=rows, default=rows, help="the rows to count (default: all)")
    p.add_argument("--projections-only", action="store_true", help="LoRA on the seven projections only (as the "
                   "H200 peaks in docs/BENCHMARKS.md were read), not on the embedding and head as well")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw", help="float32 moments (torch's "
                   "fused AdamW on both sides), or 8-bit moments (ours; bitsandbytes' AdamW8bit for theirs)")
    p.add_argument("--foreach", action="store_true", help="torch's multi-tensor AdamW instead of the fused one "
                   "(what both sides took when the H200 peaks in docs/BENCHMARKS.md were read)")
    p.add_argument("--top", type=int, default=0, help="list this many of the largest things alive at each peak")
    p.add_argument("--traffic", action="store_true", help="also the bytes the step's kernels other than matrix "
                   "multiplications read and write, and how long that takes at a copy's rate on an H200")
    args = p.parse_args()
    seq_len = args.seq_len
    for name, value in SETTINGS[args.setting].items():
        setattr(args, name, value)
    args.seq_len = seq_len or args.seq_len
    args.embedding_and_head = args.embedding_and_head and not args.projections_only
    config = preset(args.preset)
    config.num_hidden_layers = args.layers or config.num_hidden_layers
    optimizer = ("AdamW with 8-bit moments" if args.optimizer == "adamw8bit" else
                 "multi-tensor AdamW" if args.foreach else "fused AdamW")
    print(f"{args.preset} ({config.num_hidden_layers} layers), sequence {args.seq_len}, batch {args.batch}, LoRA "
          f"r={args.rank}{' with embedding and head' if args.embedding_and_head else ''}, dropout {args.dropout}, "
          f"activation checkpointing, bf16 autocast, {optimizer}; counted on fake tensors")
    names = {flag: which for which, flag in ROWS.items()}
    peaks = {}
    for flag in ["theirs"] * ("theirs" in args.rows) + [flag for flag in args.rows if flag != "theirs"]:
        on = FEATURES.get(flag, set())
        on_the_gpus_path("layers" in on)
        if "torch-dropout" in on:
            lora_fused.seeded_dropout = lambda x: None
        lora.use_fused_lora("fused" in on)
        layer_fused.use_fused_layer("autograd" not in on)
        memory.use_chunked_loss("loss" in on)
        memory.use_chunked_mlp("mlp" in on)
        lora_casts.use_casts_by_layer("casts" in on)
        print(names[flag], flush=True)
        traffic = Traffic() if args.traffic and flag != "theirs" else None  # theirs: bitsandbytes' ops hide theirs
        peak, floor = peaks[flag] = step_peak(config, args, "keep" in on, top=args.top, theirs=flag == "theirs",
                                              offload="offload" in on, traffic=traffic, bf16_grads="grads" in on,
                                              embedding="embedding" in on, attention="attention" in on)
        ratio = f" ({peak / peaks['theirs'][0]:.2f}x theirs)" if "theirs" in peaks and flag != "theirs" else ""
        print(f"  peak {peak / GiB:.2f} GiB{ratio}, floor {floor / GiB:.2f} GiB", flush=True)
        if traffic:
            moved = sum(traffic.bytes.values())
            print(f"  kernels: {sum(traffic.matmuls.values())} matmuls and attention, "
                  f"{sum(traffic.kernels.values())} others moving {moved / 1e9:.1f} GB "
                  f"({moved / COPY_RATE * 1e3:.1f} ms at {COPY_RATE / 1e12:.1f} TB/s), the most:")
            for name, n in traffic.bytes.most_common(args.top or 8):
                print(f"    {n / 1e9:8.2f} GB  {traffic.kernels[name]:5d} x {name.removeprefix('aten::')}")


if __name__ == "__main__":
    main()
