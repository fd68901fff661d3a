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
