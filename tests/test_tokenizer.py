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


ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
          "eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
           "message['content'] + '[/INST]' }}{% else %}{{ ' ' + message['content']|trim + eos_token }}{% endif %}"
           "{% endfor %}")


def test_a_sentencepiece_model_s_chat_template_gives_transformers_ids(tmp_path):
    """SFT in a tokenizer.model's own template (TinyLlama-Chat's Zephyr format) encoded the prompt and each
    answer apart, and SentencePiece began each with a space: answers learned as "▁Hello" where transformers and
    chat.py's prompt have "Hello". Control pieces other than bos and eos (Mistral's [INST]) were spelled out.
    Where tokenizer_config.json says legacy is false, text after a special token begins with no space."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from bailong.chat_template import model_template, render_jinja, template_example
    from bailong.tokenizer import open_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "臺灣的夜市"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "1 2"},
                {"role": "assistant", "content": "12 好的"}]
    zephyr = tmp_path / "zephyr"
    zephyr.mkdir()
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), zephyr)
    (zephyr / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=ZEPHYR, legacy=True,
        tokenizer_class="LlamaTokenizer")))
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["Hello there.", "1 2 12", "Be brief."] * 50),
                                   model_prefix=str(mistral / "tokenizer"), model_type="bpe", vocab_size=300,
                                   byte_fallback=True, control_symbols=["[INST]", "[/INST]"], minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # Llama's
    (mistral / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=MISTRAL, legacy=True,
        tokenizer_class="LlamaTokenizer")))
    for folder, conversation, legacy in ((zephyr, messages, True), (zephyr, messages, False),
                                         (mistral, messages, False)):  # Mistral v0.3's: legacy false
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))  # TinyLlama's: false
        conversation = conversation[folder == mistral:]  # Mistral's template writes no system prompt
        ours, theirs = open_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        ids, labels = template_example(ours, model_template(ours, folder), conversation)
        assert ids == list(theirs.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
        prompt = theirs.apply_chat_template(conversation[:-1], tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"]
        template, specials = model_template(ours, folder)  # and chat.py's prompt, as transformers' for generating
        assert ours.encode_chat(render_jinja(template, conversation[:-1], specials), specials) == list(prompt)
        learned = ours.decode([i for i in labels if i != -100])
        assert "".join(learned.split()) == "Hellothere.12好的", folder.name  # the answers, nothing else (as text)
        assert [i for i in labels if i != -100].count(ours.eos_id) == 2  # and each one's end


def test_chat_text_with_nothing_special_in_it_is_encoded_as_text(tmp_path):
    """A SentencePiece model without bos, eos or control pieces split chat text at every character; a template's
    special string the model has no piece for was its <unk>, and learned as one."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world"] * 50), model_prefix=str(tmp_path / "m"),
                                   model_type="bpe", vocab_size=25, bos_id=-1, eos_id=-1, minloglevel=2)
    tok = Tokenizer(tmp_path / "m.model")
    assert tok.encode_chat("hello world", {"bos_token": None}) == tok.encode("hello world") == [9, 10]
    llama = Tokenizer(asset("llama2-tokenizer/tokenizer.model"))
    assert llama.encode_chat("Hi<|endoftext|>", {"eos_token": "<|endoftext|>"}) == llama.encode("Hi<|endoftext|>")


def test_a_grown_vocabulary_reads_chat_text_as_its_base_and_caches_know_how(tmp_path, capsys):
    """A training output's adapter holds its grown tokenizer.model alone: it read chat text with legacy true
    where its base's tokenizer_config.json says false (SFT on it, and chat, put a space after each special token
    that transformers does not). Token caches of templated conversations are keyed by it; pre-training's keys
    are as before this changed (a corpus is not tokenized again for it)."""
    import hashlib
    import json
    import shutil

    import bailong
    from bailong.token_cache import tokenize
    from bailong.runs import DOCUMENTS
    from hf_models import write_hf
    from train_runs import run_train
    base, _ = write_hf(tmp_path, "gqa", vocab_size=32000, max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), base)
    (base / "tokenizer_config.json").write_text(json.dumps({"legacy": False, "chat_template": ZEPHYR,
                                                            "eos_token": "</s>"}))
    run_train(capsys, "--model", base, "--new-pieces", "20", "--steps", "1", "--seq-len", "64", "--out",
              tmp_path / "run")
    _, grown = bailong.load(tmp_path / "run", device="cpu")
    assert grown.vocab_size == 32020 and grown.legacy is False
    assert Tokenizer(tmp_path / "run" / "adapter" / "tokenizer.model").legacy  # the file alone says nothing
    from bailong.training import SAMPLES
    from bailong.vocab import extend_tokenizer
    texts = (SAMPLES / "zh_tw_sample.txt").read_text().splitlines()
    assert extend_tokenizer(Tokenizer(base / "tokenizer.model"), texts, 5)[0].legacy is False  # as it is grown
    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]]
    template = (ZEPHYR, {"eos_token": "</s>"})
    first = tokenize(grown, chats, tmp_path / "cache", 1, template)[0].tolist()
    grown.legacy = True
    assert tokenize(grown, chats, tmp_path / "cache", 1, template)[0].tolist() != first
    tokenize(grown, ["臺灣"], tmp_path / "cache", 1)
    key = hashlib.sha256(grown.serialized() + json.dumps([DOCUMENTS, None, ["臺灣"]], ensure_ascii=False).encode())
    assert (tmp_path / "cache" / f"tokens-{key.hexdigest()[:20]}.ids.npy").is_file()


def test_tokens_added_past_the_pieces_only_in_tokenizer_settings_are_refused_where_used(tmp_path):
    """A tokenizer.model whose chat tokens (<|im_start|>, 32001) live only in tokenizer_config.json, as
    transformers reads them: Bailong spelled them out as text (▁< | im _ start...), its eos </s> where the settings
    named <|im_end|>, without a word. Tokens nothing uses (a <pad> the pad token is not, or is), and ids the model
    has no rows for, are no text: such folders read as before."""
    import json
    import shutil

    import pytest

    from bailong.errors import BailongError
    from bailong.tokenizer import open_tokenizer
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32003}))
    added = {str(32000 + i): {"content": t, "special": True} for i, t in enumerate(["<pad>", "<|im_start|>",
                                                                                   "<|im_end|>"])}
    chatml = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token }}{% endfor %}"
    settings = {"added_tokens_decoder": added, "eos_token": "<|im_end|>", "pad_token": "</s>", "chat_template": chatml}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(BailongError, match=r"settings add <\|im_start\|> \(32001\), <\|im_end\|> \(32002\) past "
                                           r"tokenizer.model's 32000 pieces and use them"):
        open_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32001}))  # no rows for them
    assert open_tokenizer(tmp_path).vocab_size == 32000
    (tmp_path / "config.json").unlink()  # a tokenizer's folder alone; its chat tokens as <pad> (used by nothing)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": "</s>", "chat_template": ""}))
    assert open_tokenizer(tmp_path).vocab_size == 32000
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32000}))  # the older file's way
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(BailongError, match=r"add <\|im_end\|> \(32000\) past"):
        open_tokenizer(tmp_path)
