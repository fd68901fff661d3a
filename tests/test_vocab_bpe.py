"""vocab extend on a tokenizer.json (byte-level BPE): merges learned on Chinese text appended after the base's,
every old id and every non-Chinese tokenization kept, checked against transformers' AutoTokenizer."""
import json

import pytest
from bpe_models import SPECIALS, TEXTS, bpe_folder
from transformers import AutoTokenizer

from bailong.tokenizer import JsonTokenizer
from bailong.training import SAMPLES


def test_extension_keeps_every_old_id_and_every_non_chinese_tokenization(tmp_path):
    """vocab extend on a tokenizer.json: merges continued on Chinese text, appended after the base's."""
    from bailong.vocab import main as vocab_main
    from bailong.vocab_bpe import byte_of
    from bailong.zip_tie import piece_ids
    base_file = bpe_folder(tmp_path / "base", vocab_size=500) / "tokenizer.json"
    out = tmp_path / "extended" / "tokenizer.json"
    vocab_main(["extend", "--base", str(base_file), "--corpus", str(SAMPLES / "zh_tw_sample.txt"),
                "--new-pieces", "120", "--out", str(out)])
    before, after = json.loads(base_file.read_text())["model"], json.loads(out.read_text())["model"]
    assert all(after["vocab"][t] == i for t, i in before["vocab"].items())  # every old id kept
    assert after["merges"][:len(before["merges"])] == before["merges"] and len(after["vocab"]) == 620
    base, ext = JsonTokenizer(base_file), JsonTokenizer(out, settings=JsonTokenizer(base_file).settings)
    english = (SAMPLES / "en_sample.txt").read_text()
    for text in [english, TEXTS[0], "😀🎉 — ñandú façade ∑∫ 𠮷", "Ünïcödé\ttabs  and   spaces\n"]:
        assert ext.encode(text) == base.encode(text)  # no CJK character: not one token changes
    for text in TEXTS:
        assert ext.decode(ext.encode(text)) == text
    assert len(ext.encode(TEXTS[1])) < len(base.encode(TEXTS[1]))
    (out.parent / "tokenizer_config.json").write_text((base_file.parent / "tokenizer_config.json").read_text())
    theirs = AutoTokenizer.from_pretrained(out.parent)  # transformers reads the written file alike
    for text in TEXTS:
        assert theirs(text).input_ids == ext.encode(text, bos=True)
    mapping = piece_ids(base, ext)  # zip-tie's sources: the base tokens of each new token's bytes
    assert sorted(mapping) == list(range(500, 620))
    lead = byte_of()
    for new_id, ids in mapping.items():
        assert "".join(base.tk.id_to_token(i) for i in ids) == ext.tk.id_to_token(new_id) and len(ids) >= 2
        assert lead[ext.tk.id_to_token(new_id)[0]] in range(0xE3, 0xEA)


def test_extension_keeps_the_special_tokens_ids_where_only_added_tokens_lists_them(tmp_path):
    """Llama 3's special tokens (128000 on) come after its BPE vocabulary and are listed only in added_tokens: the
    extension moved them to the new tokens' ids (the library renumbers added tokens over a gap in the vocabulary),
    so bos, eos and <|eot_id|> changed ids and shared them with new tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from bailong.vocab_bpe import extend_json
    zh = (SAMPLES / "zh_tw_sample.txt").read_text()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator([zh], trainers.BpeTrainer(vocab_size=500,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens(SPECIALS)  # after training, as Llama 3's: ids 500 to 504
    folder = tmp_path / "extended"
    folder.mkdir()
    text, added = extend_json(tk.to_str(), [zh], 40)
    (folder / "tokenizer.json").write_text(Tokenizer.from_str(text).to_str())  # as the extension saves it
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}))
    ours = JsonTokenizer(folder / "tokenizer.json")
    assert [ours.tk.token_to_id(t) for t in SPECIALS] == list(range(500, 505)) and len(added) == 40
    assert ours.vocab_size == 545 and (ours.bos_id, ours.eos_id) == (500, 501)
    theirs = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS + ["<|start_header_id|>user<|end_header_id|>臺灣<|eot_id|>"]:  # (in chat text, the ids)
        assert ours.encode_chat(text, {}) == theirs(text, add_special_tokens=False).input_ids
        assert ours.encode(text) == theirs(text, add_special_tokens=False, split_special_tokens=True).input_ids


def test_extension_refuses_what_it_cannot_extend(tmp_path, capsys):
    from bailong.errors import run_cli
    from bailong.vocab import main as vocab_main
    base = bpe_folder(tmp_path / "base") / "tokenizer.json"
    wordpiece = tmp_path / "wordpiece.json"
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(wordpiece))
    settings = tmp_path / "settings.json"  # the user's, with a "model" object: not a tokenizer --overwrite replaces
    settings.write_text('{"model": {"name": "llama-2-7b", "lr": 0.0002}}')
    from bailong.tokenizer import byte_tokenizer
    byte_tokenizer().save(tmp_path)
    spm_base = tmp_path / "tokenizer.model"
    corpus = str(SAMPLES / "zh_tw_sample.txt")
    for argv, expected in [
            (["--base", str(base), "--new-pieces", "5", "--out", str(settings), "--overwrite"],
             f"error: {settings}: already exists and is not a tokenizer; nothing was written"),
            (["--base", str(spm_base), "--new-pieces", "5", "--out", str(tmp_path / "c.json")],
             f"error: {tmp_path / 'c.json'}: extending {spm_base} makes a SentencePiece model (--out not ending in "
             ".json)"),
            (["--base", str(base), "--new-pieces", "5", "--out", str(tmp_path / "d.model")],
             f"error: {tmp_path / 'd.model'}: extending {base} makes a tokenizer.json (--out ending in .json)"),
            (["--base", str(wordpiece), "--new-pieces", "5", "--out", str(tmp_path / "a.json")],
             f"error: {wordpiece}: not a byte-level BPE tokenizer.json (model 'WordPiece')"),
            (["--base", str(base), "--new-pieces", "100000", "--out", str(tmp_path / "b.json")],
             "error: the corpus yields only "),
            (["--base", str(base), "--new-pieces", "5", "--out", str(base)],
             f"error: {base}: is the base tokenizer; --out must name a file apart from the inputs")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            run_cli(vocab_main, ["extend", "--corpus", corpus, *argv])
        assert exit_.value.code in (1, 2) and capsys.readouterr().err.startswith(expected)
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
    assert settings.read_text() == '{"model": {"name": "llama-2-7b", "lr": 0.0002}}'
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "d.model").exists()


def test_no_new_merge_makes_a_token_the_base_already_has():
    """Were a new merge to make an existing token, the base's own merges could go on from it, which the
    learner does not replay (and the pair could repeat a base merge, which would move its rank)."""
    from tokenizers import Tokenizer
    from bailong.vocab_bpe import learn_merges
    vocab = {c: i for i, c in enumerate("ãäåæç")}  # stand-ins of the bytes E3..E7, CJK lead bytes
    vocab.update({t: len(vocab) + i for i, t in enumerate(["äå", "ãä", "ãäå", "ãäåæ"])})
    base = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": ["ä å", "ã ä", "ãä å", "ãäå æ"]}}
    tk = Tokenizer.from_str(json.dumps(base, ensure_ascii=False))
    assert [t.value for t in tk.model.tokenize("ãäåç")] == ["ã", "äå", "ç"]  # the base stops short of ãäå
    merges = learn_merges(tk, ["ãäåç"] * 5 + ["ãäåæç"] * 4, 2)
    assert merges and all(a + b not in vocab for a, b in merges)


def test_every_cjk_script_is_learned_and_nothing_else(tmp_path):
    """Korean syllables whose first byte (0xEA) also begins Yi, half-width katakana and full-width letters (0xEF),
    ideographs past the first plane (0xF0): a merge is judged by the token it makes, not by its left token, which
    may hold that first byte alone (none of them was learned). English text takes no merge."""
    from tokenizers import Tokenizer

    from bailong.vocab_bpe import byte_of, learn_merges
    base = Tokenizer.from_file(str(bpe_folder(tmp_path / "base", vocab_size=500) / "tokenizer.json"))
    lead = byte_of()
    for text, made in [("대한민국 가게 공원 가방 게임 ", "가게"), ("ＡＢＣ１２３ ｶﾀｶﾅ ﾃｽﾄ ", "ｶﾀｶﾅ"),
                       ("𠮷野家 𠮷 𡈽 𠀀 ", "𠮷野家"), ("the quick brown fox ", None)]:
        merges = learn_merges(base, [text * 50], 40)
        tokens = [bytes(lead[c] for c in a + b).decode(errors="replace") for a, b in merges]
        assert made in tokens if made else not merges, (text, tokens)


def test_a_small_corpus_is_learned_from_whole_documents(tmp_path):
    """Only a corpus past LEARNED_FROM characters is cut into chunks for a draw: cut, a word at a chunk's edge
    lost the merges it would make."""
    from bailong.vocab import extend_tokenizer
    base = JsonTokenizer(bpe_folder(tmp_path / "base", vocab_size=500) / "tokenizer.json")
    _, added = extend_tokenizer(base, ["x" * 8191 + "丙丁。丙丁"], 3)
    assert "丙丁" in added
