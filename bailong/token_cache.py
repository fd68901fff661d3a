"""The token cache: documents or conversations tokenized (in parallel where there are many), their ids (and
SFT's labels) concatenated into int32 arrays with their offsets, saved as .npy files keyed by the tokenizer and
the text, and memory-mapped on the next run."""
import contextlib
import hashlib
import json
import signal
import sys
import threading
import warnings
from array import array
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bailong.chat_template import template_example, training_example
from bailong.cores import usable_cores
from bailong.errors import BailongError, BailongWarning, handling, in_a_command, silence
from bailong.files import atomic_write, remove_left_behind
from bailong.progress import BAR_HIDDEN
from bailong.runs import DOCUMENTS
from bailong.tokenizer import Tokenizer

_worker_tokenizer = _worker_template = None


def _init_worker(tokenizer, template):
    global _worker_tokenizer, _worker_template
    _worker_tokenizer, _worker_template = tokenizer, template


def _pool_worker(tokenizer, template, command):
    """A tokenizing process: the pool's end (SIGTERM) ends it at once and quietly, and so does Ctrl-C, which a
    terminal sends to every process, where it ends the ``command`` too (``_stopped_at_once``); a worker that
    went on would print its broken pipe to the parent. Called from Python, Ctrl-C is the caller's to answer: the
    worker lets it pass, and ends with the pool. What it meets reaches the parent as an exception: its own output
    goes nowhere, so that a parent killed alone (``kill PID``) does not leave its workers' broken pipes to print."""
    signal.signal(signal.SIGINT, signal.SIG_DFL if command else signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    silence(sys.__stderr__)
    _init_worker(tokenizer, template)


def _stopped_at_once(command):
    """While a pool tokenizes for a ``command``, Ctrl-C and SIGTERM end the process at once, as by default: a
    pool shut down by an exception can wait forever on a worker stopped mid-send, and a handler of Python's runs
    too late (the pool's threads start workers in place of those the signal ended, which wait forever on the
    locks those held). The temporary files of the tokens being written are left; the next tokenizing into that
    folder removes them. Called from Python (a notebook), the process is the caller's: Ctrl-C raises
    KeyboardInterrupt there, the workers, which let it pass (``_pool_worker``), ended with the pool."""
    return handling(signal.SIG_DFL) if command else contextlib.nullcontext()


def _encode(item):
    """An item's ids and labels (None for a document) as int32 arrays: 4 bytes a token, where a list of Python
    ints holds about 40 (a pool's results wait in the parent until they are written)."""
    ids, labels = _encode_lists(item)
    return np.asarray(ids, dtype=np.int32), None if labels is None else np.asarray(labels, dtype=np.int32)


def _encode_lists(item):
    if isinstance(item, str):  # a document: bos (where a prompt begins with one), its tokens, eos
        return _worker_tokenizer.encode(item, bos=_worker_tokenizer.adds_bos, eos=True), None
    if _worker_template is None:
        return training_example(_worker_tokenizer, item)
    try:
        return template_example(_worker_tokenizer, _worker_template, item)
    except Exception as e:  # jinja2's errors, ours (ValueError), and any a template's Python raises
        first = next(m["content"] for m in item if m["role"] == "user")[:40]  # which one, to search the data for
        raise BailongError(f"the model's chat_template fails on the conversation whose first question begins "
                           f"{first!r} ({type(e).__name__}: {e})") from None


def tokenize(tokenizer: Tokenizer, items, cache_dir, workers=0, template=None):
    """Token ids (and SFT labels) of every item, concatenated, with offsets: cached, memory-mapped.
    Conversations take the model's Jinja chat ``template`` (see chat_template.model_template), or
    Llama 2's format when it is None.

    Returns (ids, labels or None, offsets) where item i is ids[offsets[i]:offsets[i+1]].
    """
    parts = [DOCUMENTS, template, items]
    if hasattr(tokenizer, "settings"):  # a tokenizer.json's bos and eos come from its settings files; special
        # tokens written in its text are text (since this was added: they were their ids)
        parts.append([tokenizer.bos_id, tokenizer.eos_id, tokenizer.adds_bos, "special tokens in text are text"])
    if template is not None:  # a conversation in it is encoded whole (template_example, since this was added),
        parts.append(["encoded whole", getattr(tokenizer, "legacy", None)])  # a tokenizer.model's as legacy says
    sft = not isinstance(items[0], str)
    if sft and any("weight" in m for item in items for m in item):  # (since answers of weight 0 are not
        parts.append(["weight 0 not learned"])  # learned: a cache of before learned them)
    stem = Path(cache_dir) / f"tokens-{_cache_key(tokenizer, parts)}"
    files = [stem.with_suffix(f".{part}.npy") for part in ("ids", "labels", "offsets")]
    read = files if sft else files[::2]
    if (cached := _cached(read, len(items))) is None:
        remove_left_behind(cache_dir, "tokens-")  # (by a command stopped while it tokenized: _stopped_at_once)
        offsets = _write_tokens(read[:-1], tokenizer, items, workers, template)
        atomic_write(files[2], lambda tmp: _save_npy(tmp, np.frombuffer(offsets, dtype=np.int64)))
        cached = [np.load(f, mmap_mode="r") for f in read]
    return (cached[0], cached[1], cached[2]) if sft else (cached[0], None, cached[1])


def cache_files(tokens) -> list[str]:
    """The names of the files in its cache folder that ``tokenize``'s result ``tokens`` reads."""
    return [Path(a.filename).name for a in tokens if a is not None]


def opened(cache_dir, files: list[str], items: int):
    """``tokenize``'s result for ``items`` items from the ``files`` it cached (``cache_files``), without the
    items: as torchrun's other processes take rank 0's. None where one is missing, or damaged (it says so)."""
    arrays = _cached([Path(cache_dir) / name for name in files], items)
    return None if arrays is None else (arrays[0], arrays[1] if len(arrays) == 3 else None, arrays[-1])


def _cache_key(tokenizer, parts) -> str:
    """A token cache's name: the hash of the tokenizer and of ``json.dumps(parts)`` (the items the third part),
    hashed item by item, as that string would be, not made: it would copy the corpus three times over."""
    digest = hashlib.sha256(tokenizer.serialized())
    dump = partial(json.dumps, ensure_ascii=False)
    digest.update(f"[{dump(parts[0])}, {dump(parts[1])}, [".encode())
    for i, item in enumerate(parts[2]):
        digest.update((", " * bool(i) + dump(item)).encode())
    digest.update(("]" + "".join(f", {dump(part)}" for part in parts[3:]) + "]").encode())
    return digest.hexdigest()[:20]


def _cached(files, items: int) -> list | None:
    """The memory-mapped arrays of a token cache (ids, SFT's labels, offsets) of ``items`` items, or None where
    one is missing, or damaged (a disk that filled, a copy cut short): that one says so, and is made again."""
    if not all(f.exists() for f in files):
        return None
    try:
        arrays = [np.load(f, mmap_mode="r") for f in files]
        ids, offsets = arrays[0], arrays[-1]
        whole = all(a.ndim == 1 and a.dtype.kind == "i" for a in arrays) and len(offsets) == items + 1 and \
            offsets[0] == 0 and offsets[-1] == len(ids) and all(len(a) == len(ids) for a in arrays[1:-1])
        if whole:
            return arrays
        why = "its arrays do not fit together"
    except (ValueError, EOFError):  # numpy's for a file cut short, or not an array (its words on pickles mislead)
        why = "a file cut short, or not an array"
    warnings.warn(f"{files[0].parent}: the token cache {files[0].name[:27]} is damaged ({why}); tokenizing "
                  "again", BailongWarning, stacklevel=3)
    return None


def _write_tokens(files, tokenizer, items, workers, template) -> array:
    """Each item's ids (and SFT's labels: ``files`` one for each) appended to its file as they are encoded,
    through temporary files renamed into place once whole; the items' offsets (int64). The corpus's tokens are
    never all in memory (they were, 4 bytes a token, until the cache was written: more than its text, for
    Chinese)."""
    offsets = array("q", [0])

    def write(tmps):
        with contextlib.ExitStack() as stack:
            outs = [stack.enter_context(open(tmp, "wb")) for tmp in tmps]
            for out in outs:
                out.write(_npy_header(np.int32, 0))  # (the length written again once known)
            encoded = stack.enter_context(contextlib.closing(_encoded(tokenizer, items, workers, template)))
            refused = None  # a full disk's error, raised once the pool has ended (stopped by it, one can hang)
            for arrays in encoded:
                if refused is None:
                    try:
                        for out, tokens in zip(outs, arrays):
                            out.write(tokens.data)
                    except OSError as error:
                        refused = error
                offsets.append(offsets[-1] + len(arrays[0]))
            if refused is not None:
                raise refused
            for out in outs:
                out.seek(0)
                out.write(_npy_header(np.int32, offsets[-1]))

    if len(files) == 1:
        atomic_write(files[0], lambda tmp: write([tmp]))
    else:  # the labels' file written within the ids'
        atomic_write(files[0], lambda ids: atomic_write(files[1], lambda labels: write([ids, labels])))
    return offsets


def _encoded(tokenizer, items, workers, template):
    """(ids, labels) of each item (labels left out for a document), in parallel where there are many: one process
    per usable core unless ``workers`` says, and none without a thousand items to encode (each process loads the
    tokenizer first)."""
    workers = min(workers or usable_cores(), len(items) // 1000)
    with tqdm(total=len(items), desc="tokenizing", unit="doc", disable=BAR_HIDDEN) as bar:
        if workers > 1:
            command = in_a_command()
            pool = Pool(workers, initializer=_pool_worker, initargs=(tokenizer, template, command))
            try:
                with _stopped_at_once(command):
                    for ids, labels in pool.imap(_encode, items, chunksize=64):
                        bar.update()
                        yield (ids,) if labels is None else (ids, labels)
            finally:
                _stop(pool)
        else:
            _init_worker(tokenizer, template)
            for ids, labels in map(_encode, items):
                bar.update()
                yield (ids,) if labels is None else (ids, labels)


def _stop(pool):
    """``pool.terminate()``, which can wait forever after Ctrl-C from Python (its thread reading the results
    leaves first, while a worker holds the results' lock, its result half sent): given five seconds, in a thread
    of its own; then the workers are killed, and that thread left waiting."""
    stopping = threading.Thread(target=pool.terminate, daemon=True)
    stopping.start()
    stopping.join(5)
    if stopping.is_alive():
        for worker in pool._pool:  # (multiprocessing's own list of them)
            worker.kill()
            worker.join()


HEADER = 128  # bytes of a token file's .npy header, room for any length: it is written again once that is known


def _npy_header(dtype, length: int) -> bytes:
    """A .npy (format 1.0) header of a 1-D array of ``length`` values of ``dtype``, ``HEADER`` bytes long, as
    numpy writes it (the same bytes as numpy 2.4's, which leaves that room too)."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({length},), }}"
    return np.lib.format.magic(1, 0) + (HEADER - 10).to_bytes(2, "little") + \
        (text.ljust(HEADER - 11) + "\n").encode("latin1")


def _save_npy(path, values):
    """``values`` (an array) as a .npy file, written through a file, not a memory map, whose writes to a full disk
    kill the process (SIGBUS) with nothing said."""
    with open(path, "wb") as f:
        np.lib.format.write_array(f, values)
