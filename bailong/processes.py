"""torchrun's processes: its variables checked before torch loads, and the work rank 0 does alone (the
vocabulary, the run folder's check, the token cache) while the others wait for it; the memory a process
freed, given back to the system; and training called from Python, which leaves the caller's process as it was.

A barrier would hold the others for that work, but a barrier is a collective: it fails at the process group's
timeout (NCCL's is ten minutes), where tokenizing a large corpus takes longer, and inside it a process answers
neither Ctrl-C nor SIGTERM. They wait instead on a key of the store torchrun's processes share, asked every half
second.
"""
import ctypes
import json
import os
import random
import sys
import time
import warnings

from bailong.errors import BailongWarning, UsageError, in_a_command
from bailong.training import check_graph_step

PART = 4 << 20  # bytes of a value sent to the store at a time


def check_processes(config) -> tuple[int, int]:
    """(WORLD_SIZE, RANK), as torchrun sets them, refused where they cannot be (a leftover RANK alone trained
    without a word and kept nothing: only rank 0 writes; a word or 0 ended in a traceback), and the options that
    only one process can have; before torch loads."""
    found = [os.environ.get(name, default) for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"))]
    if not all(v.isdecimal() and v.isascii() for v in found) or not int(found[1]) < int(found[0]):
        said = [f"{name} is {os.environ[name]!r}" if name in os.environ else f"{name} is unset"
                for name in ("WORLD_SIZE", "RANK")]
        raise UsageError(f"{' and '.join(said)}: torchrun sets both (RANK from 0 to WORLD_SIZE - 1); unset them to "
                         "train in one process")
    world, rank = int(found[0]), int(found[1])
    if config.cuda_graph:
        check_graph_step(world)
    if config.bf16_grads and world > 1:
        raise UsageError("--bf16-grads keeps one process's gradients, where DDP averages float32 ones between "
                         "processes: leave it out with torchrun")
    if config.offload_embedding and world > 1:
        raise UsageError("--offload-embedding keeps a table in host memory, where DDP wants every parameter on the "
                         "GPU: leave it out with torchrun")
    if world > 1 and not all(os.environ.get(n) for n in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise UsageError(f"WORLD_SIZE is {world}, but RANK, MASTER_ADDR or MASTER_PORT is not set: start several "
                         "processes with torchrun --nproc-per-node N train.py ..., or unset WORLD_SIZE")
    return world, rank


def rank_0_done(name: str, world: int, rank: int, value: bytes = b"done") -> bytes:
    """After work that rank 0 did alone (``name``), what it made (``value``: rank 0's) in every process: rank 0
    gives it, and the others wait until it has, however long that takes; if rank 0 fails, torchrun stops them
    (and where it held the store, asking it fails)."""
    if world == 1:
        return value
    store, key = _store(name)
    if rank == 0:  # in parts: the store takes at most 8 MiB a message, and a tokenizer.json can be more
        parts = [value[i:i + PART] for i in range(0, len(value), PART)]
        for i, part in enumerate(parts):
            store.set(f"{key}/{i}", part)
        store.set(key, str(len(parts)))
    _wait(store, [key])
    return b"".join(store.get(f"{key}/{i}") for i in range(int(store.get(key))))


def all_here(name: str, world: int, rank: int):
    """Waits, as ``rank_0_done`` does, until every process has come this far (``name``): before DDP's first
    collective, which waits only the process group's timeout for a process still at work alone (tokenizing the
    corpus where its disk lacks rank 0's cache)."""
    if world > 1:
        store, key = _store(name)
        store.set(f"{key}/{rank}", "here")
        _wait(store, [f"{key}/{r}" for r in range(world)])


def same_steps_done(done: int, out, world: int, rank: int):
    """Refuses a process that finds another number of steps ``done`` in the run it resumes in ``out`` than rank
    0 (another machine's disk, not holding rank 0's run folder): it waited forever for what rank 0 never sent."""
    theirs = int(rank_0_done("the steps done", world, rank, str(done).encode()))
    if theirs != done:
        raise UsageError(f"{out}: rank 0 finds {theirs} steps done there, this process {done}: processes on "
                         "several machines need --out on a disk they share")


def _store(name: str):
    """(the store torchrun's processes share, the key of ``name`` in it for this start of the group)."""
    from datetime import timedelta

    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=5))  # to connect: the store is up, the group has started
    return store, f"bailong/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"  # a restarted group's own


def _wait(store, keys):
    while not store.check(keys):
        time.sleep(0.5)


def tokens_of_rank_0(tokens, cache_dir, world: int, rank: int) -> list | None:
    """Rank 0's ``tokenize`` results (``tokens``: a list, None for a part without items) in every process: the
    others open the files rank 0 cached, by name, and never read the text. None in a process whose disk does not
    hold them whole (another machine's), which tokenizes the text itself."""
    from bailong.token_cache import cache_files, opened
    sent = [None if t is None else [cache_files(t), len(t[-1]) - 1] for t in tokens] if rank == 0 else None
    sent = json.loads(rank_0_done("the token cache", world, rank, json.dumps(sent).encode()))
    if rank == 0:
        return tokens
    found = [None if part is None else opened(cache_dir, *part) for part in sent]
    return None if any(f is None for f, part in zip(found, sent) if part is not None) else found


def return_freed_memory():
    """The memory the process freed, given back to the system: glibc keeps what is freed for the process's own
    later use, and train.py held it through the whole run (after SentencePiece's trainer, which takes about 24
    bytes a byte of its text, learning from 10 million characters: ~1.5 GB resident during training, where 0.6 GB
    without it; and the corpus's text, once tokenized). Giving it back takes about a tenth of the learning's time
    (1.5 s of 13 there)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (AttributeError, OSError):  # a C library without it (musl's), a Python that loads none
            pass


def called(train, *args) -> int:
    """``train(*args)``'s exit status, as a command runs it. Called from Python (a notebook), in the caller's
    process: a run interrupted, once saved, raises KeyboardInterrupt (a notebook running every cell stops there,
    as at any cell interrupted, where a status of 130 let the next cells go on with a half-trained run); the
    caller's random states are after as they were before (Python's, and numpy's and torch's where loaded: a run
    seeds them, a resumed one sets its checkpoint's); and the run's warnings are said each time, as a command says
    them (Python's default says one once a place: a second run's damaged token cache went unsaid), the caller's
    own filters first."""
    if in_a_command():
        return train(*args)
    states = [(random.setstate, random.getstate())]
    if numpy := sys.modules.get("numpy"):
        states.append((numpy.random.set_state, numpy.random.get_state()))
    if torch := sys.modules.get("torch"):
        states.append((torch.set_rng_state, torch.get_rng_state()))
        if torch.cuda.is_initialized():
            states.append((torch.cuda.set_rng_state_all, torch.cuda.get_rng_state_all()))
        else:  # begun by the run, if at all: as the caller's seed would have begun it (torch seeds CUDA lazily)
            states.append((torch.cuda.manual_seed_all, torch.initial_seed()))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("always", category=BailongWarning, append=True)
            code = train(*args)
    finally:
        for put_back, state in states:
            put_back(state)
    if code == 130:
        raise KeyboardInterrupt
    return code
