"""Training data: read it, split it, pack it for pre-training, mask it for SFT (tokenized in
``bailong/token_cache.py``).

Pre-training concatenates documents, each as bos (where the tokenizer begins a
prompt with one: a document begins as a prompt does), its tokens, eos, into one
token stream; sequence i is stream[i*L : i*L + L + 1] (inputs and their next
tokens; a document's bos is never a target: no model is asked to write it).
SFT renders each conversation in the chat format and trains only on the
assistant tokens (labels -100 elsewhere).
"""
import codecs
import contextlib
import io
import json
import os
import stat
from array import array
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bailong.errors import BailongError
from bailong.hub import resolve

ROLES = ("system", "user", "assistant")
OTHER_LAYOUTS = {  # what to do with a conversation in another common layout, for the error that refuses it
    "conversations": "ShareGPT's \"conversations\" of \"from\" and \"value\": rename them to \"messages\" of \"role\" "
                     "and \"content\", human to user and gpt to assistant",
    "instruction": "Alpaca's instruction, input and output: make the instruction and input a user message, the "
                   "output an assistant one"}


def listed(value):
    """One path or text (a str, a Path) as a list of one (a str iterated gives its characters), else as it is."""
    return [value] if isinstance(value, (str, os.PathLike)) else value


def data_paths(names, suffixes=(".txt", ".jsonl")) -> list[Path]:
    """Local files and folders as given (one, or a list); a name that is neither, and does not look like a
    file's, is fetched as a Hugging Face dataset repo (its files with one of ``suffixes``: SFT reads only .jsonl)."""
    out = []
    for name in listed(names):
        path = Path(name).expanduser()
        if not path.exists():
            if path.suffix.lower() in (".txt", ".jsonl", ".json") or str(name).startswith(("/", ".", "~")):
                raise BailongError(f"{name}: no such file or folder")
            path = resolve(str(name), files=[f"*{s}" for s in suffixes], weights=False, repo_type="dataset")
            if not any(f for s in suffixes for f in path.rglob(f"*{s}")):
                raise BailongError(f"{name}: the Hub dataset holds no {' or '.join(suffixes)} files, the only ones "
                                   "read (save it as JSON lines first)")
        out.append(path)
    return out


def once(files) -> list[Path]:
    """Each file once, however often it was named (twice, or itself and its folder): read twice, a held-out
    document would also be trained on."""
    first = {}
    for f in files:
        first.setdefault(Path(f).resolve(), f)
    return list(first.values())


def _files(paths, suffixes) -> list[Path]:
    """The files named, and those under the folders named with one of ``suffixes`` (hidden ones left out: a
    notebook's checkpoint copies would put held-out text in training too), each once."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise BailongError(f"{path}: no such file or folder")
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not (chosen := [p for p in found if p.suffix.lower() in suffixes]):  # (CORPUS.JSONL too)
            held = sorted({p.suffix or p.name for p in found})
            raise BailongError(f"{path}: no {' or '.join(suffixes)} files in it"
                               + (f" (it holds {', '.join(held[:6])})" if held else ""))
        files += chosen
    return once(files)


def _lines(file, f):
    """(line number, start, end, line) of a text file's non-blank lines, ``start`` and ``end`` the line's bytes in
    ``f`` (the file opened), read a line at a time (a corpus file may be larger than memory); a line ends only at a
    line feed, a CRLF read as one (JSON lines may hold U+2028 and other characters Python also splits lines at, and
    a lone carriage return ends no line either)."""
    offset = 0
    for number, raw in enumerate(f, 1):
        start = offset + 3 * raw.startswith(codecs.BOM_UTF8)  # a byte-order mark dropped (files joined by cat: each's)
        try:
            text = raw[start - offset:].decode("utf-8")  # (with its end: a character it cuts is said so)
        except UnicodeDecodeError as e:
            raise BailongError(f"{file}: not UTF-8 text (byte {start + e.start}: {e.reason})") from None
        end = offset + len(raw.removesuffix(b"\n").removesuffix(b"\r"))
        offset += len(raw)
        if (text := text.removesuffix("\n").removesuffix("\r")).strip():
            yield number, start, end, text


class Lines(Sequence):
    """The items of files' lines (documents, conversations): every line is read and checked once, and where each
    item lies is kept (20 bytes an item), not the item: each pass reads them again from their files, so that a
    corpus larger than memory trains as one that fits (the files stay in the page cache while they fit, and
    reading them again is a fraction of tokenizing them). ``item(suffix, line, again)`` makes a line's item, or None
    where it holds none (``suffix``: its file's; its errors are said with the file and line; ``again``: the line
    was checked before, and is only made). ``lines[i]`` is one item, ``lines[indices]`` (a slice, or an array of
    positions) those items, a Lines too. A file that is not a regular one (a pipe: ``<(zcat corpus.txt.gz)``) is
    read once and held."""

    def __init__(self, files, item, where=None, held=None, stats=None):
        self.files, self.suffixes, self.item = files, [Path(f).suffix.lower() for f in files], item
        if where is None:
            where, held, stats = self._found()
        self.where, self.held, self.stats = where, held, stats  # where: (file, start, end) of each item

    def _found(self):
        numbers, starts, ends, held, stats = array("i"), array("q"), array("q"), {}, []
        for k, file in enumerate(self.files):
            with open(file, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    held[k] = f.read()
                stats.append(_stat(f.fileno()))  # (the file read: one put in its place since is another)
                for number, start, end, line in _lines(file, io.BytesIO(held[k]) if k in held else f):
                    try:
                        if self.item(self.suffixes[k], line, False) is not None:
                            numbers.append(k), starts.append(start), ends.append(end)
                    except BailongError as e:
                        raise BailongError(f"{file}:{number}: {e}") from None
        return tuple(np.frombuffer(a, a.typecode) for a in (numbers, starts, ends)), held, stats

    def __len__(self):
        return len(self.where[0])

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            i = range(len(self))[i]  # (an IndexError past the end)
            return next(iter(self[i:i + 1]))
        return Lines(self.files, self.item, tuple(a[i] for a in self.where), self.held, self.stats)

    def __iter__(self):
        """The items read again, each file opened once while they are in it, and found as it was when it was read
        first, once opened and again once read (a file written meanwhile would give a token cache named after other
        text than it holds)."""
        with contextlib.ExitStack() as stack:
            f, opened = None, None
            for first in range(0, len(self), 1 << 16):  # (a block at a time: numpy's ints are slow one by one)
                for k, start, end in zip(*(a[first:first + (1 << 16)].tolist() for a in self.where)):
                    if k != opened:
                        self._check(opened)
                        stack.close()
                        self._check(k)
                        f, opened = stack.enter_context(self._open(k)), k
                    f.seek(start)
                    line = f.read(end - start)
                    try:
                        item = self.item(self.suffixes[k], line.decode("utf-8"), True)
                    except (ValueError, KeyError, TypeError):  # (a line written over: json's, or the decoder's)
                        item = None
                    if item is None or len(line) < end - start:
                        raise self._changed(k)
                    yield item
            self._check(opened)

    def __repr__(self):
        return f"Lines({len(self):,} items of {len(self.files)} files)"

    def _open(self, k):
        return io.BytesIO(self.held[k]) if k in self.held else open(self.files[k], "rb", buffering=1 << 20)

    def _check(self, k):
        if k is not None and k not in self.held and _stat(self.files[k]) != self.stats[k]:
            raise self._changed(k)

    def _changed(self, k):
        return BailongError(f"{self.files[k]}: changed since it was read (each pass over the data reads it again: "
                            "leave it as it is while a run reads it)")


def checked_text(value, where=None):
    """``value`` where it is text: a JSON string may escape half a character (a lone surrogate), which no
    tokenizer takes (``where`` it is: said first)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BailongError(f"{where}: " * bool(where) + f"holds half a character ({value[e.start]!r}, a lone "
                               "surrogate), not text") from None
    return value


def _stat(file):
    """What tells a regular file (a path, or an open file's descriptor) changed: which file it is, its size, its
    time of change and the time its inode changed (which every write sets, and no tool sets back)."""
    status = os.stat(file)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns) \
        if stat.S_ISREG(status.st_mode) else None


def _document(suffix, line, again=False):
    """A text file's line, or a JSON line's "text" (None where it is blank)."""
    if again:
        return json.loads(line)["text"] if suffix in (".jsonl", ".json") else line
    if suffix in (".jsonl", ".json"):
        try:
            line = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            line = None
        if not isinstance(checked_text(line), str):  # a number, null, a list
            raise BailongError("expected a JSON object with a \"text\" string")
    return line if line.strip() else None


def read_corpus(paths) -> Lines:
    """Pre-training documents from text files (a document a non-empty line), JSON lines (.jsonl, or a .json
    file named itself: {"text": ...} a line) or folders of them (their .txt and .jsonl files; ``data_paths``
    turns Hub dataset ids into folders), one or a list. Checked whole, and read again on each pass (``Lines``)."""
    return _read(paths, (".txt", ".jsonl"), _document, "the corpus is empty")


def read_conversations(paths, ending="assistant") -> Lines:
    """Conversations from jsonl files or folders of them (``data_paths`` turns Hub dataset ids into
    folders): {"messages": [{"role": ..., "content": ...}, ...]} a line, an optional system message first,
    then user and assistant alternating, ending with ``ending`` (chat.py --input's end with a question); one or
    a list. Checked whole, and read again on each pass (``Lines``)."""
    return _read(paths, (".jsonl",), partial(_conversation, ending=ending), "no conversations")


def _read(paths, suffixes, item, none):
    """The items ``item`` makes of the files named (and with ``suffixes`` in folders named); ``none`` if none."""
    if not (items := Lines(_files(paths := listed(paths), suffixes), item)):
        raise BailongError(f"{', '.join(map(str, paths)) or 'no file named'}: {none}")
    return items


def _conversation(suffix, line, again, ending):
    """A JSON line's messages, checked (only parsed ``again``)."""
    if again:
        return json.loads(line)["messages"]
    record = None
    try:
        record = json.loads(line)
        messages = record["messages"]
        roles, contents = [m["role"] for m in messages], [m["content"] for m in messages]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BailongError('expected {"messages": [{"role": ..., "content": "..."}]}'
                           + next((f" ({how})" for key, how in OTHER_LAYOUTS.items()
                                   if isinstance(record, dict) and key in record), "")) from None
    if (i := next((i for i, c in enumerate(contents) if not isinstance(checked_text(c), str)),
                  None)) is not None:
        raise BailongError(f"message {i}'s content is {json.dumps(contents[i])[:60]}, not a string"
                           + " (join its parts' texts into one)" * isinstance(contents[i], list))
    if unknown := [r for r in roles if r not in ROLES]:
        raise BailongError(f"unknown role {unknown[0]!r} (use system, user, assistant)")
    if (i := next((i for i, m in enumerate(messages) if m.get("weight", 1) not in (0, 1)), None)) is not None:
        raise BailongError(f"message {i}'s weight is {json.dumps(messages[i]['weight'])}, not 0 (an "
                           "answer not to learn) or 1")
    if ending == "assistant" and "assistant" not in roles:
        raise BailongError("the conversation has no assistant turn to learn from")
    if ending == "assistant" and not any(m.get("weight", 1) for m in messages if m["role"] == "assistant"):
        raise BailongError("every answer has weight 0: nothing to learn")
    dialog = roles[1:] if roles[:1] == ["system"] else roles
    if not dialog or dialog[-1] != ending or dialog != (["user", "assistant"] * len(dialog))[:len(dialog)]:
        raise BailongError("expected an optional system message, then user and assistant "
                           f"turns alternating and ending with the {ending}, got {roles}")
    return messages


def stage_items(config) -> tuple[Lines, Lines, Lines | list]:
    """(every item, the training share, the held-out share) of a run's data (``config``: train.py's): documents
    for pre-training (.txt and .jsonl files), conversations for SFT (.jsonl only), split the same wherever read."""
    suffixes = (".txt", ".jsonl") if config.stage == "pretrain" else (".jsonl",)
    paths = data_paths(config.data, suffixes)  # files and folders as given, Hub dataset ids fetched
    items = read_corpus(paths) if config.stage == "pretrain" else read_conversations(paths)
    return items, *split(items, config.held_out, config.seed)


def split(items, held_out, seed):
    """(training items, held-out items): a seeded draw of whole documents or conversations."""
    if len(items) < 2 or not held_out:
        return items[:], []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).numpy()
    n_eval = min(len(items) - 1, max(1, round(len(items) * held_out)))
    take = items.__getitem__ if isinstance(items, Lines) else lambda chosen: [items[i] for i in chosen]
    return take(np.sort(order[n_eval:])), take(np.sort(order[:n_eval]))


def _answer_tokens(labels, offsets, firsts, lasts, block=1 << 20):
    """For each end in ``lasts`` (arrays, one value a conversation), the answer tokens (labels not -100) of each
    conversation i from its token ``firsts[i]`` to before that end (both within the conversation); the labels read
    about ``block`` tokens at a time: counted over all of them at once, the counts took 9 bytes a token (an SFT set of
    a billion tokens, 9 GB)."""
    counts, a = [np.empty(len(firsts), np.int64) for _ in lasts], 0
    while a < len(firsts):
        b = max(a + 1, int(np.searchsorted(offsets, offsets[a] + block, "right")) - 1)  # whole conversations
        base = offsets[a]
        before = np.concatenate([[0], np.cumsum(np.asarray(labels[base:offsets[b]]) != -100)])
        for count, last in zip(counts, lasts):
            count[a:b] = before[last[a:b] - base] - before[firsts[a:b] - base]
        a = b
    return counts


class TokenData:
    """Fixed-length examples over tokenized data.

    ``batch(indices)`` gives (inputs, targets) of shape (B, seq_len): targets are
    the next tokens (pre-training; with ``bos``, each document's first token, its
    bos, is -100), or the next tokens where they are an assistant's, -100
    elsewhere (SFT; short conversations are padded, long ones cut, and those
    whose answers all begin past ``seq_len`` left out).
    """

    def __init__(self, ids, labels, offsets, seq_len, pad_id=0, what="training data", bos=False, leave_out=True):
        """``leave_out``: SFT leaves out the conversations with nothing to learn within ``seq_len`` (False: as a run
        an earlier version began, which kept them)."""
        self.ids, self.labels, self.offsets, self.seq_len, self.pad_id = ids, labels, offsets, seq_len, pad_id
        self.bos = bos
        self.sft = labels is not None
        self.n, self.cut = (len(ids) - 1) // seq_len, ""
        if self.sft:
            self.n = len(self._keep_learnable(what, leave_out))
            if self.n < 1:
                raise BailongError(f"no answer of the {what} begins within an example's {seq_len} tokens: nothing "
                                   "to learn from (raise --seq-len)")
        if self.n < 1:
            more = ", raise --held-out" if what == "held-out data" else ""
            raise BailongError(f"the {what} make no example of {seq_len} tokens (add data{more} or lower --seq-len)")
        self._orders = {}  # (seed, epoch) -> order of the examples

    def _keep_learnable(self, what, leave_out=True):
        """SFT: the conversations with an answer token within an example's tokens (an example without one teaches
        nothing, and a held-out loss over none would read 0; without ``leave_out``, all where any has one), and
        ``cut``: how many run past them, and how many answer tokens are never learned for it ("" where none
        does)."""
        starts, ends = np.asarray(self.offsets[:-1]), np.asarray(self.offsets[1:])
        kept = np.minimum(ends, starts + self.seq_len + 1)  # an example's targets: its tokens 1 to seq_len
        inside, whole = _answer_tokens(self.labels, self.offsets, starts + 1, (kept, ends))
        self.conversations = np.flatnonzero(inside)
        if not leave_out and len(self.conversations):
            self.conversations = np.arange(len(starts))
        if long := int((ends > kept).sum()):
            left_out = len(starts) - len(self.conversations)
            dropped = f"; {left_out} whose answers all begin past them are left out" if left_out else ""
            self.cut = (f"{long} of {len(starts)} conversations of the {what} are longer than {self.seq_len} tokens"
                        f"{dropped}: {whole.sum() - inside.sum():,} of the {whole.sum():,} answer tokens "
                        f"({1 - inside.sum() / whole.sum():.0%}) are never learned (raise --seq-len to learn them)")
        return self.conversations

    def files(self) -> set[str]:
        """The names of the cached token arrays it reads (``tokenize``'s, memory-mapped)."""
        return {Path(a.filename).name for a in (self.ids, self.labels, self.offsets) if isinstance(a, np.memmap)}

    def example(self, i):
        if not self.sft:
            start = i * self.seq_len
            chunk = torch.tensor(self.ids[start: start + self.seq_len + 1], dtype=torch.long)
            targets = chunk[1:].clone()
            if self.bos:  # by position, not by id: a tokenizer's bos may also be its eos, which is learned
                firsts = self.offsets[np.searchsorted(self.offsets, start + 1):
                                      np.searchsorted(self.offsets, start + self.seq_len + 1)]
                targets[torch.as_tensor(firsts - start - 1, dtype=torch.long)] = -100
            return chunk[:-1], targets
        i = self.conversations[i]
        start, end = self.offsets[i], min(self.offsets[i + 1], self.offsets[i] + self.seq_len + 1)
        ids = torch.tensor(self.ids[start:end], dtype=torch.long)  # a copy of the memory-mapped slice
        labels = torch.tensor(self.labels[start:end], dtype=torch.long)
        pad = self.seq_len + 1 - len(ids)
        ids = torch.cat([ids, torch.full((pad,), self.pad_id)])
        labels = torch.cat([labels, torch.full((pad,), -100)])
        return ids[:-1], labels[1:]

    def batch(self, indices):
        inputs, targets = zip(*(self.example(int(i)) for i in indices))
        return torch.stack(inputs), torch.stack(targets)

    def tokens(self, indices=None) -> int:
        """The real tokens of these examples' inputs (all of them without ``indices``): SFT's padding left out."""
        indices = range(self.n) if indices is None else indices
        if not self.sft:
            return len(indices) * self.seq_len
        i = self.conversations[np.asarray(indices, dtype=np.int64)]
        offsets = np.asarray(self.offsets)
        return int(np.minimum(offsets[i + 1] - offsets[i], self.seq_len).sum())

    def indices(self, step, batch_size, seed, rank=0, world=1):
        """The examples of one optimizer micro-step, the same on every run: each epoch is a
        seeded permutation, and each rank takes its own share of the global batch."""
        n = self.n
        first = step * batch_size * world
        chosen = []
        for g in range(first + rank, first + batch_size * world, world):
            if (seed, g // n) not in self._orders:
                self._orders = {(seed, g // n): torch.randperm(n, generator=torch.Generator().manual_seed(seed + g // n))}
            chosen.append(int(self._orders[seed, g // n][g % n]))
        return chosen
