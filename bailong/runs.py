"""Whether a run may use a folder, and how a run is recognised (the folder's layout and lock: run_folder.py).

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
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from bailong.errors import BailongError, UsageError
from bailong.files import atomic_write, check_writable, overlaps, write_failed
from bailong.run_folder import (BEFORE_RUN_JSON, LAYOUT, RunFolder, busy, can_lock, in_the_way, lock_free, not_a_runs,
                                run_record, steps_done, take_lock, tidy)


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
           "answer within --seq-len left out; suffixes in any case, a byte-order mark at any line's start dropped")


def options(config, world=1) -> dict:
    """The options that make two runs the same run (the number of processes decides each one's examples; the
    vocabulary's options, only pre-training's, and the new pieces' settings only where it adds some)."""
    from bailong.training import NEW_PIECES, PRETRAIN_ONLY
    vocabulary = PRETRAIN_ONLY if config.stage == "sft" else () if config.new_pieces else NEW_PIECES
    ignored = NOT_IDENTITY | set(vocabulary)
    return {**{k: v for k, v in asdict(config).items() if k not in ignored}, "processes": world}


def inputs(config) -> dict:
    """The run's local inputs, by what they are."""
    found = {f"the data {d}": d for d in config.data}
    found.update({"the base model": config.model, "the model to fine-tune (--init)": config.init})
    found = {what: Path(os.path.expanduser(path)) for what, path in found.items() if path}  # "~/zh" quoted, or in
    # a config file ("~nobody/x", a user there is not, as written)
    return {what: path for what, path in found.items() if path.exists()}


def _has_progress(out: Path) -> bool:
    return bool(steps_done(out)) or RunFolder(out).metrics.exists()


def read_run(out: Path) -> dict | None:
    """The run recorded in ``out/run.json``, or None when there is none or it is not ours."""
    run = run_record(out)
    if run is None or isinstance(run.get("options"), dict):
        return run
    # written by an earlier version: options alone
    return {"options": {k: v for k, v in run.items() if k not in NOT_IDENTITY}, "steps": run.get("steps")}


def _differences(before: dict, now: dict) -> str:
    """The options that differ, as a message; an option the run did not record (an older run) is not compared, nor
    a --precision the run began with auto (the device's: it may go on naming one, which it then records)."""
    names = [k for k in sorted(set(before) & set(now))
             if before[k] != now[k] and not (k == "precision" and before[k] == "auto")]
    return "; ".join(f"it was trained by {before[k]} process(es), now {now[k]}" if k == "processes" else
                     f"--{k.replace('_', '-')} was {before[k]!r}, now {now[k]!r}" for k in names[:3])


def check_output(config, world=1, locked=False) -> int:
    """Refuse, with one line, an ``--out`` this run may not use; nothing is read or written.

    The folder must be new or empty, or hold this same run (continued with --resume),
    or hold nothing but a run that ``--overwrite`` may replace; it may not hold, or lie
    inside, any of the run's inputs, nor be in use by another process (unless this one
    holds its lock: ``locked``). Returns the steps the run in it has done (0 for a new
    folder).
    """
    can_lock()
    out = Path(config.out)
    own_base = config.resume and RunFolder(out).has_base() and steps_done(out)  # resumed whatever became of --init
    if config.stage == "sft" and not own_base and not Path(config.init).expanduser().is_dir():
        if Path(config.init).expanduser().exists():
            raise UsageError(f"{config.init}: is not a folder; --init names a pre-training run or a model folder")
        raise UsageError(f"{config.init}: no such folder (run python train.py --stage pretrain first, "
                         "or pass --init)")
    if config.stage == "sft" and not own_base and not lock_free(Path(config.init).expanduser()):
        raise BailongError(f"{config.init}: another process is still training it, and the adapter it holds is "
                           "not yet its last; wait for it to end, or export this one (python -m bailong.export) and "
                           "--init that")
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
    if not locked and not lock_free(out):
        raise busy(out)
    run = read_run(out)
    if run is None:
        if not not_a_runs(out, BEFORE_RUN_JSON, LAYOUT):  # (a run.json whose write was killed)
            return 0  # empty, or what a run stopped before its run.json left
        listed = ", ".join(not_a_runs(out)[:3] + ["a run.json that is not ours"] * RunFolder(out).run_json.exists())
        raise UsageError(f"{out}: holds files that are not a training run ({listed or 'a run without its run.json'})"
                         "; choose another --out")
    done = steps_done(out)
    if other := in_the_way(out, config.overwrite):
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
        take_lock(out)
    except OSError as e:
        raise write_failed(RunFolder(out).lock if out.is_dir() else out, e) from None
    now = check_output(config, world, locked=True)
    if seen(out) != before:
        raise BailongError(f"{out}: another process trained in this folder while this one was loading ({now} "
                           f"steps done now, {before[0]} before); run the command again")
    tidy(out, say)
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
            then = recorded.get("reading", READING)  # an earlier version may have read the same files otherwise
            why = f", or the earlier Bailong that started it read them otherwise (then: {then}; now: {READING})" \
                if "data" in changed and then != READING else ""
            raise UsageError(f"{out}: {' and '.join(what[k] for k in changed)} differ from those the run started "
                             f"with{why}; choose another --out")
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
            if (tokenizer := open_tokenizer(RunFolder(checkpoint).result)) is not None:  # else its tokenizer is
                return tokenizer  # gone (deleted): the one before's is the run's too
    return None


def start_run(config, found: dict, world=1, say=print, cached=()):
    """Once the data make examples (so that a mistake in them leaves an old run whole): remove the run
    --overwrite replaces, saying what goes, but not the token arrays this run reads (``cached``, names in
    cache/); write run.json."""
    out, folder = Path(config.out), RunFolder(config.out)
    if read_run(out) is not None:
        if other := in_the_way(out, config.overwrite):  # added since check_output
            raise UsageError(f"{out}: holds {other}, which is not part of a run; nothing was removed")
        if config.overwrite:
            stale = [p for p in folder.cache.iterdir() if p.name not in cached] if folder.cache.is_dir() else []
            gone = [p for p in out.iterdir() if p not in (folder.lock, folder.cache)] + stale  # others wait on the lock
            names = sorted(str(p.relative_to(out)) + "/" * p.is_dir() for p in gone)
            say(f"--overwrite: removing the run in {out} ({steps_done(out)} steps done): {', '.join(names)}")
            for p in sorted(gone, key=lambda p: p == folder.run_json):  # run.json last: a run until all is gone
                try:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                except OSError as e:  # (rmtree names a file inside by its name alone)
                    raise BailongError(f"{p}: could not be removed ({e.strerror or e}); the run in {out} is "
                                       "removed in part (run.json kept): mend that and run again") from None
    paths = {"model": config.model, "init": config.init, "data": config.data}
    run = {"options": options(config, world), "inputs": found, "paths": paths, "steps": config.steps,
           "folder": str(out.resolve())}
    atomic_write(folder.run_json, json.dumps(run, indent=2, ensure_ascii=False) + "\n")
