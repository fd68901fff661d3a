"""Checkpoints of a training run: the adapter, optimizer and random states in checkpoints/step-N, and resuming
from the newest one that reads whole (the folder's layout is ``run_folder.RunFolder``'s)."""
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from bailong.adapter import load_adapter, save_adapter, trained_base
from bailong.errors import BailongError
from bailong.files import atomic_folder, atomic_write
from bailong.run_folder import STATE, RunFolder, latest_checkpoint


def rng_state(device=None) -> dict:
    """The state of every random generator a process trains with, the training ``device``'s where it is a GPU,
    in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_states(device=None, world=1):
    """``rng_state`` of this process, or, under torchrun, of every process of the run by rank (each draws its own
    dropout masks): gathered to each, so that every process calls it."""
    if world == 1:
        return rng_state(device)
    import torch.distributed as dist
    states = [None] * world
    dist.all_gather_object(states, rng_state(device))
    return states


def set_rng_state(state, device=None, rank=0):
    """Restore ``rng_state`` (or this ``rank``'s of ``rng_states``), a GPU's on the training ``device``. A
    checkpoint of before kept rank 0's alone, for all (every process drew alike then)."""
    if isinstance(state, list):
        state = state[rank if rank < len(state) else 0]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    cuda = state.get("cuda")
    if cuda is not None and device is not None and torch.device(device).type == "cuda":
        if isinstance(cuda, list):  # saved before: every visible GPU's, the saving process's at its index
            index = torch.device(device).index or 0
            cuda = cuda[index if index < len(cuda) else 0]
        torch.cuda.set_rng_state(cuda, device)


def save_result(folder: Path, model, lora_config, tokenizer, base_name=None):
    """An adapter folder (PEFT format, the grown embedding rows, the tokenizer), replaced whole or not at all."""
    with atomic_folder(folder) as tmp:
        save_adapter(model, tmp, lora_config, base_name)
        tokenizer.save(tmp)
    return folder


def save_checkpoint(out: Path, step, model, lora_config, tokenizer, optimizer, base_name, rng):
    """checkpoints/step-N: the adapter, optimizer and RNG states (``rng``: ``rng_states``), written to a
    temporary folder and renamed, then named in LATEST; the two newest are kept. A failed save (a full disk)
    leaves the previous checkpoint as it was and says so."""
    run = RunFolder(out)
    final = run.checkpoint(step)
    try:
        with atomic_folder(final) as tmp:
            save_result(RunFolder(tmp).result, model, lora_config, tokenizer, base_name)
            with open(tmp / STATE, "wb") as f:  # (through Python's file: a refused write is an OSError, named)
                torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng}, f)
        atomic_write(run.latest, final.name)
    except BailongError as e:
        previous = latest_checkpoint(out)
        kept = f"{previous} is intact" if previous and previous.exists() else "no earlier checkpoint exists"
        raise BailongError(f"{e}; step {step} was not saved, {kept}") from None
    for old in run.saved()[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict:
    """The optimizer and RNG states of a checkpoint; a one-line error if unreadable."""
    try:
        # on the CPU first: a run trained on a GPU goes on on the CPU, or on another GPU (the optimizer's states
        # move to their parameters' device as they load)
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (EOFError, RuntimeError), not ours (UnpicklingError), or missing
        raise BailongError(f"{folder / STATE}: unreadable ({type(e).__name__})") from None
    if not (isinstance(state, dict) and {"step", "optimizer", "rng"} <= set(state) and type(state["step"]) is int
            and state["step"] >= 0 and isinstance(state["optimizer"], dict)
            and {"state", "param_groups"} <= set(state["optimizer"])):
        raise BailongError(f"{folder / STATE}: not a checkpoint's state (its step, optimizer and RNG states)")
    return state


def resume(out: Path, model, optimizer, say=print, device=None, rank=0, base=None) -> int:
    """Restore the newest checkpoint that reads whole: LoRA weights (through the adapter loader, into the
    model's LoRA modules), optimizer and RNG states (this ``rank``'s, a GPU's on the training ``device``).

    Returns the number of steps it had done (0 when there is no checkpoint). A newer
    checkpoint that is missing or damaged is passed over with a warning naming it; one trained on another base
    than ``base`` (the fingerprint of the base now, ``weights.fingerprint``) is refused.
    """
    run = RunFolder(out)
    named = latest_checkpoint(out)
    candidates = run.saved()[::-1]  # newest first (LATEST lags a crash by one)
    if named and not named.exists():
        candidates.insert(0, named)
    trained = next((t for c in candidates if (t := trained_base(RunFolder(c).result))), None)  # (all the same)
    if base and trained and trained != base:
        raise BailongError(f"{out}: its checkpoints were trained on another base than the one loaded now (its "
                           "weights changed since the run began, or another was named): resuming would go on "
                           "training them on other weights; restore the base, or start again with another --out")
    problems = []
    for candidate in dict.fromkeys(candidates):
        try:
            if not candidate.is_dir():
                raise BailongError(f"{candidate}: missing")
            state = read_state(candidate)
            load_adapter(model, RunFolder(candidate).result, complete=True)
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], device, rank)
        except BailongError as e:
            problems.append(str(e))
            continue
        except torch.OutOfMemoryError:  # the device's to mend, not the checkpoint's
            raise
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:  # states that do not fit
            reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e).strip() else type(e).__name__
            problems.append(f"{candidate / STATE}: does not fit this run ({reason})")
            continue
        if problems:
            say(f"warning: {'; '.join(problems)}; resuming from {candidate.name} instead")
        return state["step"]
    if problems:
        raise BailongError(f"{run.checkpoints}: no checkpoint can be read ({problems[0]}); start again with another "
                           "--out")
    return 0
