"""The Bailong recipe's options: train.py's configuration, its checks and its parsing.

This module does not import torch: train.py checks every option before loading it. The
run folder lives in ``bailong/run_folder.py`` and ``bailong/runs.py``, checkpoints in
``bailong/checkpoints.py``, the schedule, metrics and stopping in ``bailong/progress.py``.
The embedded default (no --model, no --data) is a tiny random-weight Llama with
the byte-level tokenizer, trained on the project's own small Traditional Chinese
and English samples: it exercises every step of the recipe on a CPU in seconds,
but its base model knows nothing to transfer.
"""
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from bailong.config import INIT_METHODS, MAX_NEW_PIECES
from bailong.errors import Parser, UsageError, check_device, not_utf8, read_json
from bailong.switches import switched_on, triton_installed

SAMPLES = Path(__file__).parent / "samples"  # the embedded default's data, written for the project
CHOICES = {"stage": ("pretrain", "sft"), "init_method": INIT_METHODS, "quantize": ("nf4", "none"),
           "optimizer": ("adamw", "adamw8bit"),
           "precision": ("auto", "bf16", "fp32"), "checkpointing": ("auto", "on", "off")}
AT_LEAST_ONE = ("lora_r", "seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "save_every")
AT_LEAST_ZERO = ("new_pieces", "warmup", "workers", "patience")
# past these a run fails deep in a library (a rank past 2**63, a trainer's size past 2**31), or makes a million
# micro-batches or processes before it can fail
AT_MOST = {"lora_r": 65_536, "new_pieces": MAX_NEW_PIECES, "grad_accum": 65_536, "workers": 1_024}
NEW_PIECES = ("all_pieces", "init_method")  # how the new pieces are chosen and begun: nothing where none are added
PRETRAIN_ONLY = ("new_pieces", *NEW_PIECES)  # the vocabulary's: fine-tuning keeps --init's
# what each option only CUDA's training has says on the CPU (the first two move GPU memory to the host)
TO_HOST = ("offload_activations", "offload_embedding")
ON_CPU = {"offload_activations": "--offload-activations moves the GPU's saved layer inputs to host memory; on the "
                                 "CPU they are there already",
          "offload_embedding": "--offload-embedding moves the GPU's embedding table to host memory; on the CPU it is "
                               "there already",
          "keep_attention": "--keep-attention keeps attention's output in the layers CUDA's training writes out by "
                            "hand; on the CPU they are recomputed through autograd",
          "cudnn_attention": "--cudnn-attention tries SDPA's cuDNN attention kernel first, which runs on CUDA; the "
                             "CPU has none"}
BF16_GRADS_IN_FP32 = ("--bf16-grads keeps the LoRA gradients in bf16, lossless only where training runs in bf16: it "
                      "needs --precision bf16 (the default on CUDA)")
# options that work on what activation checkpointing keeps or recomputes: what each does, for their errors
ON_CHECKPOINTING = {"offload_activations": "keeps the layer inputs activation checkpointing saves",
                    "keep_dequantized": "keeps what activation checkpointing's recomputation dequantizes",
                    "casts_by_layer": "makes the LoRA copies again in activation checkpointing's recomputation",
                    "keep_attention": "keeps attention's output for activation checkpointing's recomputation"}
# Fine-tuning an already trained model wants smaller, fewer steps: on the embedded default, at the
# pre-training rate the held-out loss on the bundled chats rises after step 10.
STAGE_DEFAULTS = {"sft": dict(lr=1e-4, min_lr=1e-5, steps=60, warmup=10, eval_every=10, save_every=30)}


@dataclass
class TrainConfig:
    stage: str = field(default="pretrain", metadata={"help": "pretrain (vocabulary transfer + QLoRA) or sft"})
    model: str = field(default="", metadata={"help": "base model folder or Hub id (pretrain); empty: the tiny "
                                                     "embedded default"})
    init: str = field(default="", metadata={"help": "sft: the pre-training output to start from (default "
                                                    "out/pretrain)"})
    data: list = field(default_factory=list, metadata={"help": "text files (a document a line), JSON lines "
                                                                "(.jsonl), folders or Hub dataset ids of them "
                                                                "(default: the bundled samples)"})
    out: str = field(default="", metadata={"help": "output folder (default out/STAGE)"})
    new_pieces: int = field(default=300, metadata={"help": "pretrain: pieces to add to the tokenizer (0: none)"})
    all_pieces: bool = field(default=False, metadata={"help": "pretrain: add pieces of every script, not only CJK "
                                                              "ones (for a language other than Chinese or Japanese)"})
    init_method: str = field(default="zip-tie", metadata={"help": "zip-tie, zip-tie-first, mean-all or random"})
    quantize: str = field(default="nf4", metadata={"help": "nf4 (QLoRA) or none"})
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    rslora: bool = False
    seq_len: int = 128
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-step and process"})
    grad_accum: int = 1
    steps: int = 100
    lr: float = 2e-3
    min_lr: float = field(default=2e-4, metadata={"help": "where the cosine decay ends (default: 0.0002; sft: "
                                                          "1e-05; --lr / 10 where --lr is below it)"})
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optimizer: str = field(default="adamw", metadata={"help": "adamw (float32 moments) or adamw8bit (AdamW's moments "
                                                              "in 8 bits: 6 bytes less for each trained parameter)"})
    eval_every: int = 20
    eval_batches: int = field(default=4, metadata={"help": "held-out batches an evaluation measures, each of "
                                                           "--batch-size x processes examples (at most all those "
                                                           "held out)"})
    held_out: float = field(default=0.1, metadata={"help": "share of documents kept apart to measure learning"})
    patience: int = field(default=3, metadata={"help": "stop when held-out loss has not improved for this many "
                                                       "evaluations in a row (0: never stop, only warn)"})
    save_every: int = 50
    seed: int = 0
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})
    precision: str = field(default="auto", metadata={"help": "bf16 (bfloat16 weights and autocast), fp32, or auto "
                                                             "(bf16 on CUDA, fp32 on the CPU)"})
    checkpointing: str = field(default="auto", metadata={"help": "activation checkpointing: on, off, auto "
                                                                 "(on for CUDA)"})
    offload_activations: bool = field(default=False, metadata={"help": "with activation checkpointing on CUDA: keep "
                                                                       "each layer's saved input in host memory, not "
                                                                       "on the GPU (batch x sequence x hidden values "
                                                                       "a layer; a 7B step at 8,192 tokens on an H200: "
                                                                       "the same speed, peak 7.55 -> 5.74 GiB)"})
    keep_dequantized: bool = field(default=False, metadata={"help": "with activation checkpointing: the NF4 "
                                                                    "weights a layer's recomputation dequantizes "
                                                                    "serve its backward too (14 dequantizations a "
                                                                    "layer and step instead of 20, for about 0.3 "
                                                                    "GB held at the Llama-2-7B shape)"})
    cuda_graph: bool = field(default=False, metadata={"help": "after two eager steps, capture a step's forward "
                                                            "and backward as one CUDA graph and replay it each "
                                                            "step (CUDA, one process; LoRA dropout only through its "
                                                            "kernels; a 7B recipe step on an H200: 1.23x faster, "
                                                            "0.7 GiB more peak)"})
    casts_by_layer: bool = field(default=False, metadata={"help": "with activation checkpointing: make the LoRA "
                                                                  "weights' compute-dtype copies a decoder layer at "
                                                                  "a time, again in its recomputation, instead of "
                                                                  "all at once for the step, and in the backward "
                                                                  "dequantize q/k/v's and gate/up's weights one at a "
                                                                  "time (a second cast a step, 3 launches more a "
                                                                  "layer; with --bf16-grads the 7B recipe's peak "
                                                                  "0.87x -> 0.81x transformers+PEFT+bitsandbytes', "
                                                                  "counted; not timed on a GPU)"})
    offload_embedding: bool = field(default=False, metadata={"help": "keep the frozen embedding's table in host "
                                                                     "memory, not on the GPU (vocabulary x hidden "
                                                                     "values: 0.24 GiB at Llama 2's in bf16); a "
                                                                     "step's rows are gathered there and copied in "
                                                                     "(CUDA, one process; with --casts-by-layer and "
                                                                     "--bf16-grads the 7B recipe's peak 0.81x -> "
                                                                     "0.79x transformers+PEFT+bitsandbytes', "
                                                                     "counted; not timed on a GPU)"})
    bf16_grads: bool = field(default=False, metadata={"help": "keep the projections' LoRA gradients in bf16 until "
                                                              "the optimizer's step: 2 bytes a trained weight "
                                                              "instead of 4, lossless in bf16 training with one "
                                                              "micro-batch a step (the 7B recipe's floor 0.59 GiB "
                                                              "lower; its peak with --casts-by-layer, above; not "
                                                              "timed on a GPU)"})
    keep_attention: bool = field(default=False, metadata={"help": "with activation checkpointing on CUDA: keep "
                                                                  "attention's output and the layer's residual "
                                                                  "stream after attention too (twice batch x "
                                                                  "sequence x hidden values more a layer; in host "
                                                                  "memory with --offload-activations), so that the "
                                                                  "recomputation skips attention and o (the same "
                                                                  "values; not timed on a GPU)"})
    cudnn_attention: bool = field(default=False, metadata={"help": "attention by SDPA's cuDNN kernel where it "
                                                                   "takes the call, else torch's own choice (CUDA, "
                                                                   "bf16; with --keep-attention kept by it too; on "
                                                                   "Hopper others measured it 1.7-2.3x faster than "
                                                                   "SDPA's flash kernel in training; not timed "
                                                                   "here on a GPU)"})
    workers: int = field(default=0, metadata={"help": "tokenizer processes (0: one per core this process may use)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint "
                                                          "(a larger --steps extends it)"})
    overwrite: bool = field(default=False, metadata={"help": "delete the run in --out and start again (refused when "
                                                             "the folder holds anything that is not a run's)"})

    def __post_init__(self):
        check_types(vars(self))
        for name, value in vars(self).items():  # (a config file's: the command line's parser refuses them first)
            if (text := not_utf8(value)) is not None:
                raise UsageError(f"{flag(name)} is not UTF-8 text ({os.fsencode(text)!r})")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{flag(name)} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in AT_LEAST_ONE + AT_LEAST_ZERO:
            least = 1 if name in AT_LEAST_ONE else 0
            if getattr(self, name) < least:
                raise UsageError(f"{flag(name)} must be at least {least}, not {getattr(self, name)}")
        for name, most in AT_MOST.items():
            if getattr(self, name) > most:
                raise UsageError(f"{flag(name)} must be at most {most:,}, not {getattr(self, name):,}")
        for name, ok, what in [("lr", lambda v: 0 < v < 1e37, "a positive number below 1e37"),  # (AdamW's first
                               # step, 10 --lr, must fit in a float32: a traceback past it)
                               ("min_lr", lambda v: 0 <= v <= self.lr, f"between 0 and --lr ({self.lr})"),
                               ("lora_alpha", lambda v: v > 0, "a positive number"),
                               ("grad_clip", lambda v: v > 0, "a positive number"),
                               ("weight_decay", lambda v: v >= 0, "0 or more"),
                               ("lora_dropout", lambda v: 0 <= v < 1, "at least 0 and below 1"),
                               ("held_out", lambda v: 0 <= v < 1, "a share at least 0 and below 1"),
                               ("seed", lambda v: 0 <= v < 2**32, f"from 0 to {2**32 - 1}")]:
            value = getattr(self, name)
            if not (ok(value) and math.isfinite(value)):  # ok first: a huge int is no float
                raise UsageError(f"{flag(name)} must be {what}, not {value}")
        for name in ON_CHECKPOINTING:
            if getattr(self, name) and self.checkpointing == "off":
                raise UsageError(without_checkpointing(name))
        if self.keep_dequantized and self.quantize != "nf4":
            raise UsageError("--keep-dequantized keeps the NF4 weights' dequantized copies: it needs --quantize nf4")
        if self.cuda_graph and self.lora_dropout and not dropout_kernels_switched_on():
            raise UsageError("--cuda-graph captures LoRA dropout only through its kernels (torch's is drawn again in "
                             "the backward from a random state restored on the host), which BAILONG_FUSED_LORA=0, "
                             "BAILONG_LAYER_KERNELS=0 or BAILONG_NF4_KERNELS=0 in the environment switch off: leave "
                             "them unset, or give --lora-dropout 0")
        if self.keep_attention and self.precision == "fp32":
            raise UsageError("--keep-attention keeps the output of SDPA's flash or cuDNN kernel, which take bf16 on "
                             "CUDA: it needs --precision bf16 (the default on CUDA)")
        if self.cudnn_attention and self.precision == "fp32":
            raise UsageError("--cudnn-attention tries SDPA's cuDNN attention kernel first, which takes bf16: it needs "
                             "--precision bf16 (the default on CUDA)")
        if self.keep_attention and not layers_by_hand_switched_on():
            raise UsageError("--keep-attention keeps attention's output in the layers CUDA's training writes out by "
                             "hand, which BAILONG_FUSED_LORA=0, BAILONG_LAYER_KERNELS=0, BAILONG_NF4_KERNELS=0, "
                             "BAILONG_FUSED_LAYER=0 or BAILONG_CHUNKED_MLP=1 in the environment switch off: leave "
                             "them unset")
        for name in TO_HOST:
            if self.cuda_graph and getattr(self, name):
                raise UsageError(f"--cuda-graph and {flag(name)} do not go together: the copies to host memory are "
                                 "not captured")
        if self.bf16_grads and self.precision == "fp32":
            raise UsageError(BF16_GRADS_IN_FP32)
        if self.bf16_grads and self.cuda_graph:
            raise UsageError("--cuda-graph and --bf16-grads do not go together: a graph's gradients are float32 "
                             "tensors of its own")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in --out and --overwrite deletes it: give one of them")
        if self.stage == "pretrain" and self.init:
            raise UsageError("--init is for --stage sft; pre-training starts from --model")
        if self.stage == "sft" and self.model:
            raise UsageError("--model is for --stage pretrain; fine-tuning starts from --init")
        for name in PRETRAIN_ONLY:
            if self.stage == "sft" and getattr(self, name) != getattr(TrainConfig, name):  # not its default
                raise UsageError(f"{flag(name)} is for --stage pretrain; fine-tuning keeps the vocabulary of --init")
        for name in NEW_PIECES if not self.new_pieces else ():  # (set, they were silently unused)
            if getattr(self, name) != getattr(TrainConfig, name):
                raise UsageError(f"{flag(name)} is for the pieces --new-pieces adds, and --new-pieces 0 adds none")
        if self.device:  # without --device: once torch knows which there is
            check_device(self.device)
            check_on_device(self, self.device)
        self.out = os.path.expanduser(self.out or f"out/{self.stage}")  # "~/runs" in a config file: the home's
        self.init = os.path.expanduser(self.init)
        self.init = self.init or ("out/pretrain" if self.stage == "sft" else "")
        if not self.data:
            self.data = [str(SAMPLES / "zh_tw_sample.txt"), str(SAMPLES / "en_sample.txt")] \
                if self.stage == "pretrain" else [str(SAMPLES / "chats_sample.jsonl")]


def flag(name) -> str:
    return "--" + name.replace("_", "-")


NO_TRITON = "Triton is not installed here (it ships for Linux alone)"


def check_on_device(config, device: str):
    """The options ``device`` (``--device``, or the one torch finds) does not allow: those of the GPU on the CPU,
    and there, where "auto" leaves checkpointing and bf16 off, those that need them; on CUDA without Triton, those
    of its kernels."""
    if device.startswith("cuda"):
        if config.cuda_graph and config.lora_dropout and not triton_installed():
            raise UsageError(f"--cuda-graph captures LoRA dropout only through its kernels, and {NO_TRITON}: give "
                             "--lora-dropout 0")
        if config.keep_attention and not triton_installed():
            raise UsageError("--keep-attention keeps attention's output in the layers CUDA's training writes out by "
                             f"hand with Triton's kernels, and {NO_TRITON}")
        return
    for name, message in ON_CPU.items():
        if getattr(config, name):
            raise UsageError(message)
    for name in ON_CHECKPOINTING:  # (the offload: refused above)
        if getattr(config, name) and config.checkpointing == "auto":
            raise UsageError(without_checkpointing(name, on_cpu=True))
    if config.bf16_grads and config.precision == "auto":
        raise UsageError(BF16_GRADS_IN_FP32)


def without_checkpointing(name, on_cpu=False) -> str:
    """The error for an option of ``ON_CHECKPOINTING`` without activation checkpointing: switched off, or
    (``on_cpu``) on the CPU, where "auto" leaves it off."""
    if on_cpu:
        return f"{flag(name)} {ON_CHECKPOINTING[name]}, and on the CPU checkpointing is off unless --checkpointing on"
    return f"{flag(name)} {ON_CHECKPOINTING[name]}: it needs --checkpointing on or auto"


def _default(f):
    return f.default_factory() if callable(f.default_factory) else f.default


def check_types(values: dict, source=None):
    """Refuse option values of the wrong kind (a config file's "12" for an integer, say); ints pass as floats."""
    kinds = {f.name: type(_default(f)) for f in fields(TrainConfig)}
    for name, value in values.items():
        kind = kinds.get(name)
        if kind is None:
            raise UsageError(f"{source}: unknown option {name!r}")
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                    list: "a list of strings"}[kind]
            shown = json.dumps(value) if source else repr(value)  # a file's null is null, not None
            raise UsageError(f"{source + ': ' if source else ''}{name if source else flag(name)} must be {what}, "
                             f"not {shown}")
        if kind is float:
            values[name] = float(value)


def parse_config(argv=None) -> TrainConfig:
    """TrainConfig from the command line: every field is a flag; --config FILE (JSON) supplies values
    that flags given on the command line override; defaults: the dataclass's fields, ``STAGE_DEFAULTS`` for
    --stage sft (applied here: ``TrainConfig(stage="sft")`` alone keeps pre-training's), and the paths that
    ``__post_init__`` derives."""
    import argparse
    p = Parser(prog="train.py", description="Bailong training: python train.py --stage pretrain, then --stage sft")
    p.add_argument("--config", help="a JSON file of options (flags on the command line win)")
    for f in fields(TrainConfig):
        default = _default(f)
        sft = f"; sft: {STAGE_DEFAULTS['sft'][f.name]!r}" if f.name in STAGE_DEFAULTS["sft"] else ""
        told = f.metadata.get("help", "")
        said = "" if "default" in told else f" (default: {default!r}{sft})"  # its help tells it in words
        kw = dict(default=argparse.SUPPRESS, help=told + said)
        if isinstance(default, bool):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            p.add_argument(flag(f.name), nargs="+", **kw)
        else:
            p.add_argument(flag(f.name), type=type(default), **kw)
    given = vars(p.parse_args(argv))
    values = {}
    if config_file := given.pop("config", None):
        values = read_json(config_file)
        check_types(values, config_file)
        if decided := [k for k in ("resume", "overwrite") if k in values]:
            raise UsageError(f"{config_file}: {decided[0]} belongs on the command line, where each run decides it "
                             "(a config file is reused)")
    stage = given.get("stage", values.get("stage", "pretrain"))
    chosen = {**values, **given}
    config = {**STAGE_DEFAULTS.get(stage, {}), **chosen}
    if "min_lr" not in chosen and config.get("lr", TrainConfig.lr) < config.get("min_lr", TrainConfig.min_lr):
        config["min_lr"] = config["lr"] / 10  # the defaults' ratio: an --lr below the default --min-lr, not refused
    return TrainConfig(**config)


# what takes less of the GPU's memory, said when a run runs out of it: a run's identity (runs.NOT_IDENTITY) holds the
# batch's shape, the optimizer and the gradients' dtype, not how a step is computed
LESS_MEMORY = ("a new run takes less with a smaller --batch-size (more --grad-accum keeps the step's size), a shorter "
               "--seq-len, --optimizer adamw8bit or --bf16-grads; this one resumed (--resume) with "
               "--offload-activations, --offload-embedding or --casts-by-layer")


def dropout_kernels_switched_on() -> bool:
    """Whether the environment switches train.py's LoRA dropout on CUDA to its kernels, whose masks a CUDA graph of
    the step holds (``bailong.step_graph.dropout_captured``): the fused LoRA path (``bailong.lora``) and the
    training layer kernels (``bailong_kernels``), read as they read them (``bailong.switches``), before torch loads.
    On CUDA without Triton neither runs: ``check_on_device`` says so once the device is known."""
    return all(map(switched_on, ("BAILONG_FUSED_LORA", "BAILONG_LAYER_KERNELS", "BAILONG_NF4_KERNELS")))


def layers_by_hand_switched_on() -> bool:
    """Whether the environment leaves train.py's checkpointed layers on CUDA written out by hand
    (``bailong.layer_fused``): the switches above, the hand-written layer's, and the MLP whole."""
    return (dropout_kernels_switched_on() and switched_on("BAILONG_FUSED_LAYER")
            and not switched_on("BAILONG_CHUNKED_MLP"))


def check_graph_step(world: int, device: str | None = None):
    """``--cuda-graph`` in train.py, before anything is read or written: one process (before torch loads, so that
    no process group starts), and, given once torch knows it, a CUDA device."""
    if world > 1:
        raise UsageError("--cuda-graph captures one process's step, not DDP's exchange of gradients between "
                         "processes: leave it out with torchrun")
    if device is not None and not device.startswith("cuda"):
        raise UsageError("--cuda-graph captures the step's GPU kernels: it needs a CUDA device")
