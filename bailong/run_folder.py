"""A training run's folder: its layout, what in it is a run's, what a stopped process left unfinished, and the
lock of the process training in it (whether a run may use a folder, and how a run is recognised: runs.py;
checkpoints: checkpoints.py).

    out/run.json            what defines the run (options, fingerprints of its data and base), its length
    out/metrics.jsonl       one JSON object per step and per evaluation; loss.png plots them
    out/adapter/            the result: the adapter with the best held-out loss (the last one without held-out data)
    out/checkpoints/        step-N/ (adapter, optimizer and RNG states) for the last two saves; LATEST names the newest
    out/base/, out/cache/   a base that exists nowhere else (the embedded default, SFT's merged base); token arrays
    out/.lock               held by the process training in the folder

Nothing here imports torch, so that train.py checks --out before loading it.
"""
import os
import re
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the commands refuse to run there (run_cli), training called from Python (can_lock)
    fcntl = None

from bailong.errors import NOT_HERE, BailongError, read_json


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


def not_a_runs(folder: Path, layout=LAYOUT, written=None) -> list[str]:
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
            found += [name + q for q in not_a_runs(p, inner)]
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


def _finish_replacing(folder: Path) -> list[Path]:
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


def in_the_way(out: Path, overwrite: bool) -> str | None:
    """What in a run's folder is not the run's and would be lost: anything, for --overwrite; else anything
    inside the run's own folders (adapter/, base/ and the rest), which training replaces whole, or in place of
    one of its names (a link there would send the run's writes to where it points)."""
    return next((o for o in not_a_runs(out) if overwrite or "/" in o.rstrip("/")
                 or any(re.fullmatch(k, o.rstrip("/")) for k in LAYOUT)), None)


def run_record(out: Path) -> dict | None:
    """``out/run.json``'s content where it is a run's (options and steps; an earlier version's: options alone),
    else None (none, unreadable, or another tool's)."""
    try:
        run = read_json(RunFolder(out).run_json) if RunFolder(out).run_json.is_file() else None
    except BailongError:
        return None
    if isinstance(run, dict) and (isinstance(run.get("options"), dict) and "steps" in run
                                  or {"stage", "lora_r", "seq_len", "data"} <= set(run)):
        return run
    return None


def runs_own(path) -> Path | None:
    """The training run folder whose own names (adapter/, checkpoints/, metrics.jsonl...) ``path`` lies in or
    takes, or None: training replaces them whole, and a file another command saved there would be lost. On a
    case-insensitive disk (macOS's), the names in any case: there ``Adapter/`` is ``adapter/``."""
    path = Path(path).expanduser().absolute()
    path = path.resolve() if path.is_symlink() else path.parent.resolve() / path.name  # (it may not be there yet)
    for run in path.parents:
        case = re.IGNORECASE if (run / "RUN.JSON").exists() else 0  # (a run's run.json, where case is not told)
        if any(re.fullmatch(k, path.relative_to(run).parts[0], case) for k in LAYOUT) and run_record(run) is not None:
            return run
    return None


def tidy(out: Path, say=print):
    """Finish, or remove, what a stopped process left unfinished in the run's folder (only once its lock is held:
    no process writes there but this one)."""
    for path in _finish_replacing(out):
        say(f"{path}: put in place (a stopped process had left it under a temporary name)")
    if leftovers := _leftovers(out):
        say(f"removing what a stopped process left unfinished in {out}: "
            + ", ".join(str(p.relative_to(out)) + "/" * p.is_dir() for p in leftovers))
        for p in leftovers:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def busy(out: Path) -> BailongError:
    return BailongError(f"{out}: another process is training in this folder; wait for it, or choose another --out")


def lock_free(out: Path) -> bool:
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


_HELD = {}  # the locks of the run folders this process trains in (by path), until release_lock


def _forget_locks():
    """In a process forked from one that trains (a tokenizing worker), its copies of the locks closed, not let go:
    the lock is the parent's, and a worker living on a moment after its stopped parent (its chunk of documents
    to finish) kept the folder locked, a run started then refused as "another process is training" there."""
    for lock in _HELD.values():
        lock.close()
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # (not on Windows)
    os.register_at_fork(after_in_child=_forget_locks)


def can_lock():
    """Training locks its folder (``take_lock``), which native Windows cannot: said before anything is read."""
    if fcntl is None:
        raise BailongError(NOT_HERE)


def take_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    lock = open(RunFolder(out).lock, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise busy(out) from None
    _HELD[out.resolve()] = lock


def release_lock(out):
    """Let the folder go when its training ends (train.main's return, or its error): another process, or
    this one (a notebook calling train.main again), may then train in it."""
    lock = _HELD.pop(Path(out).resolve(), None)
    if lock is not None:
        lock.close()  # closing the file releases its flock


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint LATEST names (it may since have gone), or None."""
    run = RunFolder(out)
    name = run.latest.read_text().strip() if run.latest.is_file() else ""
    return run.checkpoints / name if re.fullmatch(CHECKPOINT, name) else None


def steps_done(out: Path) -> int:
    """The step of the newest checkpoint (0 without one), read from its name."""
    saved = RunFolder(out).saved()
    return int(saved[-1].name[5:]) if saved else 0
