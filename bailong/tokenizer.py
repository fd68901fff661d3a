"""Tokenizers: SentencePiece (Llama 2) and tokenizer.json (byte-level BPE: Llama 3, SmolLM2) behind one
interface (encode, decode, special ids), and a streaming decoder that never prints half a character."""
import functools
import re
from pathlib import Path

import sentencepiece as spm

from bailong.errors import BailongError, read_json

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # beside tokenizer_config.json, whose chat_template it overrides


class Tokenizer:
    def __init__(self, model_file=None, model_proto: bytes | None = None, legacy=True):
        """From ``model_file``, or from its serialized ``model_proto``. ``legacy``, as transformers names it:
        whether chat text after a special token begins with SentencePiece's space (``encode_chat``); a
        tokenizer_config.json beside ``model_file`` says instead (true unless it says false: how transformers 4,
        which the models with such a config were trained with, read one without it; transformers 5 reads it as
        false)."""
        self.sp = spm.SentencePieceProcessor()
        if model_proto is None and not Path(model_file).exists():
            raise BailongError(f"{model_file}: no such file")
        try:
            if model_proto is not None:
                self.sp.LoadFromSerializedProto(model_proto)
            else:
                self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise BailongError(f"{model_file or 'tokenizer'}: not a SentencePiece model ({e})") from None
        self.path = Path(model_file) if model_file else None
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.adds_bos = self.bos_id >= 0  # whether a prompt begins with bos (Llama 2's always does)
        self.vocab_size = self.sp.vocab_size()
        self.legacy = legacy
        if self.path and (self.path.parent / "tokenizer_config.json").is_file():
            try:
                settings = tokenizer_settings(self.path.parent)
            except BailongError:  # a broken one: the template that lives there says so where it is read
                settings = {}
            self.legacy = settings.get("legacy") is not False
            if added := added_past(self.path.parent, settings, self.vocab_size):
                raise BailongError(f"{self.path.parent}: its tokenizer settings add {', '.join(added[:3])} past "
                                   f"tokenizer.model's {self.vocab_size} pieces and use them (as bos or eos, or in "
                                   "the chat template), which Bailong reads only from a tokenizer.json holding no "
                                   "token past the model's embeddings (transformers writes one: AutoTokenizer."
                                   "from_pretrained(folder).save_pretrained(folder)); without them its chat text "
                                   "would be spelled out")

    def encode(self, text, bos=False, eos=False) -> list[int]:
        bos, eos = bos and self.bos_id >= 0, eos and self.eos_id >= 0  # a model may have neither (id -1)
        return [self.bos_id] * bos + self.sp.encode(one_text(text)) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        # Ids past the tokenizer (a model vocabulary padded for speed) decode to nothing.
        return self.sp.decode([i for i in id_list(ids) if 0 <= i < self.vocab_size])

    def proto(self):
        """The SentencePiece ModelProto (protobuf) of this tokenizer, for editing."""
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        return proto

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def serialized(self) -> bytes:
        return self.sp.serialized_model_proto()

    def save(self, folder):
        from bailong.files import atomic_write
        atomic_write(Path(folder) / "tokenizer.model", self.serialized())

    @functools.cached_property
    def _without_space(self) -> spm.SentencePieceProcessor:
        """The model that puts no space in front of a text: transformers' reading of text after a special token
        where tokenizer_config.json says legacy is false (TinyLlama-Chat's)."""
        proto = self.proto()
        proto.normalizer_spec.add_dummy_prefix = False
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(proto.SerializeToString())
        return sp

    @functools.cached_property
    def _controls(self) -> dict:
        """The control pieces' ids by their text."""
        return {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}

    def _specials(self, named) -> tuple[dict, re.Pattern]:
        """The strings a chat's text writes for single ids (the control pieces, and those of ``named`` that are
        pieces: another is text, not <unk>), and a pattern that splits text at them (none: at nothing)."""
        ids = dict(self._controls)
        ids.update({s: self.sp.piece_to_id(s) for s in named if self.sp.id_to_piece(self.sp.piece_to_id(s)) == s})
        ids.pop("", None)
        return ids, re.compile("(" + "|".join(map(re.escape, sorted(ids, key=len, reverse=True))) + ")" if ids
                               else r"(?!)")

    def encode_chat(self, text, specials: dict, spans=False):
        """Ids of rendered chat text: the model's control pieces ([INST] in Mistral's, <s> and </s> in Llama 2's)
        and the special-token strings it names (``specials``: bos_token...) as their ids, the rest encoded
        (SentencePiece reads "<s>" in text as plain characters), as transformers does; with ``spans``, also
        the (start, end) characters of the text each id stands for."""
        from sentencepiece import sentencepiece_pb2
        ids, pattern = self._specials([s for s in specials.values() if s])
        out, where, at = [], [], 0
        for part in pattern.split(text):
            if part in ids:
                out.append(ids[part])
                where.append((at, at + len(part)))
            elif part:  # after a special token, without SentencePiece's space in front where legacy is false
                sp = self.sp if at == 0 or self.legacy else self._without_space
                encoded = sentencepiece_pb2.SentencePieceText.FromString(sp.encode(part, out_type="serialized_proto"))
                char = [i for i, c in enumerate(part) for _ in c.encode()] + [len(part)]  # of each UTF-8 byte
                out += [p.id for p in encoded.pieces]
                where += [(at + char[p.begin], at + char[p.end]) for p in encoded.pieces]
            at += len(part)
        return (out, where) if spans else out


class JsonTokenizer:
    """A ``tokenizer.json`` tokenizer (byte-level BPE: Llama 3, SmolLM2...) with Tokenizer's interface.

    Read by the ``tokenizers`` library, as transformers reads it: special tokens written in chat text (a chat
    template's ``<|eot_id|>``, ``encode_chat``) become their ids; in a document or a message (``encode``) they are
    text, as SentencePiece reads ``</s>`` there and transformers with ``split_special_tokens`` (a web page that
    writes ``<|end_of_text|>`` ended its document there, and only for these models). bos/eos/pad are
    the tokens ``tokenizer_settings`` names (-1 where it names none; bos, where it names none, the token the
    post-processor begins a prompt with, as transformers adds it).
    """

    def __init__(self, file, text: str | None = None, settings: dict | None = None):
        """From ``file``, or from its ``text`` when given (a tokenizer.json not yet written there), with
        ``settings`` (tokenizer_config.json's content; default: the file beside it)."""
        from tokenizers import Tokenizer as Library
        self.path = Path(file)
        try:
            self.tk = Library.from_str(text) if text is not None else Library.from_file(str(file))
        except Exception as e:  # the library says what is wrong in its own exception type
            raise BailongError(f"{file}: not a tokenizer.json ({str(e).splitlines()[0] if str(e) else e!r})") \
                from None
        self.settings = settings = tokenizer_settings(self.path.parent) if settings is None else settings

        def special(name):
            token = token_text(settings.get(name))
            found = self.tk.token_to_id(token) if isinstance(token, str) else None
            return -1 if found is None else found
        self.bos_id, self.eos_id, self.pad_id = special("bos_token"), special("eos_token"), special("pad_token")
        try:
            plain, prompt = self.tk.encode("a", add_special_tokens=False).ids, self.tk.encode("a").ids
        except Exception as e:  # one the library reads but cannot encode with (a Unigram without an unknown token)
            raise BailongError(f"{file}: not a usable tokenizer.json (it cannot encode \"a\": {e})") from None
        if self.bos_id < 0 and prompt[1:] == plain:  # none named: the token the post-processor adds, as in
            self.bos_id = prompt[0]  # transformers' prompts
        # whether a prompt begins with bos: where the library's post-processor puts it (Llama 3's; not SmolLM2's,
        # whose bos is its eos)
        self.adds_bos = self.bos_id >= 0 and prompt[:1] == [self.bos_id]
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text, bos=False, eos=False) -> list[int]:
        self.tk.encode_special_tokens = True  # special tokens written in the text are text
        ids = self.tk.encode(one_text(text), add_special_tokens=False).ids
        return [self.bos_id] * (bos and self.bos_id >= 0) + ids + [self.eos_id] * (eos and self.eos_id >= 0)

    def decode(self, ids) -> str:
        return self.tk.decode([i for i in id_list(ids) if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def serialized(self) -> bytes:
        return self.tk.to_str().encode()

    def save(self, folder):
        """tokenizer.json, and tokenizer_config.json (special tokens, chat template) when it has one."""
        import json

        from bailong.files import atomic_write
        atomic_write(Path(folder) / "tokenizer.json", self.serialized())
        if self.settings:
            atomic_write(Path(folder) / "tokenizer_config.json", json.dumps(self.settings, indent=2,
                                                                           ensure_ascii=False))

    def encode_chat(self, text, specials: dict, spans=False):
        self.tk.encode_special_tokens = False  # the library finds the special tokens itself
        encoded = self.tk.encode(text, add_special_tokens=False)
        return (encoded.ids, encoded.offsets) if spans else encoded.ids


def one_text(text) -> str:
    """``encode``'s text, which must be one str (SentencePiece would encode a list as a list of lists)."""
    if not isinstance(text, str):
        raise TypeError(f"encode takes one str, not {type(text).__name__}")
    return text


def id_list(ids) -> list:
    """``decode``'s ids as a list: a list, a tensor or array of one dimension, or one id."""
    if type(ids) is list:  # (a streamed answer's, decoded twice a token)
        return ids
    if getattr(ids, "ndim", 1) > 1:
        raise TypeError(f"decode takes one sequence of ids, not ids of shape {tuple(ids.shape)}")
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    return [ids] if isinstance(ids, int) else ids


def token_text(token):
    """A special token as tokenizer settings give it: its string, or the content of an AddedToken's object."""
    return token.get("content") if isinstance(token, dict) else token


def tokenizer_settings(folder) -> dict:
    """A model folder's tokenizer_config.json ({} where it has none), with the chat template of its
    chat_template.jinja where it has one (transformers reads that file first, and its recent versions save a
    template only there) and the special tokens of its special_tokens_map.json (which transformers puts over
    those of a tokenizer_config.json older than its added_tokens_decoder)."""
    file, template = Path(folder) / "tokenizer_config.json", Path(folder) / CHAT_TEMPLATE_FILE
    settings = read_json(file) if file.exists() else {}
    if (specials := Path(folder) / "special_tokens_map.json").is_file() and "added_tokens_decoder" not in settings:
        settings |= {k: token_text(v) for k, v in read_json(specials).items()
                     if k in ("bos_token", "eos_token", "pad_token")}  # as strings: tokenizer_config.json's way
    if template.is_file():
        try:
            settings["chat_template"] = template.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BailongError(f"{template}: not UTF-8 text") from None
    return settings


def added_past(folder: Path, settings: dict, pieces: int) -> list[str]:
    """The tokens a folder's tokenizer_config.json (added_tokens_decoder) or added_tokens.json adds with ids past
    a SentencePiece model's ``pieces`` (a chat fine-tune's <|im_start|>, which transformers reads there) that its
    settings use: named as bos or eos, or written by its chat template. Not one the model beside has no
    embedding for (config.json's vocab_size), nor one nothing uses (a <pad>), which text never holds."""
    import json
    added = {int(i): token_text(t) for i, t in (settings.get("added_tokens_decoder") or {}).items()
             if str(i).isdecimal()}
    try:
        added |= {i: t for t, i in json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")).items()
                  if isinstance(i, int)} if (folder / "added_tokens.json").is_file() else {}
        rows = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vocab_size") \
            if (folder / "config.json").is_file() else None
    except (OSError, ValueError, AttributeError):
        rows = None  # either file broken: what reads it says so
    rows = rows if isinstance(rows, int) else float("inf")
    named = {token_text(settings.get(k)) for k in ("bos_token", "eos_token")}
    template = str(settings.get("chat_template") or "")  # (or a list of named ones)
    return [f"{t} ({i})" for i, t in sorted(added.items())
            if pieces <= i < rows and isinstance(t, str) and (t in named or t in template)]


def tokenizer_file(path) -> Path | None:
    """``path``, or for a model folder the tokenizer file in it: tokenizer.model first, unless tokenizer.json
    adds tokens past its pieces (a chat fine-tune's <|im_start|>, which the SentencePiece model cannot
    write; transformers reads tokenizer.json too); None for a folder with neither."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = [path / n for n in ("tokenizer.model", "tokenizer.json") if (path / n).exists()]
    if len(found) == 2 and _adds_tokens(*found):
        return found[1]
    return found[0] if found else None


def _adds_tokens(model: Path, file: Path) -> bool:
    """Whether the tokenizer.json ``file`` has added tokens with ids past the SentencePiece ``model``'s pieces,
    which the model beside them has embeddings for (a <pad> it has none for is left out, with the file)."""
    import json
    try:
        added = json.loads(file.read_text(encoding="utf-8")).get("added_tokens") or []
        pieces = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
        config = model.with_name("config.json")
        rows = json.loads(config.read_text(encoding="utf-8")).get("vocab_size") if config.is_file() else None
        last = max((t["id"] for t in added), default=-1)
        return last >= pieces and (not isinstance(rows, int) or last < rows)
    except (OSError, ValueError, RuntimeError, AttributeError, KeyError, TypeError):
        return False  # either file broken: tokenizer.model, as before, whose loading says what is wrong


def open_tokenizer(path, legacy=True) -> Tokenizer | JsonTokenizer:
    """The tokenizer in a file (tokenizer.model or tokenizer.json) or a model folder (``tokenizer_file``);
    None for a folder with neither. ``legacy``: a tokenizer.model's, where no tokenizer_config.json says."""
    path = tokenizer_file(path)
    if path is None:
        return None
    return JsonTokenizer(path) if path.suffix == ".json" else Tokenizer(path, legacy=legacy)


def adapted_tokenizer(base, adapter=None) -> Tokenizer | JsonTokenizer:
    """The tokenizer of a base model folder with an adapter folder: the adapter's where it has one (a grown
    vocabulary's tokenizer.model alone), reading chat text as its base's does (legacy), else the base's; None
    where neither has one."""
    tokenizer = open_tokenizer(base)
    grown = open_tokenizer(adapter, legacy=getattr(tokenizer, "legacy", True)) if adapter is not None else None
    return tokenizer if grown is None else grown


def tokenizer_found(tokenizer, path, why=""):
    """``tokenizer``, the one ``open_tokenizer(path)`` or a model's loading found; where it found none, a one-line
    error naming ``path`` (and ``why`` one is needed)."""
    if tokenizer is None:
        raise BailongError(f"{path}: no tokenizer.model or tokenizer.json" + (f"; {why}" if why else ""))
    return tokenizer


def check_fits(tokenizer, model):
    """Refuse a tokenizer with more pieces than the model has embeddings: its last ids would index past them."""
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise BailongError(f"{tokenizer.path or 'the tokenizer'}: the tokenizer has {tokenizer.vocab_size} pieces, "
                           f"more than the model's {model.config.vocab_size} embeddings")


class StreamDecoder:
    """Turns ids arriving one by one into text that is safe to print.

    A character outside the vocabulary arrives as up to four byte-fallback pieces
    (<0xE8> <0x87> <0xBA> is 臺); decoding them one at a time would print U+FFFD
    replacement characters. So we decode a window of ids and print only what the
    window adds, holding back while the text ends in an incomplete character.
    The window starts at the previous chunk, so SentencePiece's stripping of a
    leading space from the first piece does not eat real spaces.
    Joined, the chunks equal ``tokenizer.decode(all_ids)``, but where an answer ends inside a character: a
    SentencePiece-style tokenizer.json's library then replaces the whole run of byte pieces with U+FFFD, the
    chunks only the incomplete end.
    """

    def __init__(self, tokenizer: "Tokenizer | JsonTokenizer"):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = 0  # window start: first id of the previously printed chunk
        self.read = 0  # ids before this have been printed

    def put(self, token_id) -> str:
        """Add one id (an int, or a tensor of one); return the text that is now final (often '')."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is left, incomplete characters included (as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final):
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]


def byte_tokenizer() -> Tokenizer:
    """A SentencePiece model with only <unk>, <s>, </s>, the 256 bytes and '▁' (260 ids).

    Every character is spelled in UTF-8 bytes, as Llama 2 spells most Chinese
    characters: the smallest real tokenizer, for random-weight presets and tests.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    piece = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = 260
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.pieces.add(piece="<unk>", type=piece.UNKNOWN)
    m.pieces.add(piece="<s>", type=piece.CONTROL)
    m.pieces.add(piece="</s>", type=piece.CONTROL)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", type=piece.BYTE)
    m.pieces.add(piece="▁", score=-1.0, type=piece.NORMAL)
    return Tokenizer(model_proto=m.SerializeToString())
