"""Tokenizer wrapper and streaming decode, against SentencePiece itself."""
import sentencepiece as spm

from bailong.tokenizer import Tokenizer, byte_tokenizer
from conftest import asset

TEXT = "臺灣的繁體中文，鬱鬱蔥蔥。 Hello  world\n第二行：龜兔賽跑 😀 end"


def stream_chunks(tokenizer, ids):
    stream = tokenizer.stream()
    return [stream.put(i) for i in ids] + [stream.flush()]


def test_llama2_tokenizer_matches_sentencepiece():
    path = asset("llama2-tokenizer/tokenizer.model")
    tok, sp = Tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.encode(TEXT, bos=True, eos=True) == [1] + sp.encode(TEXT) + [2]
    assert tok.decode(tok.encode(TEXT, bos=True, eos=True)) == TEXT


def test_streaming_traditional_chinese_prints_exactly_the_text():
    tok = Tokenizer(asset("llama2-tokenizer/tokenizer.model"))
    ids = tok.encode(TEXT, bos=True)
    assert sum(3 <= i <= 258 for i in ids) > 20  # many characters arrive as byte pieces
    chunks = stream_chunks(tok, ids)
    assert "".join(chunks) == TEXT
    assert not any("\ufffd" in c for c in chunks)  # never half a character


def test_streaming_with_byte_tokenizer_every_character_in_bytes():
    tok = byte_tokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode()) + 1  # a byte each, spaces as '▁', plus the leading '▁'
    chunks = stream_chunks(tok, ids)
    assert "".join(chunks) == TEXT and not any("\ufffd" in c for c in chunks)
    assert "繁" in chunks  # a character comes out whole as soon as its last byte arrives


def test_stream_flush_shows_an_incomplete_character():
    tok = byte_tokenizer()
    ids = tok.encode("臺")[1:]  # the three bytes, no leading '▁'
    stream = tok.stream()
    assert [stream.put(i) for i in ids[:2]] == ["", ""]
    assert stream.flush() == tok.decode(ids[:2]) == "\ufffd\ufffd"  # one per stray byte


def test_decode_skips_ids_outside_the_vocabulary():
    tok = byte_tokenizer()
    assert tok.decode(tok.encode("ok") + [300, -1]) == "ok"
