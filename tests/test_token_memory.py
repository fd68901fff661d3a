"""What tokenizing and a training run hold in memory: the corpus's tokens written as they come, the text let go
once tokenized, and the memory freed given back (read in /proc: Linux)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


PRELUDE = """
import random, sys


def memory(key):  # MiB: VmRSS now, VmHWM the most so far, RssAnon the process's own (not mapped files)
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024


def documents(n):  # n seeded documents of 500 Chinese characters, one at a time
    random.seed(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    return ("".join(random.choices(chars, k=500)) for _ in range(n))


def write_corpus(path, n):
    with open(path, "w", encoding="utf-8") as f:
        for text in documents(n):
            f.write(text + "\\n")
"""

TOKENIZING = PRELUDE + """
from bailong.token_cache import tokenize
from bailong.tokenizer import byte_tokenizer
texts = list(documents(20_000))  # 10 million characters
before = memory("VmRSS")
ids, _, _ = tokenize(byte_tokenizer(), texts, sys.argv[1], int(sys.argv[2]))
print(before, memory("VmHWM"), len(ids) * 4 / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory in /proc (Linux)")
@pytest.mark.parametrize("workers", [1, 2])
def test_the_tokens_are_written_as_they_come_not_held_until_the_end(tmp_path, workers):
    """The corpus's ids were all held until the cache was written (4 bytes a token: more than the text takes, for
    Chinese): 150 MB more at the peak for the 115 MB of ids here, 34 MB now; the files are numpy's, byte for
    byte."""
    run = subprocess.run([sys.executable, "-c", TOKENIZING, str(tmp_path), str(workers)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    before, peak, ids = map(float, run.stdout.split())
    assert peak - before < 0.5 * ids, (before, peak, ids)
    import io

    import numpy as np
    for file in tmp_path.iterdir():  # the ids and the offsets
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(np.load(file, "r")))
        with open(file, "rb") as f:
            assert f.read(len(header.getvalue())) == header.getvalue(), file


READING = PRELUDE + """
from bailong.data import read_corpus, split
from bailong.token_cache import tokenize
from bailong.tokenizer import byte_tokenizer
from bailong.vocab import learning_message
corpus, cache, workers = sys.argv[1:4]
write_corpus(corpus, 40_000)  # 20 million characters: 40 MB as text
before = memory("VmRSS")
train, held = split(read_corpus([corpus]), 0.1, 0)
said = learning_message(10, train)  # (two passes over it, as learning pieces makes)
ids, _, _ = tokenize(byte_tokenizer(), train, cache, int(workers))
print(memory("VmHWM") - before, len(ids))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory in /proc (Linux)")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_corpus_is_never_held_whole_while_it_is_read_split_learned_from_and_tokenized(tmp_path, workers):
    """Every document was read into a list first and held until tokenized: 105-109 MB more at the peak here, for
    a corpus of 40 MB as text (60 MB of UTF-8); 6-14 MB now, where each pass reads the file again."""
    run = subprocess.run([sys.executable, "-c", READING, str(tmp_path / "corpus.txt"), str(tmp_path), str(workers)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak, ids = run.stdout.split()
    assert float(peak) < 30 and int(ids) > 0.9 * 40_000 * 3 * 500, run.stdout  # (the training share's bytes)


LET_GO = PRELUDE + """
import ctypes, runpy, weakref
from bailong import data


class Document(str):  # a str a weak reference can watch (sent to the tokenizing processes as a str)
    def __reduce__(self):
        return str, (str(self),)


read, batch, watched, seen = data.read_corpus, data.TokenData.batch, [], []


def read_watched(paths):
    documents = [Document(text) for text in read(paths)]
    watched.extend(map(weakref.ref, documents))
    return documents


def first_batch(self, *args):  # (the held-out loss at step 0): what the process holds as training begins
    if not seen:
        seen.extend([sum(ref() is not None for ref in watched), memory("RssAnon")])
        ctypes.CDLL(None).malloc_trim(0)
        seen.append(memory("RssAnon"))
    return batch(self, *args)


data.read_corpus, data.TokenData.batch = read_watched, first_batch
corpus, out = sys.argv[1:3]
write_corpus(corpus, 40_000)
sys.argv = ["train.py", "--data", corpus, "--new-pieces", "0", "--steps", "1", "--out", out]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as e:
    print(e.code, len(watched), *seen)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory in /proc (Linux)")
@pytest.mark.skipif("malloc" in os.environ.get("LD_PRELOAD", ""), reason="another allocator than glibc's is loaded")
def test_the_corpus_is_let_go_once_tokenized_and_its_memory_given_back(tmp_path):
    """train.py held the corpus's text through the whole run (the text of 20 million characters, and the memory
    tokenizing it freed, which glibc keeps for the process: 55-250 MB more held while training here, the text
    being 40 MB), where its tokens are memory-mapped from the cache: no document is held once training begins,
    and what the process freed is the system's again (a trim then gives back less than a fifth of the text)."""
    run = subprocess.run([sys.executable, "-c", LET_GO, str(tmp_path / "corpus.txt"), str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    code, documents, held, training, trimmed = run.stdout.split("\n")[-2].split()
    assert (code, documents, held) == ("0", "40000", "0"), run.stderr[-2000:]
    assert float(training) - float(trimmed) < 8, (training, trimmed)
