"""The Bailong recipe as functions: configuration, setup, schedule, checkpoints, metrics.

``train.py`` strings them together in the order things happen; everything worth
testing lives here. The embedded default (no --model, no --data) is a tiny
random-weight Llama with the byte-level tokenizer, trained on the project's own
small Traditional Chinese and English samples: it exercises every step of the
recipe on a CPU in a few minutes, but its base model knows nothing to transfer.
"""
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from bailong.data import DATA_DIR
from bailong.errors import BailongError, read_json


@dataclass
class TrainConfig:
    stage: str = field(default="pretrain", metadata={"help": "pretrain (vocabulary transfer + QLoRA) or sft"})
    model: str = field(default="", metadata={"help": "base model folder or Hub id (pretrain); empty: the tiny "
                                                     "embedded default"})
    init: str = field(default="", metadata={"help": "sft: the pre-training output to start from (default "
                                                    "out/pretrain)"})
    data: list = field(default_factory=list, metadata={"help": "text/jsonl files, folders or Hub dataset ids "
                                                                "(default: the bundled samples)"})
    out: str = field(default="", metadata={"help": "output folder (default out/STAGE)"})
    new_pieces: int = field(default=300, metadata={"help": "pretrain: pieces to add to the tokenizer (0: none)"})
    init_method: str = field(default="zip-tie", metadata={"help": "zip-tie, zip-tie-first, mean-all or random"})
    quantize: str = field(default="nf4", metadata={"help": "nf4 (QLoRA) or none"})
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    rslora: bool = False
    seq_len: int = 128
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-step and process"})
    grad_accum: int = 1
    steps: int = 300
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    held_out: float = 0.1
    save_every: int = 100
    seed: int = 0
    device: str = field(default="", metadata={"help": "cuda or cpu (default: cuda when available)"})
    precision: str = field(default="auto", metadata={"help": "bf16 (bfloat16 weights and autocast), fp32, or auto "
                                                             "(bf16 on CUDA, fp32 on the CPU)"})
    checkpointing: str = field(default="auto", metadata={"help": "activation checkpointing: on, off, auto "
                                                                 "(on for CUDA)"})
    workers: int = field(default=0, metadata={"help": "tokenizer processes (0: one per core)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace a different run in --out"})

    def __post_init__(self):
        if self.stage not in ("pretrain", "sft"):
            raise BailongError(f"--stage must be pretrain or sft, not {self.stage!r}")
        for name, allowed in [("precision", ("auto", "bf16", "fp32")), ("checkpointing", ("auto", "on", "off"))]:
            if getattr(self, name) not in allowed:
                raise BailongError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        self.out = self.out or f"out/{self.stage}"
        self.init = self.init or ("out/pretrain" if self.stage == "sft" else "")
        if not self.data:
            self.data = [str(DATA_DIR / "zh_tw_sample.txt"), str(DATA_DIR / "en_sample.txt")] \
                if self.stage == "pretrain" else [str(DATA_DIR / "chats_sample.jsonl")]

    def run_identity(self) -> dict:
        """What makes two runs the same run (flags about this invocation left out)."""
        return {k: v for k, v in asdict(self).items() if k not in ("resume", "overwrite", "workers", "device")}


def parse_config(argv=None) -> TrainConfig:
    """TrainConfig from the command line: every field is a flag; --config FILE (JSON) supplies values
    that flags given on the command line override; defaults live in the dataclass alone."""
    import argparse
    p = argparse.ArgumentParser(description="Bailong training: python train.py --stage pretrain, then --stage sft")
    p.add_argument("--config", help="a JSON file of options (flags on the command line win)")
    for f in fields(TrainConfig):
        default = f.default_factory() if callable(f.default_factory) else f.default
        kw = dict(default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} (default: {default!r})")
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="+", **kw)
        else:
            p.add_argument(flag, type=type(default), **kw)
    given = vars(p.parse_args(argv))
    values = {}
    if config_file := given.pop("config", None):
        values = read_json(config_file)
        unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise BailongError(f"{config_file}: unknown option {unknown[0]!r}")
    return TrainConfig(**{**values, **given})


def lr_at(step, config: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def prepare_output(config: TrainConfig):
    """Create --out, or check that it holds this same run (refusing to clobber a different one)."""
    out = Path(config.out)
    run_file = out / "run.json"
    if out.exists() and any(out.iterdir()):
        progress = latest_checkpoint(out) or (out / "metrics.jsonl").exists()
        if config.overwrite:
            shutil.rmtree(out)
        elif not run_file.exists():
            raise BailongError(f"{out}: holds files that are not a training run; choose another --out")
        elif progress and read_json(run_file) != config.run_identity():
            raise BailongError(f"{out}: already holds a different run; choose another --out, or pass --overwrite")
        elif progress and not config.resume:
            raise BailongError(f"{out}: already holds this run; pass --resume to continue it, or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(config.run_identity(), indent=2))
    os.replace(tmp, run_file)
    return out


def rng_state() -> dict:
    """Every random generator's state, in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step, model, lora_config, tokenizer, optimizer, base_name=None):
    """checkpoints/step-N: the adapter (PEFT format, with the grown embedding rows and the tokenizer),
    optimizer and RNG states; written to a temporary folder, renamed, then named in LATEST."""
    from bailong.adapter import save_adapter
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = out / "checkpoints" / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp / "adapter", lora_config, base_name)
    (tmp / "adapter" / "tokenizer.model").write_bytes(tokenizer.sp.serialized_model_proto())
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest = out / "checkpoints" / "LATEST"
    latest.with_suffix(".tmp").write_text(final.name)
    os.replace(latest.with_suffix(".tmp"), latest)
    for old in sorted((out / "checkpoints").glob("step-*"))[:-2]:  # keep the last two
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    latest = Path(out) / "checkpoints" / "LATEST"
    return Path(out) / "checkpoints" / latest.read_text().strip() if latest.exists() else None


def load_checkpoint(folder: Path, model, optimizer) -> int:
    """Restore LoRA weights, optimizer and RNG states; returns the number of steps done."""
    from safetensors.torch import load_file

    from bailong.adapter import PREFIX, WEIGHTS
    from bailong.lora import lora_parameters
    tensors = load_file(folder / "adapter" / WEIGHTS)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            p.copy_(tensors[PREFIX + name])
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state["step"]


class Metrics:
    """metrics.jsonl (one JSON object a line) and loss.png, both rewritten as training goes."""

    def __init__(self, out: Path, keep_until=None):
        self.file = out / "metrics.jsonl"
        self.rows = []
        if self.file.exists():  # a resumed run keeps the steps it had done
            self.rows = [json.loads(line) for line in self.file.read_text().splitlines() if line.strip()]
            self.rows = [r for r in self.rows if keep_until is None or r["step"] <= keep_until]
            self._write_all()

    def _write_all(self):
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.file)

    def log(self, **row):
        self.rows.append(row)
        with open(self.file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if evals:
            ax.plot(*zip(*evals), "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.file.with_name("loss.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, self.file.with_name("loss.png"))


def estimate_memory(model, config: TrainConfig) -> str:
    """A rough figure for the startup summary: weights + LoRA with Adam states + logits."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 * 4  # fp32 value, grad, 2 moments
    logits = config.batch_size * config.seq_len * model.config.vocab_size * 4 * 3
    return f"~{(weights + lora + logits) / 2**30:.2f} GiB (weights, LoRA + AdamW, logits; activations extra)"
