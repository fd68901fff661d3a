"""Vocabulary extension: teach a tokenizer the pieces of a new language.

    python -m bailong.vocab extend --base tokenizer.model --corpus zh_tw/ --new-pieces 27241 --out extended.model
    python -m bailong.vocab extend --base tokenizer.json --corpus zh_tw/ --new-pieces 20000 --out new/tokenizer.json
    python -m bailong.vocab compare-init --model meta-llama/Llama-2-7b-hf --base-tokenizer tokenizer.model \\
        --extended-tokenizer extended.model --text held_out.txt

``extend`` trains a BPE model on the corpus with Llama 2's settings (byte
fallback, digits split, no normalisation), keeps the pieces the base lacks (by
default only pieces made of CJK characters), and appends them after the base's
ids with scores below every base piece. SentencePiece's BPE merges the
highest-scoring pair first, so on text without CJK characters nothing changes,
and among the new pieces the trained merge order is kept. A byte-level BPE
tokenizer.json (Llama 3, SmolLM2) is extended by bailong/vocab_bpe.py instead.
"""
import copy
import math
import random
import re
import time
import unicodedata
from collections import Counter
from pathlib import Path

from bailong.errors import BailongError, Parser, UsageError, loading, run_cli

with loading(__name__):  # Ctrl-C meanwhile (torch and the modules loading): answered once they have
    import numpy as np
    import sentencepiece as spm
    import torch
    from sentencepiece import sentencepiece_model_pb2 as pb
    from bailong.config import DTYPES, MAX_NEW_PIECES
    from bailong.cores import usable_cores
    from bailong.data import listed, read_corpus, split
    from bailong.eval import first_chars, loss_per_char, tokens_per_char
    from bailong.files import atomic_write, check_output_file
    from bailong.processes import return_freed_memory
    from bailong.tokenizer import JsonTokenizer, Tokenizer, open_tokenizer, tokenizer_file, tokenizer_found
    from bailong.vocab_bpe import all_cjk, extend_json

# Llama 2's trainer settings, as its tokenizer.model records them, but the machine's: its threads, and the longest
# sentence taken, 64 KiB, where Llama 2's took 4,192 bytes (ours are chunks of up to 32 KiB: ``CHUNK``)
LLAMA_TRAINER = dict(model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                     add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                     split_by_unicode_script=True, max_sentencepiece_length=16, character_coverage=0.99995,
                     unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=usable_cores(),
                     max_sentence_length=1 << 16, minloglevel=2)
CHUNK = 8192  # characters of a document given to the trainer at a time (<= 32 KiB of UTF-8)
# the most characters pieces are learned from: a larger corpus gives a seeded draw of its chunks (the trainer
# holds about 24 bytes a byte of its input, measured: a 10 GB corpus would take 240 GB; 100 million CJK
# characters, about 7)
LEARNED_FROM = 100_000_000


def is_cjk(piece: str) -> bool:
    """Every character (but SentencePiece's '▁' for a space) is CJK (``bailong.vocab_bpe.CJK``): Han, kana,
    bopomofo, Hangul, CJK punctuation, full- and half-width forms."""
    chars = piece.replace("\u2581", "")
    return bool(chars) and all(all_cjk(ord(c), ord(c)) for c in chars)


def spaced(piece: str) -> bool:
    """A piece holding a line feed, a tab or another control character, or a space but SentencePiece's '▁': the
    base spells those as bytes in the text of every script (English's lines, the chat format's), which such a
    piece would read otherwise."""
    return any(unicodedata.category(c) == "Cc" or unicodedata.category(c)[0] == "Z" for c in piece)


def train_bpe(chunks, vocab_size) -> pb.ModelProto:
    """A SentencePiece BPE model of ``vocab_size`` pieces, or of as many as ``chunks`` (``chunked``) allow."""
    import io
    for _ in range(3):
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(chunks), model_writer=model, vocab_size=vocab_size,
                                           **LLAMA_TRAINER)
            break
        except RuntimeError as e:
            if limit := re.search(r"<= (\d+)", str(e)):
                vocab_size = int(limit[1])  # the most this corpus supports
            elif needed := re.search(r"required_chars\. \d+ vs (\d+)", str(e)):
                vocab_size = int(needed[1]) + 64  # every character, and some merges
            else:
                raise BailongError(f"SentencePiece could not train on the corpus: {e}") from None
    proto = pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto


def chunked(texts, most=LEARNED_FROM, seed=0) -> list[str]:
    """What pieces are learned from: the documents in pieces of ``CHUNK`` characters (at most 4 UTF-8 bytes
    each), as the trainer skips, without a word, any sentence over ``max_sentence_length`` bytes (merges across
    a cut are lost, a negligible share of the statistics); of a corpus of more than ``most`` characters, a seeded
    draw of about that many."""
    share = most / max(1, sum(map(len, texts)))
    draw = random.Random(seed).random
    return [t[i:i + CHUNK] for t in texts for i in range(0, len(t), CHUNK) if share >= 1 or draw() < share]


def load_proto(path) -> pb.ModelProto:
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
        spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except FileNotFoundError:
        raise BailongError(f"{path}: no such file") from None
    except Exception as e:  # protobuf's DecodeError or SentencePiece's RuntimeError
        raise BailongError(f"{path}: not a SentencePiece model ({type(e).__name__}: {e})") from None
    return check_bpe(proto, path)


def check_bpe(proto: pb.ModelProto, path) -> pb.ModelProto:
    """``proto``, if extension can append to it: a Unigram model's scores are log-probabilities, not a merge
    order, so appended pieces would get arbitrary ones."""
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise BailongError(f"{path}: a {pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} model; "
                           "extension supports BPE models (Llama's)")
    return proto


def extend_proto(base: pb.ModelProto, trained: pb.ModelProto, new_pieces, char_counts, cjk_only=True):
    """A copy of ``base`` with up to ``new_pieces`` pieces of ``trained`` appended; returns it and the pieces.

    New single characters come first, most frequent first: each turns up to four
    byte tokens into one. Then multi-character pieces in the trainer's merge order,
    which their scores keep (BPE applies the highest-scoring merge first). A piece
    that the extended model would not make of its own text gives its place to the
    next: the base's merges, applied first, may take that text another way (in NFD
    Vietnamese, "▁Việt" as "▁Vie" and marks, where the trainer went through "iệ").
    """
    normal = pb.ModelProto.SentencePiece.NORMAL
    existing = {p.piece for p in base.pieces}
    new = [p for p in trained.pieces if p.type == normal and p.piece not in existing and not spaced(p.piece)
           and (is_cjk(p.piece) or not cjk_only)]
    chars = sorted((p.piece for p in new if len(p.piece) == 1), key=lambda p: -char_counts.get(p, 0))
    merges = [p.piece for p in sorted((p for p in new if len(p.piece) > 1), key=lambda p: -p.score)]
    added, rest = (chars + merges)[:new_pieces], (chars + merges)[new_pieces:]
    while True:
        extended = _appended(base, added)
        if not (unreached := _unreached(extended, len(base.pieces))):
            return extended, added
        added = [p for p in added if p not in unreached] + rest[:len(unreached)]
        rest = rest[len(unreached):]


def _appended(base: pb.ModelProto, pieces) -> pb.ModelProto:
    normal = pb.ModelProto.SentencePiece.NORMAL
    extended = copy.deepcopy(base)
    score = np.float32(min(p.score for p in base.pieces if p.type == normal))
    for piece in pieces:  # each 1 below the last, or the next float32 below where 1 is lost to rounding (Llama
        # 2's lowest is -1e9, where float32 steps by 64): equal scores would leave the order to each reader
        score = min(score - 1, np.nextafter(score, np.float32(-np.inf)))
        extended.pieces.add(piece=piece, score=float(score), type=normal)
    extended.trainer_spec.vocab_size = len(extended.pieces)
    return extended


def _unreached(extended: pb.ModelProto, first: int) -> set[str]:
    """The pieces from id ``first`` on that ``extended`` does not make of their own text."""
    plain = copy.deepcopy(extended)
    plain.normalizer_spec.add_dummy_prefix = False  # a piece's text as it is: "▁臺" is " 臺"
    sp = spm.SentencePieceProcessor(model_proto=plain.SerializeToString())
    pieces = [p.piece for p in extended.pieces[first:]]
    made = sp.encode([p.replace("\u2581", " ") for p in pieces])
    return {piece for i, (piece, ids) in enumerate(zip(pieces, made), first) if ids != [i]}


def too_few(found, what, asked, cjk_only) -> str:
    return (f"the corpus yields {f'only {found}' if found else 'no'} new {'CJK ' if cjk_only else ''}{what}; "
            f"--new-pieces asks for {asked} (add text{f', or ask for at most {found}' if found else ''}"
            f"{'; --all-pieces adds those of every script' if cjk_only else ''})")


def add_pieces(base: pb.ModelProto, texts, new_pieces, cjk_only=True, say=print):
    """Train on ``texts`` (``chunked``) and extend ``base`` with up to ``new_pieces`` of the pieces it lacks:
    (model, pieces).

    Where the base spells the corpus's script well already (a Latin one), most pieces trained are the base's
    own: the trainer is asked for twice as many again while that gives more new ones (and ``say`` says so)."""
    chunks, counts = chunked(texts), Counter()
    for chunk in chunks:
        counts.update(chunk)
    size, added = len(base.pieces) // 4 + len(counts) + int(new_pieces * 1.5), []
    while True:
        trained = train_bpe(chunks, size)
        extended, more = extend_proto(base, trained, new_pieces, counts, cjk_only)
        if len(more) == new_pieces or len(more) <= len(added) or len(trained.pieces) < size:  # enough, or no more
            return extended, more
        say(f"vocabulary: {len(more):,} new pieces among the {size:,} learned; learning {size * 2:,}...")
        size, added = size * 2, more


def is_tokenizer(path) -> bool:
    """Whether ``path`` holds a SentencePiece model or a tokenizer.json (what ``extend`` writes, so
    --overwrite may replace it)."""
    try:
        if Path(path).stat().st_size > 64 << 20:
            return False
        if str(path).endswith(".json"):  # read as the tokenizers library reads it: not any JSON with a "model"
            return JsonTokenizer(path, settings={}).vocab_size > 0
        return spm.SentencePieceProcessor(model_file=str(path)).vocab_size() > 0
    except (OSError, RuntimeError, ValueError, AttributeError, BailongError):
        return False


def check_out(out, base, corpus, overwrite=False):
    """Refuse an --out that is the base tokenizer or in the corpus, a folder, or a file other than a
    tokenizer (or a tokenizer without --overwrite): before the corpus is read. Returns the check for the write."""
    inputs = {"the base tokenizer": base, **{f"the corpus {c}": c for c in corpus}}
    if str(out).endswith(".json") != str(base).endswith(".json"):
        made = "a tokenizer.json (--out ending in .json)" if str(base).endswith(".json") else \
            "a SentencePiece model (--out not ending in .json)"
        raise UsageError(f"{out}: extending {base} makes {made}")
    return check_output_file(out, inputs, overwrite, ours=is_tokenizer, kind="tokenizer")


def learning_message(new_pieces, texts) -> str:
    """What is said before the pieces are learned, a step that shows no progress of its own; and a warning where
    many documents are not in Unicode's composed form, NFC, in which text is nearly always typed: pieces learned
    on decomposed text (Vietnamese's "ệ" as "e" and two marks) fit little else."""
    decomposed = sum(not unicodedata.is_normalized("NFC", t) and len(unicodedata.normalize("NFC", t)) < len(t)
                     for t in texts)  # (composes something: NFC spells Hindi's nukta letters, क़, in two)
    chars = sum(map(len, texts))
    drawn = f"a seeded draw of about {LEARNED_FROM:,} of its " if chars > LEARNED_FROM else ""
    return (f"vocabulary: learning {new_pieces:,} new pieces from {drawn}{chars:,} characters (with no "
            "progress shown: minutes for a large corpus)..." + (
                f"\nwarning: {decomposed:,} of {len(texts):,} documents are not in Unicode's composed form (NFC), "
                "as text is typed: the pieces learned fit decomposed text, and little else (unicodedata.normalize"
                "('NFC', text) composes a document)" if decomposed > len(texts) / 10 else ""))


def extend_tokenizer(tokenizer, texts, new_pieces, cjk_only=True, say=print):
    """``tokenizer`` with ``new_pieces`` learned on ``texts``: (the extended tokenizer, the added pieces as
    text). A SentencePiece model gains trained pieces (add_pieces); a byte-level BPE tokenizer.json continued
    merges (bailong/vocab_bpe.py), keeping its tokenizer_config.json settings. One text may be given alone."""
    texts = listed(texts)
    bpe = isinstance(tokenizer, JsonTokenizer)
    if not bpe:
        proto = check_bpe(tokenizer.proto(), tokenizer.path or "the tokenizer")
        extended, added = add_pieces(proto, texts, new_pieces, cjk_only, say)
    else:  # (BPE takes sentences of any length: only a draw is cut into chunks)
        drawn = texts if sum(map(len, texts)) <= LEARNED_FROM else chunked(texts)
        text, added = extend_json(tokenizer.serialized().decode(), drawn, new_pieces, cjk_only, tokenizer.path)
    return_freed_memory()
    if len(added) < new_pieces:
        raise BailongError(too_few(len(added), "tokens" if bpe else "pieces", new_pieces, cjk_only))
    return extension_from(tokenizer, text.encode() if bpe else extended.SerializeToString()), added


def extension_from(base, serialized: bytes):
    """The tokenizer ``extend_tokenizer`` extends ``base`` to, from its ``serialized`` form (torchrun's rank 0's):
    read as the base is (its tokenizer_config.json settings; for SentencePiece, its spaces after special tokens)."""
    if isinstance(base, JsonTokenizer):
        return JsonTokenizer(base.path, serialized.decode(), base.settings)
    return Tokenizer(model_proto=serialized, legacy=base.legacy)


def extend(base, corpus, new_pieces, out, cjk_only=True, held_out=0.1, overwrite=False):
    """The ``extend`` command: train, merge, save, and report tokens per character. A base ending in
    .json is a byte-level BPE tokenizer.json; any other a SentencePiece model; a model folder, the one it holds."""
    if Path(base).is_dir():
        if (found := tokenizer_file(base)) is None:
            raise UsageError(f"{base}: a folder without tokenizer.model or tokenizer.json; --base names a "
                             "tokenizer or the model folder that holds one")
        base = found
    corpus = listed(corpus)
    check = check_out(out, base, corpus, overwrite)
    before = JsonTokenizer(base, read_text(base)) if str(base).endswith(".json") else \
        Tokenizer(model_proto=load_proto(base).SerializeToString())
    texts = read_corpus(corpus)
    train, held = split(texts, held_out, 0)  # as train.py --new-pieces splits them by default
    print(learning_message(new_pieces, train), flush=True)
    start = time.perf_counter()
    after, added = extend_tokenizer(before, train, new_pieces, cjk_only)
    atomic_write(out, after.serialized(), check=check)
    whole = [a for a in added if "\ufffd" not in a]  # a BPE token may hold part of a character
    print(f"added {len(added)} pieces ({before.vocab_size} -> {after.vocab_size}) in "
          f"{time.perf_counter() - start:.0f} s, e.g. {' '.join(map(shown, whole[:12]))}")
    print(fewer_tokens(before, after, held, train))
    print(f"wrote {out}")
    return added


def fewer_tokens(before, after, held, train) -> str:
    """What the new pieces do to the held-out text (the first 10 million characters; the training text where none
    is held out, which the pieces were learned from and so fit better than unseen text)."""
    measured = first_chars(held or train, 10_000_000)
    b, a = tokens_per_char(before, measured), tokens_per_char(after, measured)
    return (f"{'held-out' if held else 'training (nothing held out)'} text ({sum(map(len, measured)):,} characters): "
            f"{b:.3f} -> {a:.3f} tokens per character ({b / a:.2f}x fewer tokens)")


def shown(piece: str) -> str:
    """A piece as a list shows it: a leading space as "▁", a leading combining mark on a dotted circle ("◌̉", not
    a mark over the space before it), an invisible character (a zero-width joiner) by its code point."""
    space, piece = ("\u2581", piece[1:]) if piece.startswith((" ", "\u2581")) and len(piece) > 1 else ("", piece)
    mark = "\u25cc" if unicodedata.category(piece[0]).startswith("M") else ""
    return space + mark + "".join(f"<U+{ord(c):04X}>" if unicodedata.category(c)[0] in "CZ" and c != " " else c
                                  for c in piece)


def read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BailongError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BailongError(f"{path}: cannot be read as text ({e})") from None


def compare_init(model_path, base_tokenizer, extended_tokenizer, text, max_chars=20000, dtype=None):
    """The ``compare-init`` command: loss per character for each initialisation of the new rows, in ``dtype``
    (default: the checkpoint's own, else ``load``'s)."""
    from bailong.hub import resolve
    from bailong.quantized import NF4Linear, projections
    from bailong.weights import load, own_dtype
    from bailong.zip_tie import METHODS, extend_model, extends
    texts = first_chars(read_corpus([text]), max_chars)
    base, extended = (tokenizer_found(open_tokenizer(p), p) for p in (base_tokenizer, extended_tokenizer))
    if type(base) is not type(extended):
        raise BailongError(f"{extended_tokenizer}: not the same kind of tokenizer as {base_tokenizer} (an "
                           "extension of a tokenizer.model is a tokenizer.model, of a tokenizer.json a tokenizer.json)")
    if extended.vocab_size <= base.vocab_size:
        raise BailongError(f"{extended_tokenizer}: {extended.vocab_size} pieces, no more than the base tokenizer's "
                           f"{base.vocab_size}; --extended-tokenizer names the extension of --base-tokenizer (are the "
                           "two swapped?)")
    if not extends(base, extended):
        raise BailongError(f"{extended_tokenizer}: not an extension of {base_tokenizer} (some of its ids name "
                           "other pieces; an extension keeps every id and appends)")
    if extended.bos_id < 0:  # a tokenizer.json written alone: extension keeps the base's special tokens
        extended.bos_id, extended.eos_id = base.bos_id, base.eos_id
    folder = resolve(str(model_path))
    model, own = load(folder, dtype=dtype or own_dtype(folder))
    if base.vocab_size > model.config.vocab_size or own is not None and own.serialized() != base.serialized():
        raise BailongError(f"{base_tokenizer}: {base.vocab_size} pieces, but the model has {model.config.vocab_size} "
                           "embeddings" + (f" and a tokenizer of its own ({own.vocab_size} pieces)" if own else "") +
                           "; --base-tokenizer names the model's own tokenizer")
    print(f"{sum(map(len, texts))} characters; tokens per character {tokens_per_char(base, texts):.3f} (base) "
          f"-> {tokens_per_char(extended, texts):.3f} (extended)")
    rows = [("original model, base tokenizer", loss_per_char(model, base, texts))]
    rows_of = (model.model.embed_tokens.weight, model.lm_head.weight)
    weights = [*model.parameters(), *(m.weight for _, m in projections(model) if isinstance(m, NF4Linear))]
    for method in METHODS:  # each on a copy of the model that shares every weight but the two it grows (a whole
        # copy each: two models, 26 GiB at 7B in bfloat16)
        shared = {id(w): w for w in weights if all(w is not rows for rows in rows_of)}
        grown = extend_model(copy.deepcopy(model, shared), base, extended, method)
        rows.append((f"extended, {method}", loss_per_char(grown, extended, texts)))
    for name, loss in rows:
        print(f"{name:32s} {loss:.4f} nats per character ({loss / math.log(2):.4f} bits)")
    return dict(rows)


def main(argv=None):
    p = Parser(prog="python -m bailong.vocab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extend", help="train on a corpus and add its new pieces to a base tokenizer")
    e.add_argument("--base", required=True, help="the base tokenizer.model, or a byte-level BPE tokenizer.json")
    e.add_argument("--corpus", required=True, nargs="+", help="text files, jsonl files or folders")
    e.add_argument("--new-pieces", type=int, required=True)
    e.add_argument("--out", required=True, help="where to write the extended tokenizer (a new file)")
    e.add_argument("--overwrite", action="store_true", help="replace --out when it is a tokenizer already")
    e.add_argument("--all-pieces", action="store_true", help="keep non-CJK pieces too")
    e.add_argument("--held-out", type=float, default=0.1, help="share of documents kept for the report (default 0.1)")
    c = sub.add_parser("compare-init", help="loss per character under each initialisation of the new rows")
    c.add_argument("--model", required=True)
    c.add_argument("--base-tokenizer", required=True)
    c.add_argument("--extended-tokenizer", required=True)
    c.add_argument("--text", required=True, help="held-out text (a .txt or .jsonl file)")
    c.add_argument("--max-chars", type=int, default=20000, help="default 20000")
    c.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own (where its files name none, "
                   "float32 on a CPU, bfloat16 on CUDA); a 7B model takes 25 GiB in float32, 13 in bfloat16")
    args = p.parse_args(argv)
    if args.command == "extend":
        if not 1 <= args.new_pieces <= MAX_NEW_PIECES:
            e.error(f"--new-pieces must be from 1 to {MAX_NEW_PIECES:,}, not {args.new_pieces:,}")
        if not 0 <= args.held_out < 1:
            e.error(f"--held-out must be a share at least 0 and below 1, not {args.held_out}")
        extend(args.base, args.corpus, args.new_pieces, args.out, not args.all_pieces, args.held_out, args.overwrite)
    else:
        if args.max_chars < 1:
            c.error(f"--max-chars must be at least 1, not {args.max_chars}")
        compare_init(args.model, args.base_tokenizer, args.extended_tokenizer, args.text, args.max_chars,
                     args.dtype and getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    run_cli(main)
