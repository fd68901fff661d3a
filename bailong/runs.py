"""A training run's folder: its layout, recognising it, refusing to clobber anything else (checkpoints: checkpoints.py).

    out/run.json            what defines the run (options, fingerprints of its data and base), its length
    out/metrics.jsonl       one JSON object per step and per evaluation; loss.png plots them
    out/adapter/            the result: the adapter with the best held-out loss (the last one without held-out data)
    out/checkpoints/        step-N/ (adapter, optimizer and RNG states) for the last two saves; LATEST names the newest
    out/base/, out/cache/   a base that exists nowhere else (the embedded default, SFT's merged base); token arrays
    out/.lock               held by the process training in the folder

A run is recognised by what it computes, not by how paths were spelled: its
options, and fingerprints of its data and base model. A trailing slash, ``../``,
a moved or copied run folder, moved or re-cloned data all name the same run,
``--resume --steps`` larger than before continues it, and an SFT run resumes
from its own merged base whatever became of ``--init``. ``--overwrite`` removes
a folder only when everything in it is a run's, and says what it removes.

The checks come in parts, so that nothing is touched until everything that can
be checked has been: ``check_output`` before anything is read; ``prepare_output``
(fingerprints, the lock) once the data and the model have loaded; then the token
cache is the only write until ``start_run`` (--overwrite's removal, run.json),
once the data are known to make examples. Nothing here imports torch, so that
train.py checks --out before loading it.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from bailong.errors import BailongError, UsageError, read_json
from bailong.files import atomic_write, check_writable, overlaps, write_failed


class RunFolder:
    """Where each part of a run lives (the layout above), named here once: train.py writes a run and
    ``bailong.load`` (so chat.py and eval) reads one through these paths."""

    def __init__(self, out):
        self.path = out = Path(out)
        self.run_json, self.metrics, self.plot, self.lock = (out / n for n in ("run.json", "metrics.jsonl", "loss.png",
                                                                                ".lock"))
        self.result, self.checkpoints, self.base, self.cache = (out / n for n in ("adapter", "checkpoints", "base",
                                                                                   "cache"))
        self.latest = self.checkpoints / "LATEST"

    def checkpoint(self, step) -> Path:
        return self.checkpoints / f"step-{step:07d}"

    def saved(self) -> list[Path]:
        """The checkpoints saved, oldest first: folders named as ``checkpoint`` names them (a user's
        step-4-good is not one)."""
        found = [p for p in self.checkpoints.glob("step-*") if re.fullmatch(CHECKPOINT, p.name)]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def has_base(self) -> bool:
        """Whether the run keeps its own base model (the embedded default, SFT's merged base)."""
        return (self.base / "config.json").is_file()


STATE = "state.pt"  # in a checkpoint, beside its adapter/: step, optimizer and RNG states
CHECKPOINT = r"step-[0-9]{7,}"  # a checkpoint's name (``RunFolder.checkpoint``)
# options that change neither the model nor the order of the data, nor what a step computes (the memory and
# speed switches change how: on the CPU the same losses and gradients, bit for bit; the attention kernel, and on
# CUDA activation checkpointing's fused layer, the same to rounding, as the device's): a run may continue with
# other values; the inputs are compared by their fingerprints instead of their paths
NOT_IDENTITY = {"out", "steps", "resume", "overwrite", "workers", "device", "eval_every", "save_every", "patience",
                "model", "init", "data", "checkpointing", "offload_activations", "keep_dequantized", "cuda_graph",
                "keep_attention", "casts_by_layer", "offload_embedding", "cudnn_attention"}


# how token_cache._encode tokenizes a pre-training document: runs and token caches record it, and a run goes on only
# with the documents it began with
DOCUMENTS = "bos where a prompt has one, text, eos"
# how data.py reads data and makes SFT's examples: a run an earlier version began (recording none) goes on as it began
READING = ("lines end at line feeds; hidden files and empty JSON texts left out; SFT conversations without an "
           "answer within --seq-len left out")


def options(config, world=1) -> dict:
    """The options that make two runs the same run (the number of processes decides each one's examples; the
    vocabulary's options, only pre-training's)."""
    from bailong.training import PRETRAIN_ONLY
    ignored = NOT_IDENTITY | set(PRETRAIN_ONLY if config.stage == "sft" else ())
    return {**{k: v for k, v in asdict(config).items() if k not in ignored}, "processes": world}


def inputs(config) -> dict:
    """The run's local inputs, by what they are."""
    found = {f"the data {d}": d for d in config.data}
    found.update({"the base model": config.model, "the model to fine-tune (--init)": config.init})
    found = {what: Path(os.path.expanduser(path)) for what, path in found.items() if path}  # "~/zh" quoted, or in
    # a config file ("~nobody/x", a user there is not, as written)
    return {what: path for what, path in found.items() if path.exists()}


_TOKENIZER = r"tokenizer\.(model|json)|tokenizer_config\.json|special_tokens_map\.json|chat_template\.jinja"
_ADAPTER = {rf"adapter_config\.json|adapter_model\.safetensors|{_TOKENIZER}": None}
LAYOUT = {  # what a run writes (the names above), as patterns: a folder's own layout, or None for a file
    r"run\.json|metrics\.jsonl|loss\.png|\.lock": None,
    "adapter": _ADAPTER,
    "checkpoints": {"LATEST": None, CHECKPOINT: {"adapter": _ADAPTER, re.escape(STATE): None}},
    "base": {r"(generation_)?config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json": None,
             _TOKENIZER: None},
    "cache": {r"tokens-[0-9a-f]{20}\.(ids|labels|offsets)\.npy": None},
}
BEFORE_RUN_JSON = {r"\.lock": None, "cache": LAYOUT["cache"]}  # what a run writes before its run.json


def _not_a_runs(folder: Path, layout=LAYOUT, written=None) -> list[str]:
    """What in ``folder`` no run writes, at any depth (``adapter/README.md``, ``checkpoints/step-4-good/``): a
    name outside the layout, a file where it has a folder or the reverse, a link. Temporary names of unfinished
    writes (of the layout's names, or of those in ``written``) are a run's."""
    found = []
    for p in sorted(folder.iterdir()):
        if _temporary(p.name, written or layout):
            continue
        inner = next((v for k, v in layout.items() if re.fullmatch(k, p.name)), False)
        name = p.name + "/" * p.is_dir()
        if inner is False or p.is_symlink() or (inner is None) == p.is_dir():
            found.append(name)
        elif inner is not None:
            found += [name + q for q in _not_a_runs(p, inner)]
    return found


def _temporary(name: str, layout: dict) -> bool:
    """A temporary name of an unfinished write of one of ``layout``'s names (``files.atomic_write``,
    ``files.atomic_folder``: .NAME.PID.tmp, .NAME.PID.old), not a user's hidden file."""
    match = re.fullmatch(r"\.(.+)\.\d+\.(tmp|old)", name)
    return bool(match) and any(re.fullmatch(k, match[1]) for k in layout)


def _leftovers(folder: Path, layout=LAYOUT) -> list[Path]:
    """The temporaries in a run's folders of writes that never finished (a process killed while it saved: a
    checkpoint's adapter and optimizer states, gigabytes at 7B)."""
    found = []
    for p in sorted(folder.iterdir()):
        inner = next((v for k, v in layout.items() if re.fullmatch(k, p.name)), None)
        if _temporary(p.name, layout):
            found.append(p)
        elif isinstance(inner, dict) and p.is_dir() and not p.is_symlink():
            found += _leftovers(p, inner)
    return found


def finish_replacing(folder: Path) -> list[Path]:
    """Where a process was stopped between ``files.atomic_folder``'s two renames (one of the run's folders renamed
    away to .NAME.PID.old, its new version .NAME.PID.tmp not yet in its place), put the new version in place,
    whole by then, or else the old one back; the paths put in place. What is left is then removed as leftovers."""
    done = []
    for p in _leftovers(folder):
        if p.name.endswith(".old") and p.is_dir() and not p.is_symlink():
            name, pid = p.name[1:].rsplit(".", 2)[:2]
            target, new = p.with_name(name), p.with_name(f".{name}.{pid}.tmp")
            if not target.exists() and not target.is_symlink():
                os.replace(new if new.is_dir() and not new.is_symlink() else p, target)
                done.append(target)
    return done


def _in_the_way(out: Path, overwrite: bool) -> str | None:
    """What in a run's folder is not the run's and would be lost: anything, for --overwrite; else anything
    inside the run's own folders (adapter/, base/ and the rest), which training replaces whole, or in place of
    one of its names (a link there would send the run's writes to where it points)."""
    return next((o for o in _not_a_runs(out) if overwrite or "/" in o.rstrip("/")
                 or any(re.fullmatch(k, o.rstrip("/")) for k in LAYOUT)), None)


def _has_progress(out: Path) -> bool:
    return bool(steps_done(out)) or RunFolder(out).metrics.exists()


def _busy(out: Path) -> BailongError:
    return BailongError(f"{out}: another process is training in this folder; wait for it, or choose another --out")


def read_run(out: Path) -> dict | None:
    """The run recorded in ``out/run.json``, or None when there is none or it is not ours."""
    if not RunFolder(out).run_json.is_file():
        return None
    try:
        run = read_json(RunFolder(out).run_json)
    except BailongError:
        return None
    if isinstance(run.get("options"), dict) and "steps" in run:
        return run
    if {"stage", "lora_r", "seq_len", "data"} <= set(run):  # written by an earlier version: options alone
        return {"options": {k: v for k, v in run.items() if k not in NOT_IDENTITY}, "steps": run.get("steps")}
    return None


def _differences(before: dict, now: dict) -> str:
    """The options that differ, as a message; an option the run did not record (an older run) is not compared, nor
    a --precision the run began with auto (the device's: it may go on naming one, which it then records)."""
    names = [k for k in sorted(set(before) & set(now))
             if before[k] != now[k] and not (k == "precision" and before[k] == "auto")]
    return "; ".join(f"it was trained by {before[k]} process(es), now {now[k]}" if k == "processes" else
                     f"--{k.replace('_', '-')} was {before[k]!r}, now {now[k]!r}" for k in names[:3])


def _lock_free(out: Path) -> bool:
    """Whether no other process holds ``out/.lock`` (checked without taking it)."""
    lock = RunFolder(out).lock
    if not lock.exists():
        return True
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: probes at once (torchrun's) never clash
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return True


def check_output(config, world=1, locked=False) -> int:
    """Refuse, with one line, an ``--out`` this run may not use; nothing is read or written.

    The folder must be new or empty, or hold this same run (continued with --resume),
    or hold nothing but a run that ``--overwrite`` may replace; it may not hold, or lie
    inside, any of the run's inputs, nor be in use by another process (unless this one
    holds its lock: ``locked``). Returns the steps the run in it has done (0 for a new
    folder).
    """
    out = Path(config.out)
    own_base = config.resume and RunFolder(out).has_base() and steps_done(out)  # resumed whatever became of --init
    if config.stage == "sft" and not own_base and not Path(config.init).expanduser().is_dir():
        if Path(config.init).expanduser().exists():
            raise UsageError(f"{config.init}: is not a folder; --init names a pre-training run or a model folder")
        raise UsageError(f"{config.init}: no such folder (run python train.py --stage pretrain first, "
                         "or pass --init)")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"{out}: is a link to nothing; --out names the folder for the run")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file; --out names the folder for the run")
    if file := next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None):
        raise UsageError(f"{out}: lies inside {file}, a file; --out names the folder for the run")
    for what, path in inputs(config).items():
        if overlaps(out, path):
            raise UsageError(f"{out}: holds or lies inside {what}; choose an --out apart from the run's inputs")
    check_writable(out / "run.json")  # into the folder where it exists, else where it will be made: now, not after
    if not out.is_dir():  # the data are read, the vocabulary learned and the model loaded
        return 0
    if not locked and not _lock_free(out):
        raise _busy(out)
    run = read_run(out)
    if run is None:
        if not _not_a_runs(out, BEFORE_RUN_JSON, LAYOUT):  # (a run.json whose write was killed)
            return 0  # empty, or what a run stopped before its run.json left
        listed = ", ".join(_not_a_runs(out)[:3] + ["a run.json that is not ours"] * RunFolder(out).run_json.exists())
        raise UsageError(f"{out}: holds files that are not a training run ({listed or 'a run without its run.json'})"
                         "; choose another --out")
    done = steps_done(out)
    if other := _in_the_way(out, config.overwrite):
        raise UsageError(f"{out}: holds {other}, which is not part of a run; nothing was removed (move it away, "
                         "or choose another --out)" if config.overwrite else
                         f"{out}: holds {other}, which is not part of a run and training would remove it (move it "
                         "away, or choose another --out)")
    if not config.overwrite and _has_progress(out):
        if differences := _differences(run["options"], options(config, world)):
            raise UsageError(f"{out}: holds a different run ({differences}); choose another --out")
        if config.stage == "pretrain" and "data" in run.get("inputs", {}) and \
                (began := run["inputs"].get("documents", "text, eos")) != DOCUMENTS:
            raise UsageError(f"{out}: the run was started by an earlier Bailong, which tokenized its documents "
                             f"otherwise ({began}; now {DOCUMENTS}): it cannot go on with other examples; choose "
                             "another --out")
        if not config.resume:
            raise UsageError(f"{out}: already holds this run ({done} of {run.get('steps')} steps done); "
                             "pass --resume to continue it, or choose another --out")
        if done >= config.steps:
            raise UsageError(f"{out}: the run has done {done} steps; pass --steps above {done} to continue it")
    return done


def fingerprints(config, items, base_folder=None, tokenizer=None) -> dict:
    """What the run's inputs hold, so that they are known wherever they move: the data's text, the base model's
    config, tokenizer and weight files (names and sizes: gigabytes that never change in place), the special
    tokens its tokenizer puts around a document (a tokenizer.json's come from its settings files); for
    pre-training, how the documents are tokenized."""
    data = hashlib.sha256()
    for item in items:  # item by item: a large corpus is not copied into one string
        data.update(json.dumps(item, ensure_ascii=False).encode() + b"\0")
    found = {"data": data.hexdigest()[:16], "reading": READING}
    if config.stage == "pretrain":
        found["documents"] = DOCUMENTS
    if base_folder is not None:
        folder = Path(base_folder)
        parts = [(folder / name).read_bytes() for name in ("config.json", "tokenizer.model", "tokenizer.json")
                 if (folder / name).is_file()]
        parts += [f"{f.name}:{f.stat().st_size}".encode() for f in sorted(folder.glob("*.safetensors"))]
        found["model"] = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    if tokenizer is not None:  # apart from "model": earlier runs lack it
        found["specials"] = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.adds_bos]
    return found


_HELD = {}  # the locks of the run folders this process trains in (by path), until release_lock


def _take_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    lock = open(RunFolder(out).lock, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise _busy(out) from None
    _HELD[out.resolve()] = lock


def release_lock(out):
    """Let the folder go when its training ends (train.main's return, or its error): another process, or
    this one (a notebook calling train.main again), may then train in it."""
    lock = _HELD.pop(Path(out).resolve(), None)
    if lock is not None:
        lock.close()  # closing the file releases its flock


def seen(out: Path) -> tuple:
    """What a run training in ``out`` changes: the steps done, and run.json's, metrics.jsonl's and LATEST's times
    and sizes; taken when ``check_output`` looks, compared once the lock is held (``prepare_output``)."""
    folder = RunFolder(out)
    return (steps_done(out), *((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None
                               for f in (folder.run_json, folder.metrics, folder.latest)))


def prepare_output(config, found: dict, say=print, world=1, before=(0, None, None, None)) -> Path:
    """The write side of ``check_output``, once the inputs are read: take the folder's lock, and check it again
    (another process may have trained in it while this one loaded: it was as ``before`` says, ``seen`` then);
    the run in ``--out`` must have the same data and base (by ``fingerprints``). Then only the token cache is
    written (``token_cache.tokenize``) before ``start_run``."""
    out = Path(config.out)
    try:
        _take_lock(out)
    except OSError as e:
        raise write_failed(RunFolder(out).lock if out.is_dir() else out, e) from None
    now = check_output(config, world, locked=True)
    if seen(out) != before:
        raise BailongError(f"{out}: another process trained in this folder while this one was loading ({now} "
                           f"steps done now, {before[0]} before); run the command again")
    for path in finish_replacing(out):  # no process writes here but this one, now
        say(f"{path}: put in place (a stopped process had left it under a temporary name)")
    if leftovers := _leftovers(out):
        say(f"removing what a stopped process left unfinished in {out}: "
            + ", ".join(str(p.relative_to(out)) + "/" * p.is_dir() for p in leftovers))
        for p in leftovers:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    run = read_run(out)
    if run is not None and not config.overwrite and _has_progress(out):
        recorded = run.get("inputs", {})
        if "data" in recorded and "reading" not in recorded:  # begun by an earlier version: as it began, or not
            if recorded["data"] != found["data"]:
                raise UsageError(f"{out}: the data differ from those the run started with, or the earlier Bailong "
                                 f"that started it read them otherwise (now: {READING}); choose another --out")
            del found["reading"]
        changed = [k for k in ("data", "model", "specials") if k in recorded and recorded[k] != found.get(k)]
        if changed:
            what = {"data": "the data", "model": "the base model", "specials": "the tokenizer's bos and eos"}
            raise UsageError(f"{out}: {' and '.join(what[k] for k in changed)} differ from those the run started "
                             "with; choose another --out")
        if run.get("steps") not in (None, config.steps):
            change = "stretches" if config.steps > run["steps"] else "shrinks"
            say(f"continuing to step {config.steps} (the run was started for {run['steps']}): the learning-rate "
                f"schedule {change} to the new length from here")
    return out


def trained_vocabulary(out: Path):
    """The tokenizer the run's checkpoints were trained with (the newest readable one's), which a resumed run goes
    on with: the same text may teach another version other pieces. None where they keep none."""
    from bailong.tokenizer import open_tokenizer
    for checkpoint in reversed(RunFolder(out).saved()):
        with contextlib.suppress(BailongError):  # a damaged checkpoint: resuming passes over it, and says so
            return open_tokenizer(RunFolder(checkpoint).result)
    return None


def start_run(config, found: dict, world=1, say=print, cached=()):
    """Once the data make examples (so that a mistake in them leaves an old run whole): remove the run
    --overwrite replaces, saying what goes, but not the token arrays this run reads (``cached``, names in
    cache/); write run.json."""
    out, folder = Path(config.out), RunFolder(config.out)
    if read_run(out) is not None:
        if other := _in_the_way(out, config.overwrite):  # added since check_output
            raise UsageError(f"{out}: holds {other}, which is not part of a run; nothing was removed")
        if config.overwrite:
            stale = [p for p in folder.cache.iterdir() if p.name not in cached] if folder.cache.is_dir() else []
            gone = [p for p in out.iterdir() if p not in (folder.lock, folder.cache)] + stale  # others wait on the lock
            names = sorted(str(p.relative_to(out)) + "/" * p.is_dir() for p in gone)
            say(f"--overwrite: removing the run in {out} ({steps_done(out)} steps done): {', '.join(names)}")
            for p in gone:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    paths = {"model": config.model, "init": config.init, "data": config.data}
    run = {"options": options(config, world), "inputs": found, "paths": paths, "steps": config.steps,
           "folder": str(out.resolve())}
    atomic_write(folder.run_json, json.dumps(run, indent=2, ensure_ascii=False) + "\n")


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint LATEST names (it may since have gone), or None."""
    run = RunFolder(out)
    name = run.latest.read_text().strip() if run.latest.is_file() else ""
    return run.checkpoints / name if re.fullmatch(CHECKPOINT, name) else None


def steps_done(out: Path) -> int:
    """The step of the newest checkpoint (0 without one), read from its name."""
    saved = RunFolder(out).saved()
    return int(saved[-1].name[5:]) if saved else 0
