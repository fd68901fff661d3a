"""The token cache: documents and conversations tokenized (in parallel), cached under names that last,
memory-mapped, made again where damaged; the pool's workers under Ctrl-C and SIGTERM."""
import os
import subprocess
import sys

import pytest

from bailong.data import read_conversations, read_corpus
from bailong.errors import BailongError
from bailong.training import SAMPLES
from conftest import ROOT


def test_the_token_cache_is_named_as_before_without_a_copy_of_the_corpus():
    """The key was the hash of json.dumps of everything (the corpus copied three times over: 28 GB for 10 GB of
    text); hashed item by item it is the same, so that caches made before are found."""
    import hashlib
    import json

    from bailong.token_cache import DOCUMENTS, _cache_key
    from bailong.tokenizer import byte_tokenizer
    tokenizer = byte_tokenizer()
    chat = [{"role": "user", "content": "臺灣\u2028\"引\""}, {"role": "assistant", "content": "好"}]
    for parts in ([DOCUMENTS, None, ["a", "臺灣", "\t\"q\""]], [DOCUMENTS, None, []],
                  [DOCUMENTS, None, ["x"], [1, 2, True]],
                  [DOCUMENTS, "{{ x }}", [chat, chat], [1, 2, False], ["encoded whole", None]]):
        whole = json.dumps(parts, ensure_ascii=False).encode()
        assert _cache_key(tokenizer, parts) == hashlib.sha256(tokenizer.serialized() + whole).hexdigest()[:20]


def test_token_cache_is_reused(tmp_path):
    from bailong.token_cache import tokenize
    from bailong.tokenizer import byte_tokenizer
    docs = ["臺灣", "hello world"]
    ids, labels, offsets = tokenize(byte_tokenizer(), docs, tmp_path, 1)
    # bos + "▁" + 6 bytes + eos; bos + "▁hello▁world" + eos
    assert labels is None and ids.tolist()[-1] == 2 and offsets.tolist() == [0, 9, 23]
    again = tokenize(byte_tokenizer(), docs, tmp_path, 1)
    assert isinstance(again[0], __import__("numpy").memmap) and again[0].tolist() == ids.tolist()
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_a_damaged_token_cache_is_made_again(tmp_path):
    """A cache file cut short, or not an array, ended --resume in a traceback (mmap length, pickled data, no data
    left in file); arrays that do not fit together were read as they were. Each is warned about (a command shows
    the warning as a line: test_bad_input.py)."""
    import warnings

    import numpy as np

    from bailong.errors import BailongWarning
    from bailong.token_cache import tokenize
    from bailong.tokenizer import byte_tokenizer
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "臺灣"}]] * 3
    whole = [a.tolist() for a in tokenize(byte_tokenizer(), chats, tmp_path, 1)]
    for part, damage, why in [("ids", lambda f: f.write_bytes(f.read_bytes()[:140]), "cut short, or not an array"),
                              ("offsets", lambda f: f.write_bytes(b"garbage"), "cut short, or not an array"),
                              ("labels", lambda f: f.write_bytes(b""), "cut short, or not an array"),
                              ("offsets", lambda f: np.save(f, np.array([0, 5])), "do not fit together"),
                              ("labels", lambda f: np.save(f, np.zeros(4, np.int32)), "do not fit together")]:
        damage(next(tmp_path.glob(f"*.{part}.npy")))
        with pytest.warns(BailongWarning, match=f"^{tmp_path}: the token cache tokens-.*{why}.*tokenizing again$"):
            assert [a.tolist() for a in tokenize(byte_tokenizer(), chats, tmp_path, 1)] == whole
        with warnings.catch_warnings():
            warnings.simplefilter("error", BailongWarning)
            assert [a.tolist() for a in tokenize(byte_tokenizer(), chats, tmp_path, 1)] == whole


def test_a_command_killed_alone_while_its_workers_tokenize_ends_quietly(tmp_path):
    """``kill PID`` (SIGTERM to the command alone, not to its process group as a terminal's Ctrl-C) left the
    tokenizing workers to meet their broken pipes and print about sixty lines of tracebacks."""
    import signal
    import time
    from pathlib import Path
    script = ("import sys\nfrom bailong.token_cache import tokenize\nfrom bailong.errors import run_cli\n"
              "from bailong.tokenizer import byte_tokenizer\n"
              "docs = [f'第 {i} 行 line {i} ' * 20 for i in range(200000)]\nprint('tokenizing', flush=True)\n"
              "run_cli(lambda argv: tokenize(byte_tokenizer(), docs, sys.argv[1], workers=2), [])\n")
    command = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cache")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert command.stdout.readline() == "tokenizing\n"
    children, waited = Path(f"/proc/{command.pid}/task/{command.pid}/children"), 0.0
    while len(children.read_text().split()) < 2 and waited < 60:  # the workers at work (not a fixed wait: a busy
        time.sleep(0.1)  # machine may start them late)
        waited += 0.1
    time.sleep(0.5)
    command.send_signal(signal.SIGTERM)
    _, err = command.communicate(timeout=60)  # once the workers too have closed their stderr
    cache = tmp_path / "cache"  # stopped mid-way: no cache made (a temporary file of its tokens left)
    assert command.returncode == -signal.SIGTERM and not list(cache.glob("*.npy"))
    assert "Traceback" not in err, err


def test_parallel_tokenization_equals_serial_and_hub_datasets_resolve(tmp_path, monkeypatch, capfd):
    import multiprocessing
    import signal

    import huggingface_hub.constants

    from bailong import token_cache
    from bailong.data import data_paths
    from bailong.token_cache import tokenize
    from bailong.errors import run_cli
    from bailong.tokenizer import byte_tokenizer
    docs = [f"第 {i} 行 line {i}" for i in range(2500)]
    found = []
    with pytest.raises(SystemExit):  # as a command runs it: the pool's end (SIGTERM to its workers) is quiet
        run_cli(lambda argv: found.append(tokenize(byte_tokenizer(), docs, tmp_path / "a", workers=2)), [])
    parallel = found[0]
    assert "Traceback" not in capfd.readouterr().err  # not always seen: the workers may end first

    def handler_in_a_worker(argv):  # what a worker does on the pool's SIGTERM, within the command's handler
        pool = multiprocessing.Pool(1, initializer=token_cache._pool_worker, initargs=(byte_tokenizer(), None, True))
        found.append(pool.apply(signal.getsignal, (signal.SIGTERM,)))
        pool.close()  # the worker let go without a signal
        pool.join()
    with pytest.raises(SystemExit):
        run_cli(handler_in_a_worker, [])
    assert found[1] == signal.SIG_DFL
    serial = tokenize(byte_tokenizer(), docs, tmp_path / "b", workers=1)
    assert parallel[0].tolist() == serial[0].tolist() and parallel[2].tolist() == serial[2].tolist()
    snapshot = tmp_path / "hub" / "datasets--bailong-tests--corpus" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "part.txt").write_text("臺灣\n")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert data_paths(["bailong-tests/corpus"]) == [snapshot]
    assert list(read_corpus(data_paths(["bailong-tests/corpus"]))) == ["臺灣"]
    chats = tmp_path / "hub" / "datasets--bailong-tests--chats" / "snapshots" / ("1" * 40)
    chats.mkdir(parents=True)
    (chats / "chats.jsonl").write_text((SAMPLES / "chats_sample.jsonl").read_text())
    (chats.parents[1] / "refs").mkdir()
    (chats.parents[1] / "refs" / "main").write_text("1" * 40)
    assert list(read_conversations(data_paths(["bailong-tests/chats"]))) == \
        list(read_conversations([SAMPLES / "chats_sample.jsonl"]))
    parquet = tmp_path / "hub" / "datasets--bailong-tests--parquet" / "snapshots" / ("2" * 40)
    parquet.mkdir(parents=True)
    (parquet / "train.parquet").write_bytes(b"PAR1")
    (parquet.parents[1] / "refs").mkdir()
    (parquet.parents[1] / "refs" / "main").write_text("2" * 40)
    with pytest.raises(BailongError, match="^bailong-tests/parquet: the Hub dataset holds no .txt or .jsonl files"):
        data_paths(["bailong-tests/parquet"])  # was: "<the cache's folder>: the corpus is empty"
    with pytest.raises(BailongError, match="^bailong-tests/corpus: the Hub dataset holds no .jsonl files"):
        data_paths(["bailong-tests/corpus"], (".jsonl",))  # SFT's: its .txt is no conversation


@pytest.mark.parametrize("start", ["forkserver", "spawn"])
def test_tokenizing_workers_started_afresh_or_from_a_server_give_what_one_process_gives(start, tmp_path, monkeypatch):
    """Python 3.14 starts a pool's workers from a server process (forkserver), macOS and Windows afresh (spawn),
    where Linux's older Pythons fork: what a worker is given (the tokenizer, the chat template) travels pickled."""
    import multiprocessing

    from bailong import token_cache
    from bailong.tokenizer import byte_tokenizer
    monkeypatch.setattr(token_cache, "Pool", multiprocessing.get_context(start).Pool)
    docs = [f"第 {i} 行 line {i}" for i in range(2000)]
    chats = [[{"role": "user", "content": f"問 {i}"}, {"role": "assistant", "content": f"答 {i}"}] for i in range(2000)]
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token if m.role == 'assistant' }}\n"
                "{% endfor %}{{ 'assistant: ' if add_generation_prompt }}", {"eos_token": "</s>"})
    for items, template in [(docs, None), (chats, template)]:
        tokenized = [token_cache.tokenize(byte_tokenizer(), items, tmp_path / f"{start}-{workers}", workers, template)
                     for workers in (2, 1)]
        assert all(a.tolist() == b.tolist() for a, b in zip(*tokenized) if a is not None)


def stopped_while_a_pool_tokenizes(stop, then, cache="."):
    """A process, the first of a group of its own, tokenizing 6,000 documents in 2 processes, one of which sends
    ``stop`` to the group at the 3,000th, as a terminal's Ctrl-C or a job scheduler does; ``then`` (code) runs
    the tokenizing as ``encode_all()``, or into the token cache in ``cache`` as ``tokenize_all()``. Returns the
    finished process."""
    script = f"""
import multiprocessing, os, signal, sys
import numpy as np
signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's (nohup ... & ignores it)
sys.path.insert(0, {str(ROOT)!r})
from bailong import token_cache as data
from bailong.errors import run_cli
from bailong.tokenizer import byte_tokenizer
documents = [f"x {{i}}" for i in range(6000)]

def encode(item):
    if item == "x 3000":
        os.killpg(0, {int(stop)})
    return np.ones(10000, dtype=np.int32), None

def encode_all():
    return list(data._encoded(byte_tokenizer(), documents, 2, None))

def tokenize_all():
    return data.tokenize(byte_tokenizer(), documents, {str(cache)!r}, 2)

data._encode = encode
{then}
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          start_new_session=True)


def test_sigterm_or_ctrl_c_while_a_pool_tokenizes_ends_the_command_at_once(tmp_path):
    """A pool shut down by an exception can wait forever on a worker stopped mid-send: while it tokenizes, the
    command (its SIGTERM handler set, as every command's is) ends at once, as by default. The tokens it was
    writing to the cache as they came (240 MB here) are left in a temporary file, which the next tokenizing into
    that folder removes."""
    import signal

    from bailong.token_cache import tokenize
    from bailong.tokenizer import byte_tokenizer
    for stop in (signal.SIGTERM, signal.SIGINT):
        for work in ("encode_all", "tokenize_all"):
            cache = tmp_path / f"{stop}-{work}"
            done = stopped_while_a_pool_tokenizes(stop, f"run_cli(lambda argv: {work}() and 0, [])", cache)
            assert done.returncode == -stop, done.stderr[-2000:]
            assert "Traceback" not in done.stderr, done.stderr[-2000:]  # the workers end quietly (no broken pipe)
            left = [f.name for f in cache.iterdir()] if cache.exists() else []
            assert all(name.startswith(".tokens-") and name.endswith(".tmp") for name in left), left
            assert len(left) == (work == "tokenize_all"), left
            tokenize(byte_tokenizer(), ["臺灣"], cache)
            assert not [f for f in cache.iterdir() if f.name.endswith(".tmp")]


def test_ctrl_c_while_a_pool_tokenizes_for_a_python_caller_is_raised_there():
    """Called from Python (a notebook), not by a command: Ctrl-C, sent to every process of the group as a terminal
    or a notebook's interrupt sends it, raises KeyboardInterrupt in the caller, whose process goes on, and the
    workers end with the pool. It ended the caller's process (a notebook's kernel) at once."""
    import signal
    caller = ("try:\n    encode_all()\nexcept KeyboardInterrupt:\n"
              "    print('interrupted; processes left:', len(multiprocessing.active_children()))")
    done = stopped_while_a_pool_tokenizes(signal.SIGINT, caller)
    assert (done.returncode, done.stdout) == (0, "interrupted; processes left: 0\n"), done.stderr[-2000:]


def test_a_full_disk_while_writing_the_cache_is_one_line(small_disk):
    """The cache was written through a memory map, whose writes to a full disk kill the process with SIGBUS and
    nothing said (in a subprocess: so it would kill only that); through a file the machine's refusal is an error
    naming the file, and no temporary file stays. The tokens are written as they come, while the pool still
    encodes: the error waits for its end (a pool stopped by it could hang: 2 of 32 runs, on a 30 MB disk)."""
    chat = "[{'role': 'user', 'content': '問'}, {'role': 'assistant', 'content': '答' * 1000}]"
    for items, workers, file in (("['臺灣' * 1000] * 20", 1, "ids"), ("['臺灣' * 100] * 2000", 2, "ids"),
                                 (f"[{chat}] * 2000", 2, "labels")):  # 480 KB of ids; 2.4 MB; 24 MB of both
        code = ("from bailong.errors import run_cli\nfrom bailong.token_cache import tokenize\n"
                "from bailong.tokenizer import byte_tokenizer\n"
                f"run_cli(lambda argv: tokenize(byte_tokenizer(), {items}, {str(small_disk)!r}, {workers}) and 0, [])")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1, (run.returncode, run.stderr[-500:])
        assert run.stderr.strip().splitlines()[-1].endswith(f".{file}.npy: could not write (No space left on device)")
        assert list(small_disk.iterdir()) == []


def test_the_tokenizing_processes_are_as_many_as_the_cores_this_process_may_use(monkeypatch):
    """On a job scheduler's share of a larger machine, one process per core of the share (os.cpu_count()
    counts the machine's: a process per core of a 128-core node on 8 of them, each holding the tokenizer), and
    none without a thousand documents to encode (--workers 1024 once started 1,024 processes for 2,000)."""
    from bailong import cores, token_cache
    from bailong.tokenizer import byte_tokenizer
    started = []

    class Pool:  # multiprocessing's, in this process: the processes it would start, counted
        def __init__(self, processes, initializer, initargs):
            started.append(processes)

        def terminate(self):
            pass

        def imap(self, encode, items, chunksize):
            return map(encode, items)

    monkeypatch.setattr(token_cache, "Pool", Pool)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(cores, "cpu_quota", lambda: None)  # (a machine's own would count)
    token_cache._init_worker(byte_tokenizer(), None)
    for workers, documents in ((0, 9000), (1024, 9000), (5, 9000), (0, 2000), (0, 1999)):
        assert len(list(token_cache._encoded(byte_tokenizer(), ["字"] * documents, workers, None))) == documents
    assert started == [3, 9, 5, 2]


LOCKED = """
import sys, time
from pathlib import Path
from bailong import token_cache
from bailong.errors import run_cli
from bailong.run_folder import take_lock
from bailong.tokenizer import byte_tokenizer
encode = token_cache._encode
def slowly(item):  # each chunk of 64 documents takes a worker 0.64 seconds
    time.sleep(0.01)
    return encode(item)
token_cache._encode = slowly
take_lock(Path(sys.argv[1]))
print("tokenizing", flush=True)
run_cli(lambda argv: token_cache.tokenize(byte_tokenizer(), ["臺灣"] * 2000, Path(sys.argv[1], "cache"), 2), [])
"""


def test_the_workers_of_a_stopped_command_leave_its_run_folder_unlocked(tmp_path):
    """A tokenizing worker, forked with a copy of the run folder's lock, kept the folder locked for the moment
    it lived on after its command was stopped alone (its chunk to finish): a run started then was refused,
    "another process is training in this folder"."""
    import signal
    import time

    from bailong.run_folder import lock_free
    command = subprocess.Popen([sys.executable, "-c", LOCKED, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               cwd=ROOT)
    assert command.stdout.readline() == "tokenizing\n" and not lock_free(tmp_path)
    time.sleep(1)  # the workers at their first chunks
    command.send_signal(signal.SIGTERM)
    command.wait(timeout=60)
    assert command.returncode == -signal.SIGTERM and lock_free(tmp_path)


def test_a_pool_whose_terminate_waits_forever_is_stopped_all_the_same():
    """Pool.terminate() can wait forever after Ctrl-C from Python (its result thread gone, a worker holding the
    results' lock mid-send: 1 to 4 in 25-30 such stops hung): a notebook's kernel hung; its workers are killed
    after five seconds instead."""
    import multiprocessing
    import time

    from bailong.token_cache import _stop
    pool = multiprocessing.Pool(2)
    pool._outqueue._wlock.acquire()  # the results' lock, as a worker sending a result holds it
    workers, start = list(pool._pool), time.monotonic()
    _stop(pool)
    assert 4.5 < time.monotonic() - start < 30 and not any(w.is_alive() for w in workers)
    pool._outqueue._wlock.release()  # (the terminating thread then ends)
