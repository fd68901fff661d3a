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
import json
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


def data_paths(names, suffixes=(".txt", ".jsonl")) -> list[Path]:
    """Local files and folders as given; a name that is neither, and does not look like a file's, is
    fetched as a Hugging Face dataset repo (its files with one of ``suffixes``: SFT reads only .jsonl)."""
    out = []
    for name in names:
        path = Path(name).expanduser()
        if not path.exists():
            if path.suffix in (".txt", ".jsonl", ".json") or str(name).startswith(("/", ".", "~")):
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
        if not (chosen := [p for p in found if p.suffix in suffixes]):
            held = sorted({p.suffix or p.name for p in found})
            raise BailongError(f"{path}: no {' or '.join(suffixes)} files in it"
                               + (f" (it holds {', '.join(held[:6])})" if held else ""))
        files += chosen
    return once(files)


def _lines(file):
    """(line number, line) of a text file's non-blank lines, read a line at a time (a corpus file may be larger
    than memory holds twice); a line ends only at a line feed, a CRLF read as one (JSON lines may hold U+2028
    and other characters Python also splits lines at, and a lone carriage return ends no line either)."""
    with open(file, "rb") as f:
        offset = 0
        for number, raw in enumerate(f, 1):
            start = 3 if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0  # a byte-order mark dropped
            try:
                line = raw[start:].decode("utf-8")
            except UnicodeDecodeError as e:
                raise BailongError(f"{file}: not UTF-8 text (byte {offset + start + e.start}: {e.reason})") \
                    from None
            offset += len(raw)
            if (line := line.removesuffix("\n").removesuffix("\r")).strip():
                yield number, line


def checked_text(where, value):
    """``value`` where it is text: a JSON string may escape half a character (a lone surrogate), which no
    tokenizer takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BailongError(f"{where}: holds half a character ({value[e.start]!r}, a lone surrogate), "
                               "not text") from None
    return value


def read_corpus(paths) -> list[str]:
    """Pre-training documents from text files (a document a non-empty line), JSON lines (.jsonl, or a .json
    file named itself: {"text": ...} a line) or folders of them (their .txt and .jsonl files; ``data_paths``
    turns Hub dataset ids into folders)."""
    texts = []
    for file in _files(paths, (".txt", ".jsonl")):
        for number, line in _lines(file):
            if file.suffix in (".jsonl", ".json"):
                try:
                    line = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    line = None
                if not isinstance(checked_text(f"{file}:{number}", line), str):  # a number, null, a list
                    raise BailongError(f"{file}:{number}: expected a JSON object with a \"text\" string")
                if not line.strip():
                    continue
            texts.append(line)
    if not texts:
        raise BailongError(f"{', '.join(map(str, paths))}: the corpus is empty")
    return texts


def read_conversations_to_answer(path) -> list[list[dict]]:
    """Conversations that end with a user turn (for batch answers), in the same jsonl layout."""
    return read_conversations([path], ending="user")


def read_conversations(paths, ending="assistant") -> list[list[dict]]:
    """Conversations from jsonl files or folders of them (``data_paths`` turns Hub dataset ids into
    folders): {"messages": [{"role": ..., "content": ...}, ...]} a line, an optional system message first,
    then user and assistant alternating, ending with ``ending``."""
    conversations = []
    for file in _files(paths, (".jsonl",)):
        for number, line in _lines(file):
            where, record = f"{file}:{number}", None
            try:
                record = json.loads(line)
                messages = record["messages"]
                roles, contents = [m["role"] for m in messages], [m["content"] for m in messages]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BailongError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": \"...\"}}]}}"
                                   + next((f" ({how})" for key, how in OTHER_LAYOUTS.items()
                                           if isinstance(record, dict) and key in record), "")) from None
            if (i := next((i for i, c in enumerate(contents) if not isinstance(checked_text(where, c), str)),
                          None)) is not None:
                raise BailongError(f"{where}: message {i}'s content is {json.dumps(contents[i])[:60]}, not a string"
                                   + " (join its parts' texts into one)" * isinstance(contents[i], list))
            if unknown := [r for r in roles if r not in ROLES]:
                raise BailongError(f"{where}: unknown role {unknown[0]!r} (use system, user, assistant)")
            if (i := next((i for i, m in enumerate(messages) if m.get("weight", 1) not in (0, 1)), None)) is not None:
                raise BailongError(f"{where}: message {i}'s weight is {json.dumps(messages[i]['weight'])}, not 0 (an "
                                   "answer not to learn) or 1")
            if ending == "assistant" and "assistant" not in roles:
                raise BailongError(f"{where}: the conversation has no assistant turn to learn from")
            if ending == "assistant" and not any(m.get("weight", 1) for m in messages if m["role"] == "assistant"):
                raise BailongError(f"{where}: every answer has weight 0: nothing to learn")
            dialog = roles[1:] if roles[:1] == ["system"] else roles
            if not dialog or dialog[-1] != ending or dialog != (["user", "assistant"] * len(dialog))[:len(dialog)]:
                raise BailongError(f"{where}: expected an optional system message, then user and assistant "
                                   f"turns alternating and ending with the {ending}, got {roles}")
            conversations.append(messages)
    if not conversations:
        raise BailongError(f"{', '.join(map(str, paths))}: no conversations")
    return conversations


def stage_items(config) -> tuple[list, list, list]:
    """(every item, the training share, the held-out share) of a run's data (``config``: train.py's): documents
    for pre-training (.txt and .jsonl files), conversations for SFT (.jsonl only), split the same wherever read."""
    suffixes = (".txt", ".jsonl") if config.stage == "pretrain" else (".jsonl",)
    paths = data_paths(config.data, suffixes)  # files and folders as given, Hub dataset ids fetched
    items = read_corpus(paths) if config.stage == "pretrain" else read_conversations(paths)
    return items, *split(items, config.held_out, config.seed)


def split(items, held_out, seed):
    """(training items, held-out items): a seeded draw of whole documents or conversations."""
    if len(items) < 2 or not held_out:
        return list(items), []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(items) - 1, max(1, round(len(items) * held_out)))
    return [items[i] for i in sorted(order[n_eval:])], [items[i] for i in sorted(order[:n_eval])]


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
        answer = np.asarray(self.labels) != -100
        before = np.concatenate([[0], np.cumsum(answer, dtype=np.int32 if len(answer) < 2**31 else np.int64)])
        inside, whole = before[kept] - before[starts + 1], before[ends] - before[starts + 1]  # answer tokens
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
