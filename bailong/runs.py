"""A training run's folder: recognising it, refusing to clobber anything else, checkpoints and resuming.

    out/run.json            the options that define the run, its length, where it was started
    out/metrics.jsonl       one JSON object per step and per evaluation; loss.png plots them
    out/adapter/            the result: the adapter with the best held-out loss (the last one without held-out data)
    out/checkpoints/        step-N/ (adapter, optimizer and RNG states) for the last two saves; LATEST names the newest
    out/base/, out/cache/   a base that exists nowhere else (the embedded default, SFT's merged base); token arrays

A run is recognised by its recorded options, not by how ``--out`` was spelled:
a trailing slash, ``../``, a moved or copied folder all name the same run, and
``--resume --steps`` larger than before continues it. ``--overwrite`` removes a
folder only when everything in it is a run's, and says what it removes.
"""
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from bailong.errors import BailongError, UsageError, read_json
from bailong.files import atomic_folder, atomic_write, overlaps

RUN_FILES = {"run.json", "metrics.jsonl", "loss.png", "adapter", "checkpoints", "base", "cache"}
# options that change neither the model nor the order of the data: a run may continue with other values
NOT_IDENTITY = {"out", "steps", "resume", "overwrite", "workers", "device", "eval_every", "eval_batches",
                "save_every", "patience"}


def _where(path):
    """A local path resolved (so that any spelling of it compares equal); anything else as given."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def run_identity(config) -> dict:
    """What makes two runs the same run."""
    from dataclasses import asdict
    options = {k: v for k, v in asdict(config).items() if k not in NOT_IDENTITY}
    options.update(model=_where(config.model), init=_where(config.init), data=[_where(d) for d in config.data])
    return options


def inputs(config) -> dict:
    """The run's local inputs, by what they are."""
    found = {f"the data {d}": d for d in config.data}
    found.update({"the base model": config.model, "the model to fine-tune (--init)": config.init})
    return {what: path for what, path in found.items() if path and Path(path).expanduser().exists()}


def _is_run_file(name):
    return name in RUN_FILES or (name.startswith(".") and name.endswith((".tmp", ".old")))


def read_run(out: Path) -> dict | None:
    """run.json of the run in ``out`` (its options under "options"), or None when there is none."""
    if not (out / "run.json").exists():
        return None
    run = read_json(out / "run.json")
    return run if "options" in run else {"options": run, "steps": run.get("steps")}  # an older run.json


def _differences(before: dict, now: dict) -> str:
    names = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    return "; ".join(f"--{k.replace('_', '-')} was {before.get(k)!r}, now {now.get(k)!r}" for k in names[:3])


def prepare_output(config, say=print) -> Path:
    """Make ``--out`` ready for this run, or refuse with one line, before anything is read or written.

    The folder must be new or empty, or hold this same run (continued with --resume), or hold only a
    run that ``--overwrite`` may replace. It may not hold, or lie inside, any of the run's inputs.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file; --out names the folder for the run")
    for what, path in inputs(config).items():
        if overlaps(out, path):
            raise UsageError(f"{out}: holds or lies inside {what}; choose an --out apart from the run's inputs")
    if out.is_dir() and any(out.iterdir()):
        run = read_run(out)
        others = sorted(p.name for p in out.iterdir() if not _is_run_file(p.name))
        if run is None:
            raise UsageError(f"{out}: holds files that are not a training run ({', '.join(others[:3])}); "
                             "choose another --out")
        done = steps_done(out)
        if config.overwrite:
            if others:
                raise UsageError(f"{out}: holds {others[0]}, which is not part of a run; nothing was removed "
                                 "(move it away, or choose another --out)")
            entries = sorted(p.name + "/" * p.is_dir() for p in out.iterdir())
            say(f"--overwrite: removing the run in {out} ({done} steps done): {', '.join(entries)}")
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif done or (out / "metrics.jsonl").exists():
            if differences := _differences(run["options"], run_identity(config)):
                raise UsageError(f"{out}: holds a different run ({differences}); choose another --out")
            if not config.resume:
                raise UsageError(f"{out}: already holds this run ({done} of {run.get('steps')} steps done); "
                                 "pass --resume to continue it, or choose another --out")
            if done >= config.steps:
                raise UsageError(f"{out}: the run has done {done} steps; pass --steps above {done} to continue it")
            if run.get("steps") not in (None, config.steps):
                say(f"continuing to step {config.steps} (the run was started for {run['steps']}): the "
                    "learning-rate schedule stretches to the new length from here")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BailongError(f"{out}: cannot create the folder ({e.strerror})") from None
    atomic_write(out / "run.json", _json({"options": run_identity(config), "steps": config.steps,
                                          "folder": str(out.resolve())}))
    return out


def _json(value) -> str:
    import json
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


# ---- checkpoints -----------------------------------------------------------------------------------------

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


def save_result(folder: Path, model, lora_config, tokenizer, base_name=None):
    """An adapter folder (PEFT format, the grown embedding rows, the tokenizer), replaced whole or not at all."""
    from bailong.adapter import save_adapter
    with atomic_folder(folder) as tmp:
        save_adapter(model, tmp, lora_config, base_name)
        (tmp / "tokenizer.model").write_bytes(tokenizer.sp.serialized_model_proto())
    return folder


def save_checkpoint(out: Path, step, model, lora_config, tokenizer, optimizer, base_name=None):
    """checkpoints/step-N: the adapter, optimizer and RNG states, written to a temporary folder and
    renamed, then named in LATEST; the two newest are kept. A failed save (a full disk) leaves the
    previous checkpoint as it was and says so."""
    final = out / "checkpoints" / f"step-{step:07d}"
    try:
        with atomic_folder(final) as tmp:
            save_result(tmp / "adapter", model, lora_config, tokenizer, base_name)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        atomic_write(out / "checkpoints" / "LATEST", final.name)
    except BailongError as e:
        previous = latest_checkpoint(out)
        kept = f"{previous} is intact" if previous and previous.exists() else "no earlier checkpoint exists"
        raise BailongError(f"{e}; step {step} was not saved, {kept}") from None
    for old in sorted((out / "checkpoints").glob("step-*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    latest = Path(out) / "checkpoints" / "LATEST"
    return Path(out) / "checkpoints" / latest.read_text().strip() if latest.exists() else None


def steps_done(out: Path) -> int:
    """The step of the newest checkpoint (0 without one), read from its name."""
    names = [p.name for p in (Path(out) / "checkpoints").glob("step-*")]
    return max((int(n[5:]) for n in names if n[5:].isdigit()), default=0)


def read_checkpoint(folder: Path, model) -> tuple[dict, dict]:
    """(LoRA tensors, state) of a checkpoint, checked against ``model``; a one-line error if unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bailong.adapter import PREFIX, WEIGHTS
    from bailong.lora import lora_parameters
    if not folder.is_dir():
        raise BailongError(f"{folder}: missing")
    try:
        tensors = load_file(folder / "adapter" / WEIGHTS)
    except (OSError, SafetensorError) as e:
        raise BailongError(f"{folder / 'adapter' / WEIGHTS}: unreadable ({str(e).splitlines()[0]})") from None
    for name, p in lora_parameters(model).items():
        if PREFIX + name not in tensors or tensors[PREFIX + name].shape != p.shape:
            raise BailongError(f"{folder / 'adapter' / WEIGHTS}: does not fit this model ({name})")
    try:
        state = torch.load(folder / "state.pt", weights_only=True)
        assert {"step", "optimizer", "rng"} <= set(state)
    except Exception as e:  # truncated (EOFError, RuntimeError), not ours (UnpicklingError), or missing
        raise BailongError(f"{folder / 'state.pt'}: unreadable ({type(e).__name__})") from None
    return {name: tensors[PREFIX + name] for name in lora_parameters(model)}, state


def resume(out: Path, model, optimizer, say=print) -> int:
    """Restore the newest checkpoint that reads whole: LoRA weights, optimizer and RNG states.

    Returns the number of steps it had done (0 when there is no checkpoint). A newer
    checkpoint that is missing or damaged is passed over with a warning naming it.
    """
    from bailong.lora import lora_parameters
    folder = Path(out) / "checkpoints"
    named = latest_checkpoint(out)
    candidates = ([named] if named else []) + sorted(folder.glob("step-*"), reverse=True)
    problems = []
    for candidate in dict.fromkeys(candidates):
        try:
            tensors, state = read_checkpoint(candidate, model)
            optimizer.load_state_dict(state["optimizer"])
        except (BailongError, ValueError) as e:
            problems.append(str(e))
            continue
        with torch.no_grad():
            for name, p in lora_parameters(model).items():
                p.copy_(tensors[name])
        set_rng_state(state["rng"])
        if problems:
            say(f"warning: {'; '.join(problems)}; resuming from {candidate.name} instead")
        return state["step"]
    if problems:
        raise BailongError(f"{folder}: no checkpoint can be read ({problems[0]}); start again with another --out")
    return 0
