"""Vocabulary extension on the real Llama 2 tokenizer, against SentencePiece and transformers."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm
from transformers import LlamaTokenizer

from bailong.errors import BailongError
from bailong.tokenizer import Tokenizer
from bailong.vocab import learning_message, main as vocab_main
from bailong.data import read_corpus, split
from bailong.training import SAMPLES, TrainConfig
from conftest import ROOT, asset
from train_runs import run_train

SAMPLE = SAMPLES / "zh_tw_sample.txt"
TEXTS = {
    "traditional chinese": "臺灣的夜市有蚵仔煎和滷肉飯，颱風天學校停課。鬱鬱蔥蔥的山谷裡，爺爺慢慢泡著高山烏龍茶。",
    "english": "The quick brown fox jumps over the lazy dog; 42 apples cost $3.50 (really).",
    "mixed": "Llama 2 把臺灣說成 three bytes 一個字, isn't it 奇怪?",
    "emoji and rare": "😀🎉 𠮷野家 ㄅㄆㄇㄈ 龘 ∑∫ — ñandú façade",
}


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    base = asset("llama2-tokenizer/tokenizer.model")
    out = tmp_path_factory.mktemp("vocab") / "tokenizer.model"
    before = base.read_bytes()
    vocab_main(["extend", "--base", str(base), "--corpus", str(SAMPLE), "--new-pieces", "600", "--out", str(out)])
    assert base.read_bytes() == before  # the base is never modified
    return Tokenizer(base), Tokenizer(out), out


def test_the_most_frequent_new_characters_come_first():
    """With room for fewer new characters than the corpus has, the most frequent are taken: each saves the most
    tokens."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from bailong.tokenizer import byte_tokenizer
    from bailong.vocab import extend_proto
    trained = pb.ModelProto()
    for char in "臺灣中":
        trained.pieces.add(piece=char, score=0.0, type=pb.ModelProto.SentencePiece.NORMAL)
    for room, expected in [(1, ["灣"]), (2, ["灣", "中"])]:
        assert extend_proto(byte_tokenizer().proto(), trained, room, {"臺": 1, "灣": 5, "中": 3})[1] == expected


VIETNAMESE = ["Học sinh được nghỉ hè từ tháng sáu đến tháng tám.",
              "Thành phố Hồ Chí Minh là trung tâm kinh tế lớn nhất.",
              "Bà ngoại kể chuyện cổ tích cho các cháu nghe mỗi tối.", "Sông Mê Kông chảy qua nhiều tỉnh ở miền Tây.",
              "Người Việt thường ăn Tết Nguyên Đán vào đầu năm âm lịch.", "Chúng tôi đã học tiếng Anh được ba năm rồi.",
              "Hà Nội là thủ đô của nước Việt Nam.", "Tôi thích ăn phở bò và uống cà phê sữa đá vào buổi sáng."]


def test_cjk_is_the_same_characters_for_both_kinds_of_tokenizer():
    """Chinese, Japanese and Korean text's characters, corner brackets and Hangul among them (「臺灣」 was no CJK
    piece); a byte-level token holding only a character's first bytes counts where every character they may
    begin is CJK."""
    from bailong.vocab import is_cjk
    from bailong.vocab_bpe import starts_cjk
    cjk, other = "臺灣「」『』《》【】〜〃，。！？：ｶﾞ｡⼈㊣한글ㄱㄅ\u3000𠮷Ａ", "aé€😀ـกไทยहिन्दी\u200d"
    for char in cjk + other:
        assert is_cjk(char) == starts_cjk(char.encode()) == (char in cjk), char
    assert is_cjk("▁「臺灣」") and not is_cjk("▁") and not is_cjk("臺a")
    assert starts_cjk("臺".encode()[:1]) and starts_cjk("한".encode()[:1]) and starts_cjk("𠮷".encode()[:2])
    assert not starts_cjk("，".encode()[:1]) and not starts_cjk("😀".encode()[:2]) and not starts_cjk("臺".encode()[1:])


def test_a_piece_the_extended_model_never_makes_gives_its_place_to_the_next():
    """BPE makes a piece only by merging two it has: a piece trained through pieces the base lacks, or whose
    text the base's merges take another way, was an embedding row no text reaches (34 of 300 on decomposed
    Vietnamese)."""
    import random
    import unicodedata

    from sentencepiece import sentencepiece_model_pb2 as pb

    from bailong.tokenizer import byte_tokenizer
    from bailong.vocab import extend_proto, extend_tokenizer
    trained = pb.ModelProto()
    for piece, score in [("臺", 0.0), ("臺灣臺", -1.0), ("臺臺", -2.0)]:  # neither 臺灣 nor 灣臺 is a piece
        trained.pieces.add(piece=piece, score=score, type=pb.ModelProto.SentencePiece.NORMAL)
    assert extend_proto(byte_tokenizer().proto(), trained, 2, {"臺": 1})[1] == ["臺", "臺臺"]
    rng = random.Random(0)
    texts = [unicodedata.normalize("NFD", " ".join(rng.choices(VIETNAMESE, k=6))) for _ in range(100)]
    base = Tokenizer(asset("llama2-tokenizer/tokenizer.model"))
    extended, added = extend_tokenizer(base, texts, 300, cjk_only=False)
    plain = extended.proto()
    plain.normalizer_spec.add_dummy_prefix = False
    made = spm.SentencePieceProcessor(model_proto=plain.SerializeToString()).encode(
        [piece.replace("\u2581", " ") for piece in added])
    assert len(added) == 300 and made == [[i] for i in range(32000, 32300)]


def test_every_script_still_leaves_line_feeds_tabs_and_spaces_to_the_base():
    """--all-pieces learned "\\n", "\\t", ".\\n\\n" from documents holding them: English text's lines, and the chat
    format's, then read otherwise than the base model learned them (its byte for a line feed)."""
    import random

    from bailong.vocab import extend_tokenizer
    base = Tokenizer(asset("llama2-tokenizer/tokenizer.model"))
    rng = random.Random(0)
    texts = ["\n\n".join(f"{' '.join(rng.choices(VIETNAMESE, k=5))}.\t{rng.randint(0, 9)}\u3000end." for _ in range(8))
             for _ in range(60)]
    extended, added = extend_tokenizer(base, texts, 100, cjk_only=False)
    assert added and not [p for p in added if any(c in p for c in "\n\t\u3000")], added
    assert extended.encode("Hello world.\n\nNew\tline") == base.encode("Hello world.\n\nNew\tline")


def test_the_pieces_a_report_shows_are_readable():
    from bailong.vocab import shown
    assert [shown(p) for p in ["臺灣", " đ", "\u031b", "\u0301c", "\ufe0f\u200d", "\u3000", " \u0300", "\u2028"]] == \
        ["臺灣", "▁đ", "◌\u031b", "◌\u0301c", "◌\ufe0f<U+200D>", "<U+3000>", "▁◌\u0300", "<U+2028>"]


def test_pieces_are_learned_from_a_seeded_draw_of_a_large_corpus(monkeypatch):
    """SentencePiece's trainer holds about 24 bytes a byte of what it is given: a 10 GB corpus would take 240
    GB, so pieces are learned from about LEARNED_FROM characters of a larger one, drawn by chunk with a seed."""
    from bailong import vocab
    texts = ["臺灣的夜市" * 4000, "long enough " * 1000] * 50  # 1.6 million characters, chunks of 8,192
    assert vocab.chunked(texts, most=10**7) == [t[i:i + vocab.CHUNK] for t in texts for i in range(0, len(t),
                                                                                                 vocab.CHUNK)]
    drawn = vocab.chunked(texts, most=400_000)
    assert drawn == vocab.chunked(texts, most=400_000) and 250_000 < sum(map(len, drawn)) < 550_000
    monkeypatch.setattr(vocab, "LEARNED_FROM", 400_000)
    assert "learning 5 new pieces from a seeded draw of about 400,000 of its 1,600,000 characters" in \
        vocab.learning_message(5, texts)


LEARNING = """
import random
from bailong.tokenizer import byte_tokenizer
from bailong.vocab import LLAMA_TRAINER, extend_tokenizer
LLAMA_TRAINER["num_threads"] = 2  # (with many threads the trainer keeps less of what it took, and gives less back)
def resident(key):  # MiB: VmRSS now, VmHWM the most so far
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024
random.seed(0)
chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
texts = ["".join(random.choices(chars, k=500)) for _ in range(2000)]
before = resident("VmRSS")
extend_tokenizer(byte_tokenizer(), texts, 300, say=lambda *a: None)
print(before, resident("VmHWM"), resident("VmRSS"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory in /proc (Linux)")
@pytest.mark.skipif("malloc" in os.environ.get("LD_PRELOAD", ""), reason="another allocator than glibc's is loaded")
def test_the_memory_the_learning_took_is_given_back():
    """SentencePiece's trainer takes about 24 bytes a byte of its text; what it freed stayed the process's, held
    through a whole training run after it (10 million characters: 1.5 GB resident while training, 0.6 GB
    without the learning). A million characters here: 200 of the 300 MB it took were still held before, 17
    after."""
    run = subprocess.run([sys.executable, "-c", LEARNING], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    before, peak, after = map(float, run.stdout.split())
    assert peak - before > 100, (before, peak)  # the learning took memory
    assert after - before < 0.25 * (peak - before), (before, peak, after)


def test_a_decomposed_corpus_is_warned_of(tmp_path, capsys):
    """Pieces learned on decomposed text (NFD) cut its tokens, but not those of the composed text people type."""
    import unicodedata
    base = asset("llama2-tokenizer/tokenizer.model")
    for form, warned in [("NFC", False), ("NFD", True)]:
        corpus = tmp_path / f"{form}.txt"
        corpus.write_text("\n".join(unicodedata.normalize(form, s) for s in VIETNAMESE * 3) + "\n")
        vocab_main(["extend", "--base", str(base), "--corpus", str(corpus), "--new-pieces", "20", "--all-pieces",
                    "--out", str(tmp_path / f"{form}.model")])
        said = "warning: 22 of 22 documents are not in Unicode's composed form (NFC), as text is typed"
        assert (said in capsys.readouterr().out) == warned, form
    hindi = ["\u0958\u093e\u095e\u0940 \u095b\u093f\u0902\u0926\u0917\u0940"]  # क़ाफ़ी ज़िंदगी: NFC spells क़ in two
    assert "warning" not in learning_message(5, hindi)


def test_a_script_the_base_spells_well_is_trained_again_for_enough_new_pieces(monkeypatch):
    """Most pieces trained on a Latin script are the base's own already: the trainer, sized for Chinese, gave
    484 new ones where 800 were asked and 5,158 were there."""
    import random

    from bailong import vocab
    base = Tokenizer(asset("llama2-tokenizer/tokenizer.model"))
    words = [p[1:] for p in map(base.sp.id_to_piece, range(32000)) if p[0] == "\u2581" and p[1:].isalpha()
             and p[1:].isascii()]
    rng = random.Random(0)
    texts = [" ".join(rng.choices(words, [1 / (i + 1) for i in range(len(words))], k=150)) for _ in range(900)]
    sizes, train = [], vocab.train_bpe
    monkeypatch.setattr(vocab, "train_bpe", lambda texts, size: sizes.append(size) or train(texts, size))
    said = []
    _, added = vocab.extend_tokenizer(base, texts + VIETNAMESE, 800, cjk_only=False, say=said.append)
    assert len(added) == 800 and len(sizes) > 1
    assert said[0] == f"vocabulary: {said[0].split()[1]} new pieces among the {sizes[0]:,} learned; learning " \
                      f"{sizes[1]:,}..." and len(said) == len(sizes) - 1


def test_old_ids_keep_their_pieces_and_text_round_trips(extended):
    base, ext, _ = extended
    assert ext.vocab_size == 32600
    assert all(base.sp.id_to_piece(i) == ext.sp.id_to_piece(i) for i in range(32000))
    for name, text in TEXTS.items():
        assert ext.decode(ext.encode(text)) == text, name


def test_english_is_unchanged_and_chinese_shorter(extended, capsys):
    base, ext, _ = extended
    assert ext.encode(TEXTS["english"]) == base.encode(TEXTS["english"])
    chinese = read_corpus([SAMPLE])
    ratio = sum(len(ext.encode(t)) for t in chinese) / sum(len(base.encode(t)) for t in chinese)
    held_out = len(ext.encode(TEXTS["traditional chinese"])) / len(base.encode(TEXTS["traditional chinese"]))
    with capsys.disabled():
        print(f"\n600 new pieces: corpus needs {ratio:.2f}x the tokens, unseen Chinese text {held_out:.2f}x")
    assert ratio < 0.5 and held_out < 0.8


def test_sentencepiece_and_transformers_read_the_extended_model_alike(extended, tmp_path):
    """The new pieces' scores fall strictly, below every base piece's: Llama 2's lowest is -1e9, where float32
    steps by 64, and scores written as lowest - 1 - i tied in runs of 64 (the first with the base's whitespace
    pieces), which transformers' reader ordered otherwise than SentencePiece (one corpus line of 54 differed)."""
    base, ext, path = extended
    scores = [ext.sp.get_score(i) for i in range(32000, ext.vocab_size)]
    lowest = min(base.sp.get_score(i) for i in range(32000) if base.sp.is_unknown(i) + base.sp.is_control(i) +
                 base.sp.is_byte(i) == 0)
    assert lowest == -1e9 and lowest > scores[0] and all(a > b for a, b in zip(scores, scores[1:]))
    shutil.copy(path, tmp_path / "tokenizer.model")
    theirs = LlamaTokenizer.from_pretrained(tmp_path)
    plain = spm.SentencePieceProcessor(model_file=str(path))
    assert len(theirs) == ext.vocab_size
    for name, text in [*TEXTS.items(), *enumerate(read_corpus([SAMPLE]))]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == plain.encode(text) == ext.encode(text), name


def test_bad_input(tmp_path, capsys):
    from bailong.errors import run_cli
    base = asset("llama2-tokenizer/tokenizer.model")

    def error(*argv):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            run_cli(vocab_main, ["extend", "--base", str(base), "--out", str(tmp_path / "out.model"), *argv])
        assert exit_.value.code == 1
        return capsys.readouterr().err.strip()

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "the corpus is empty" in error("--corpus", str(empty), "--new-pieces", "5")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("臺灣 café".encode() + "café".encode("latin-1"))
    assert f"{latin1}: not UTF-8 text (byte 15" in error("--corpus", str(latin1), "--new-pieces", "5")
    assert re.search(r"the corpus yields only (\d+) new CJK pieces; --new-pieces asks for 100000 \(add text, or "
                     r"ask for at most \1; --all-pieces adds those of every script\)$",
                     error("--corpus", str(SAMPLE), "--new-pieces", "100000").strip())
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "臺灣"}\n{"body": 1}\n')
    assert f"{bad_jsonl}:2: expected a JSON object" in error("--corpus", str(bad_jsonl), "--new-pieces", "5")
    not_sp = tmp_path / "not.model"
    not_sp.write_bytes(b"\x00\x01 this is no protobuf \xff" * 10)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(vocab_main, ["extend", "--base", str(not_sp), "--corpus", str(SAMPLE), "--new-pieces", "5",
                             "--out", str(tmp_path / "o.model")])
    assert f"{not_sp}: not a SentencePiece model" in capsys.readouterr().err
    copy = tmp_path / "base.model"
    shutil.copy(base, copy)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(vocab_main, ["extend", "--base", str(copy), "--corpus", str(SAMPLE), "--new-pieces", "5",
                             "--out", str(copy)])
    assert "base.model: is the base tokenizer; --out must name a file apart from the inputs" in capsys.readouterr().err
    assert copy.read_bytes() == base.read_bytes()
    assert not (tmp_path / "out.model").exists()
    with pytest.raises(BailongError, match="missing: no such file or folder"):
        read_corpus([tmp_path / "missing"])


def test_train_py_extends_only_what_vocab_extend_does_and_a_folder_names_its_tokenizer(tmp_path, capsys):
    """train.py's path (extend_tokenizer) refuses a Unigram model as `vocab extend` does (its scores are
    log-probabilities: appended pieces got arbitrary ones); --base may name a model folder; a report without
    held-out text says what it measured."""
    from bailong.tokenizer import byte_tokenizer
    from bailong.vocab import extend_tokenizer
    proto = byte_tokenizer().proto()
    proto.trainer_spec.model_type = proto.trainer_spec.UNIGRAM
    with pytest.raises(BailongError, match="a UNIGRAM model; extension supports BPE models"):
        extend_tokenizer(Tokenizer(model_proto=proto.SerializeToString()), read_corpus([SAMPLE]), 5)
    (tmp_path / "model").mkdir()
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), tmp_path / "model")
    vocab_main(["extend", "--base", str(tmp_path / "model"), "--corpus", str(SAMPLE), "--new-pieces", "5",
                "--held-out", "0", "--out", str(tmp_path / "new.model")])
    assert "training (nothing held out) text (1,990 characters)" in capsys.readouterr().out
    assert Tokenizer(tmp_path / "new.model").vocab_size == 32005
    # the report's held-out text is train.py's default draw, not the corpus's last documents (all English here)
    from bailong.data import split
    corpus = [SAMPLE, SAMPLES / "en_sample.txt"]
    vocab_main(["extend", "--base", str(tmp_path / "model"), "--corpus", *map(str, corpus), "--new-pieces", "5",
                "--out", str(tmp_path / "mixed.model")])
    held = split(read_corpus(corpus), 0.1, 0)[1]
    assert f"held-out text ({sum(map(len, held)):,} characters)" in capsys.readouterr().out
    assert any("\u4e00" <= c <= "\u9fff" for c in "".join(held))


def test_the_vocabulary_is_learned_from_the_training_share_only(tmp_path, capsys, monkeypatch):
    """The held-out loss measures text the run never saw, its new pieces included."""
    from bailong import vocab
    from bailong.data import data_paths, read_corpus
    learned_from, extend = [], vocab.extend_tokenizer
    monkeypatch.setattr(vocab, "extend_tokenizer",
                        lambda tokenizer, items, *rest: learned_from.append(items) or extend(tokenizer, items, *rest))
    run_train(capsys, "--steps", "1", "--new-pieces", "20", "--out", tmp_path / "run")
    config = TrainConfig()
    trained, held = split(read_corpus(data_paths(config.data)), config.held_out, config.seed)
    assert list(map(list, learned_from)) == [list(trained)] and held and not set(held) & set(trained)


def test_a_language_without_cjk_characters_takes_all_pieces(tmp_path, capsys):
    """New pieces are CJK ones by default (Traditional Chinese beside English); another language's corpus is told
    how to keep its own, and --all-pieces keeps them."""
    from bailong.tokenizer import open_tokenizer
    from bailong.training import SAMPLES
    english = ["--data", SAMPLES / "en_sample.txt", "--steps", "1", "--new-pieces", "20"]
    _, stderr = run_train(capsys, *english, "--out", tmp_path / "cjk", code=1)
    assert "error: the corpus yields no new CJK pieces; --new-pieces asks for 20 (add text; --all-pieces adds " \
           "those of every script)" in stderr
    assert not (tmp_path / "cjk").exists()
    stdout, _ = run_train(capsys, *english, "--all-pieces", "--out", tmp_path / "all")
    assert "vocabulary: +20 pieces" in stdout
    tokenizer = open_tokenizer(tmp_path / "all" / "adapter")
    added = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size - 20, tokenizer.vocab_size)]
    assert all(piece.replace("\u2581", "").isascii() for piece in added), added
    _, stderr = run_train(capsys, "--stage", "sft", "--all-pieces", "--out", tmp_path / "sft", code=2)
    assert "--all-pieces is for --stage pretrain" in stderr
