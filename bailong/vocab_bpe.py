"""Vocabulary extension for byte-level BPE tokenizers (tokenizer.json: Llama 3, SmolLM2).

BPE continued: each word of the corpus is first split as the base tokenizer
splits it, then the most frequent pair of neighbouring tokens is merged, again
and again, and each merge is kept in order. The new tokens get ids after every
existing id (special tokens included) and their merges follow the base's. A BPE
tokenizer applies merges by rank, so on new text it first applies all the base's
merges, reaching the base's tokens, then the new ones in the order they were
learned: the replay of training. By default only pairs that make a token
starting with the bytes of a CJK character (``CJK``; or with only the first bytes
of one, where every character they may begin is CJK) are merged, so text without
such characters never meets a new merge and keeps the base's tokens exactly. A pair
that would make a token the base already has is never merged: every new merge
makes a new token, which no base merge takes as input, so the base's merges
always finish before the new ones.
"""
import heapq
import json
from collections import Counter, defaultdict

from bailong.errors import BailongError

# The code points of Chinese, Japanese and Korean text, which new pieces are made of by default: Hangul jamo,
# radicals and ideographic description, CJK symbols and punctuation (「」《》 among them), kana, bopomofo,
# Hangul compatibility jamo, CJK strokes and enclosed and compatibility forms, ideographs (extension A, unified),
# Hangul jamo extended-A, Hangul syllables and jamo extended-B (then surrogates, which no UTF-8 text holds),
# compatibility ideographs, CJK compatibility forms, full- and half-width forms, kana supplements, and the
# planes of ideographs (extensions B to J, compatibility supplement)
CJK = ((0x1100, 0x11FF), (0x2E80, 0x2FFF), (0x3000, 0x9FFF), (0xA960, 0xA97F), (0xAC00, 0xDFFF), (0xF900, 0xFAFF),
       (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0x1AFF0, 0x1B16F), (0x20000, 0x3FFFF))


def all_cjk(low: int, high: int) -> bool:
    """Whether every code point from ``low`` to ``high`` is CJK."""
    return any(first <= low and high <= last for first, last in CJK)


def starts_cjk(data: bytes) -> bool:
    """Whether ``data`` begins with a CJK character's UTF-8 bytes, or with the first bytes of one where every
    character they may begin is CJK (a token may hold U+3000..U+9FFF's first byte alone)."""
    size = 0 if data[0] < 0xC0 else 2 if data[0] < 0xE0 else 3 if data[0] < 0xF0 else 4  # 0: ASCII, or inside one
    if not size:
        return False
    head = data[:size]
    low, high = (_code_point(head + bytes([fill]) * (size - len(head))) for fill in (0x80, 0xBF))
    return all_cjk(low, high)


def _code_point(data: bytes) -> int:
    """The code point a character's UTF-8 bytes hold."""
    value = data[0] & 0x7F >> len(data)
    for byte in data[1:]:
        value = value << 6 | byte & 0x3F
    return value


def byte_of():
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), reversed: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def check_byte_level(data: dict, source):
    model, pre = data.get("model") or {}, json.dumps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        spm_style = '"Metaspace"' in pre or '"Replace"' in json.dumps(data.get("normalizer"))
        raise BailongError(f"{source}: not a byte-level BPE tokenizer.json (model {model.get('type')!r}"
                           + ("; a SentencePiece-style one, read for the tokens it adds past its folder's "
                              "tokenizer.model" if spm_style else "") + "): vocabulary extension and the GGUF "
                           "export take a byte-level BPE tokenizer.json or a SentencePiece tokenizer.model")


def learn_merges(base, texts, new_tokens, cjk_only=True) -> list[tuple[str, str]]:
    """Merges continuing ``base`` (a tokenizers.Tokenizer) on ``texts`` until ``new_tokens`` tokens the base
    lacks are made (or no pair occurs twice)."""
    lead = byte_of()
    words = Counter()
    for text in texts:
        text = base.normalizer.normalize_str(text) if base.normalizer else text
        words.update(piece for piece, _ in base.pre_tokenizer.pre_tokenize_str(text))
    seqs = [[t.value for t in base.model.tokenize(word)] for word in words]
    counts = list(words.values())
    in_base = set(base.get_vocab())
    known = set(in_base)
    banned = set()  # pairs that would make a token the base already has (see below)

    cjk = {}  # pair -> whether the token it makes starts with a CJK character (starts_cjk)

    def allowed(pair):
        if cjk_only and pair not in cjk:
            cjk[pair] = starts_cjk(bytes(lead[c] for c in pair[0] + pair[1]))
        return not cjk_only or cjk[pair]

    pairs, where = Counter(), defaultdict(set)  # pair -> occurrences; pair -> words that held it
    changed = set()  # pairs whose count moved since the heap last heard of them

    def add(pair, n, word):
        if allowed(pair) and pair not in banned:
            pairs[pair] += n
            changed.add(pair)
            if n > 0:
                where[pair].add(word)

    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            add(pair, counts[i], i)
    heap = [(-n, pair) for pair, n in pairs.items()]  # the most frequent pair on top; stale entries skipped
    heapq.heapify(heap)
    merges, made = [], 0
    while made < new_tokens and heap:
        negative, pair = heapq.heappop(heap)
        if -negative != pairs.get(pair):
            continue  # a stale entry: the pair's count has changed since
        if pairs[pair] < 2:
            break
        (a, b), merged = pair, pair[0] + pair[1]
        if merged in in_base:  # the base would go on merging that token with its own merges, which this
            banned.add(pair)   # replay does not foresee, and the pair may even be a base merge: skip it
            del pairs[pair]
            where.pop(pair, None)
            continue
        merges.append(pair)
        if merged not in known:
            known.add(merged)
            made += 1
        changed.clear()
        for i in where.pop(pair):  # each occurrence: its neighbours now pair with the merged token
            seq, n, out, j = seqs[i], counts[i], [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    if out:
                        add((out[-1], a), -n, i)
                        add((out[-1], merged), n, i)
                    if j + 2 < len(seq):
                        add((b, seq[j + 2]), -n, i)
                        add((merged, seq[j + 2]), n, i)
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
        del pairs[pair]
        for p in changed - {pair}:
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], p))
    return merges


def extend_json(base_text: str, texts, new_tokens, cjk_only=True, source="tokenizer.json") -> tuple[str, list[str]]:
    """The tokenizer.json ``base_text`` extended on ``texts``: (its new text, the added tokens as text)."""
    from tokenizers import Tokenizer
    data = json.loads(base_text)
    check_byte_level(data, source)
    merges = learn_merges(Tokenizer.from_str(base_text), texts, new_tokens, cjk_only)
    vocab, lead = data["model"]["vocab"], byte_of()
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))])
    # Llama 3 lists its special tokens (ids after the BPE vocabulary's) only in added_tokens: new ids after theirs
    # would leave a gap in the vocabulary, which the tokenizers library closes by giving them the new tokens' ids
    for token in data.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    added = []
    as_strings = bool(data["model"]["merges"]) and isinstance(data["model"]["merges"][0], str)
    for left, right in merges:
        if left + right not in vocab:
            vocab[left + right] = next_id
            next_id += 1
            added.append(bytes(lead[c] for c in left + right).decode(errors="replace"))
        data["model"]["merges"].append(f"{left} {right}" if as_strings else [left, right])
    return json.dumps(data, ensure_ascii=False), added
