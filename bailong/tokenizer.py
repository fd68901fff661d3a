"""SentencePiece tokenizer: encode/decode, special ids, and streaming decode."""
from pathlib import Path

import sentencepiece as spm

from bailong.errors import BailongError


class Tokenizer:
    def __init__(self, model_file=None, model_proto: bytes | None = None):
        self.sp = spm.SentencePieceProcessor()
        try:
            if model_proto is not None:
                self.sp.LoadFromSerializedProto(model_proto)
            else:
                self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise BailongError(f"{model_file or 'tokenizer'}: not a SentencePiece model ({e})") from None
        self.path = Path(model_file) if model_file else None
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text, bos=False, eos=False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        # Ids past the tokenizer (a model vocabulary padded for speed) decode to nothing.
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def proto(self):
        """The SentencePiece ModelProto (protobuf) of this tokenizer, for editing."""
        from sentencepiece import sentencepiece_model_pb2 as pb
        proto = pb.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        return proto

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids arriving one by one into text that is safe to print.

    A character outside the vocabulary arrives as up to four byte-fallback pieces
    (<0xE8> <0x87> <0xBA> is 臺); decoding them one at a time would print U+FFFD
    replacement characters. So we decode a window of ids and print only what the
    window adds, holding back while the text ends in an incomplete character.
    The window starts at the previous chunk, so SentencePiece's stripping of a
    leading space from the first piece does not eat real spaces.
    Joined, the chunks equal ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids = []
        self.prefix = 0  # window start: first id of the previously printed chunk
        self.read = 0  # ids before this have been printed

    def put(self, token_id) -> str:
        """Add one id; return the text that is now final (often '')."""
        self.ids.append(token_id)
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
