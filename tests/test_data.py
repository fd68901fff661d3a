"""Training data: conversations and corpora read, split and packed (tokenized: test_token_cache.py)."""
import re

import pytest
import torch

from bailong.data import TokenData, read_conversations, read_corpus, split
from bailong.errors import BailongError
from bailong.training import SAMPLES


def test_conversations_are_read_from_a_folder_too(tmp_path):
    """As the README promises (a folder, or a Hub dataset id, which arrives as one): every jsonl below it."""
    (tmp_path / "more").mkdir()
    lines = (SAMPLES / "chats_sample.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:10]))
    (tmp_path / "more" / "b.jsonl").write_text("".join(lines[10:]))
    (tmp_path / "notes.txt").write_text("not conversations")
    assert list(read_conversations([tmp_path])) == list(read_conversations([SAMPLES / "chats_sample.jsonl"]))


def test_a_file_is_read_once_and_a_byte_order_mark_is_not_text(tmp_path):
    """A file named twice, or with its folder, is read once (twice, a held-out document would be trained on too);
    a file some editors save with a UTF-8 byte-order mark reads as without (its first line failed as JSON)."""
    chats = SAMPLES / "chats_sample.jsonl"
    (tmp_path / "chats.jsonl").write_bytes(b"\xef\xbb\xbf" + chats.read_bytes())
    (tmp_path / "text.txt").write_text('\ufefffirst\nsecond\n', encoding="utf-8")
    assert list(read_conversations([tmp_path / "chats.jsonl", tmp_path, tmp_path / "." / "chats.jsonl"])) == \
        list(read_conversations([chats]))
    assert list(read_corpus([tmp_path / "text.txt", tmp_path / "text.txt"])) == ["first", "second"]


def test_files_joined_with_cat_lose_each_byte_order_mark_and_suffixes_are_read_in_any_case(tmp_path):
    """Files saved with a byte-order mark and joined by cat: the later marks failed as JSON, or were text. A
    corpus named CORPUS.JSONL was read as text lines, its JSON syntax trained on (and in a folder left out)."""
    chats = SAMPLES / "chats_sample.jsonl"
    lines = chats.read_bytes().splitlines(keepends=True)
    (tmp_path / "chats.jsonl").write_bytes(b"".join(b"\xef\xbb\xbf" + line for line in lines))
    assert list(read_conversations(tmp_path / "chats.jsonl")) == list(read_conversations(chats))
    (corpus := tmp_path / "corpus").mkdir()
    (corpus / "TEXT.TXT").write_text("\ufefffirst\n\ufeffsecond\n", encoding="utf-8")
    (corpus / "docs.JSONL").write_text('{"text": "third"}\n', encoding="utf-8")
    assert list(read_corpus(corpus / "docs.JSONL")) == ["third"]
    assert sorted(read_corpus(corpus)) == ["first", "second", "third"]


def test_conversations_in_other_layouts_are_told_what_to_change(tmp_path):
    """ShareGPT's and Alpaca's layouts got the same line as broken JSON; content as a list of parts, or null,
    was refused by an assert (python -O took it out, and a traceback followed)."""
    import json
    cases = {'{"conversations": [{"from": "human", "value": "hi"}]}': "(ShareGPT's \"conversations\" of \"from\"",
             '{"instruction": "a", "input": "", "output": "b"}': "(Alpaca's instruction, input and output: make",
             json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                      {"role": "assistant", "content": "x"}]}):
                 'message 0\'s content is [{"type": "text", "text": "Hi"}], not a string (join its parts\' texts',
             json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}):
                 "message 1's content is null, not a string"}
    for line, said in cases.items():
        (tmp_path / "chats.jsonl").write_text(line + "\n")
        with pytest.raises(BailongError) as error:
            read_conversations([tmp_path / "chats.jsonl"])
        assert str(error.value).startswith(f"{tmp_path / 'chats.jsonl'}:1: ") and said in str(error.value)


def test_an_answer_of_weight_0_is_not_learned(tmp_path):
    """OpenAI's fine-tuning data mark an assistant message not to learn with "weight": 0: it was learned as any."""
    import json

    from bailong.chat_template import template_example, training_example
    from bailong.tokenizer import byte_tokenizer
    from test_tokenizer import ZEPHYR
    tokenizer = byte_tokenizer()
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bad", "weight": 0},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "good", "weight": 1}]
    for _, labels in (training_example(tokenizer, chat), template_example(tokenizer, (ZEPHYR, {"eos_token": "</s>"}),
                                                                          chat)):
        assert tokenizer.decode([i for i in labels if i != -100]).strip() == "good"
    import hashlib

    from bailong.token_cache import DOCUMENTS, tokenize
    _, labels, _ = tokenize(tokenizer, [chat], tmp_path, 1)  # not under a cache of before, which learned "bad"
    before = hashlib.sha256(tokenizer.serialized() + json.dumps([DOCUMENTS, None, [chat]], ensure_ascii=False)
                            .encode()).hexdigest()[:20]
    assert tokenizer.decode([i for i in labels if i != -100]).strip() == "good"
    assert not list(tmp_path.glob(f"tokens-{before}.*")) and len(list(tmp_path.glob("tokens-*.npy"))) == 3
    lines = {"weight 2": chat[:1] + [{**chat[1], "weight": 2}], "nothing to learn": chat[:2]}
    for what, messages in lines.items():
        (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
        with pytest.raises(BailongError, match="message 1's weight is 2, not 0 .an answer not to learn. or 1$"
                           if what == "weight 2" else "every answer has weight 0: nothing to learn$"):
            read_conversations([tmp_path / "chats.jsonl"])


def test_a_file_that_is_not_utf8_is_named_with_the_byte_where_it_fails(tmp_path):
    """The offset counts the file's bytes, a byte-order mark among them."""
    for name, data, byte, why in [("plain.txt", b"ab\xff", 2, "invalid start byte"),
                                  ("marked.txt", b"\xef\xbb\xbfab\xff", 5, "invalid start byte"),
                                  ("latin1.txt", b"caf\xe9\r\nnext\n", 3, "invalid continuation byte")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BailongError, match=rf"{name}: not UTF-8 text \(byte {byte}: {why}\)$"):
            read_corpus([tmp_path / name])
    (tmp_path / ".jsonl").write_text("text in a file named .jsonl, without a suffix\n")  # (named, not found)
    assert list(read_corpus([tmp_path / ".jsonl"])) == ["text in a file named .jsonl, without a suffix"]


def test_a_document_ends_only_at_a_line_feed_and_hidden_folders_are_left_out(tmp_path):
    """JSON lines may hold U+2028 (json.dumps(ensure_ascii=False) writes it as it is), which str.splitlines
    breaks at: such a line was refused as broken JSON, and a form feed split a text line in two. Hidden folders
    (a notebook's checkpoint copies) put held-out documents in training too; a .json file named itself is JSON
    lines, not text; a document empty as JSON is none."""
    import json
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "第一段\u2028第二段\x85"}, ensure_ascii=False) + "\r\n"
                                      + json.dumps({"text": "  "}) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("page one\x0cpage two\r\nnext\rthe same\n", encoding="utf-8")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "b-checkpoint.txt").write_text("a copy\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    assert list(read_corpus([tmp_path])) == ["第一段\u2028第二段\x85", "page one\x0cpage two", "next\rthe same"]
    (tmp_path / "c.json").write_text(json.dumps({"text": "臺灣"}) + "\n")
    assert list(read_corpus([tmp_path / "c.json"])) == ["臺灣"]
    chat = {"messages": [{"role": "user", "content": "a\u2028b"}, {"role": "assistant", "content": "c"}]}
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat, ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(read_conversations([tmp_path / "chats.jsonl"])) == [chat["messages"]]
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(BailongError, match=r"only: no .txt or .jsonl files in it \(it holds .parquet\)$"):
        read_corpus([tmp_path / "only"])


def test_half_a_character_in_json_is_named_not_a_traceback(tmp_path):
    """A JSON escape may hold a lone surrogate: the run's fingerprint, the tokenizer and vocab extend
    ended in tracebacks (the last after writing its --out)."""
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": "broken \\ud83d emoji"}\n')
    with pytest.raises(BailongError, match=r"a.jsonl:2: holds half a character \('\\ud83d', a lone surrogate\)"):
        read_corpus([tmp_path / "a.jsonl"])
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "\\udc00"}, '
                                      '{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(BailongError, match="c.jsonl:1: holds half a character"):
        read_conversations([tmp_path / "c.jsonl"])


def test_pretraining_documents_begin_with_bos_which_is_never_a_target(tmp_path):
    """Each document is bos, its tokens, eos, as a prompt begins; the stream's next tokens are the targets but
    bos, which no model is asked to write. A tokenizer without bos (id -1) begins them with nothing."""
    from bailong.token_cache import tokenize
    from bailong.tokenizer import Tokenizer, byte_tokenizer
    tok = byte_tokenizer()
    docs = ["第一篇。", "second one", "三"]
    ids, labels, offsets = tokenize(tok, docs, tmp_path, workers=1)
    assert labels is None and list(ids) == [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
    assert list(ids).count(tok.bos_id) == 3 and ids[0] == tok.bos_id
    data = TokenData(ids, labels, offsets, 8, tok.eos_id, bos=tok.adds_bos)
    inputs, targets = data.batch(range(data.n))
    stream = torch.tensor(ids[:data.n * 8 + 1], dtype=torch.long)
    assert torch.equal(inputs.flatten(), stream[:-1])
    assert torch.equal(targets.flatten(), torch.where(stream[1:] == tok.bos_id, -100, stream[1:]))
    assert (targets == -100).sum() == 2  # the second and third documents' bos; the first's is no one's target
    proto = tok.proto()
    proto.trainer_spec.bos_id = -1  # a SentencePiece model made without bos
    del proto.pieces[1]
    no_bos = Tokenizer(model_proto=proto.SerializeToString())
    assert no_bos.bos_id == -1 and no_bos.encode("三", bos=True, eos=True) == no_bos.encode("三") + [no_bos.eos_id]


def test_a_bos_that_is_also_the_eos_is_learned_where_it_ends_a_document():
    """A document's bos is no target by its place, not its id: a tokenizer whose bos is its eos (SmolLM2's
    <|endoftext|>) would otherwise never learn to end a document."""
    import numpy as np
    ids, offsets = np.array([2, 5, 6, 2, 2, 7, 8, 2]), np.array([0, 4, 8])  # 2 begins and ends each document
    _, targets = TokenData(ids, None, offsets, 7, bos=True).batch([0])
    assert targets.tolist() == [[5, 6, 2, -100, 7, 8, 2]]


def test_sft_examples_train_on_assistant_tokens_only():
    from bailong.chat_template import training_example
    from bailong.tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    chats = read_conversations([SAMPLES / "chats_sample.jsonl"])
    encoded = [training_example(tok, c) for c in chats[:3]]
    ids = [i for e, _ in encoded for i in e]
    labels = [i for _, lab in encoded for i in lab]
    offsets = [0]
    for e, _ in encoded:
        offsets.append(offsets[-1] + len(e))
    data = TokenData(torch.tensor(ids).numpy(), torch.tensor(labels).numpy(), torch.tensor(offsets).numpy(), 256,
                     pad_id=2)
    inputs, targets = data.example(0)
    kept = targets[targets != -100].tolist()
    answer = chats[0][1]["content"]
    assert kept == tok.encode(answer, eos=True)  # the assistant's tokens and its eos, nothing else
    assert inputs[:len(encoded[0][0]) - 1].tolist() == encoded[0][0][:-1]


def test_sft_data_whose_answers_all_begin_past_the_sequence_length_is_refused():
    """Fine-tuning on it trained on nothing (a loss of 0.0000 a step) and then blamed memorisation."""
    import numpy as np
    ids, labels, offsets = np.arange(40), np.array(([-100] * 15 + [1] * 5) * 2), np.array([0, 20, 40])
    with pytest.raises(BailongError, match="no answer of the training data begins within an example's 14 tokens"):
        TokenData(ids, labels, offsets, 14)  # an example's targets are its tokens 1 to 14
    assert (TokenData(ids, labels, offsets, 15).batch([0, 1])[1] != -100).sum() == 2


def test_sft_says_how_much_of_the_answers_lies_past_the_sequence_length():
    """Conversations longer than --seq-len lost their ends without a word (93% of the answer tokens of one
    dataset tried), and one whose answers all began past it was an example with no target: a step over such
    examples logged a loss of 0, and a held-out loss over them read 0.0000 and won."""
    import numpy as np
    labels = np.array([-100] * 4 + [1] * 6 + [-100] * 3 + [1] * 7 + [-100] * 9 + [1] + [-100] * 2 + [1] * 2)
    offsets = np.array([0, 10, 20, 30, 34])
    data = TokenData(np.arange(34), labels, offsets, 7)
    assert data.n == 3  # the third conversation's one answer token is its tenth: left out
    inputs, targets = data.batch(range(data.n))
    assert inputs[2].tolist() == [30, 31, 32, 33, 0, 0, 0]
    assert (targets != -100).sum(1).tolist() == [4, 5, 2]  # 2 answer tokens past each of the first two
    assert data.tokens([2, 0]) == 4 + 7 and data.tokens() == 7 + 7 + 4  # train.py's tokens/s: no padding
    assert data.cut == ("3 of 4 conversations of the training data are longer than 7 tokens; 1 whose answers all "
                        "begin past them are left out: 5 of the 16 answer tokens (31%) are never learned (raise "
                        "--seq-len to learn them)")
    whole = TokenData(np.arange(34), labels, offsets, 9)
    assert whole.cut == "" and whole.n == 4


def test_sft_counts_its_answers_a_block_of_tokens_at_a_time():
    """Which conversations have answers to learn, and how many of their answer tokens are cut, was counted over
    every token at once: 9 bytes a token (a cumulative count and its copy), 9 GB for an SFT set of a billion
    tokens. Counted a block at a time, the counts are the same whatever the block (a conversation longer than one
    too), and the memory is the block's."""
    import tracemalloc

    import numpy as np

    from bailong.data import _answer_tokens
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 40, 500))])
    labels = np.where(rng.random(offsets[-1]) < 0.4, 1, -100)
    firsts, ends = offsets[:-1] + 1, offsets[1:]
    kept = np.minimum(ends, offsets[:-1] + 17)
    before = np.concatenate([[0], np.cumsum(labels != -100)])
    expected = [before[kept] - before[firsts], before[ends] - before[firsts]]
    for block in (1, 7, 39, 40, 1000, 1 << 20):
        assert [c.tolist() for c in _answer_tokens(labels, offsets, firsts, (kept, ends), block)] == \
            [e.tolist() for e in expected]
    labels = np.full(20_000_000, -100, np.int32)  # 20 million tokens: 180 MB counted at once
    labels[1::1000] = 7
    offsets = np.arange(0, len(labels) + 1, 1000)
    tracemalloc.start()
    data = TokenData(labels, labels, offsets, 512)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert data.n == 20_000 and peak < 60e6, peak  # (260 MB before; 27 MB now)


def test_a_template_that_fails_names_the_conversation(tmp_path):
    """Among thousands of conversations, "fails on a conversation" said nothing of which."""
    from bailong.token_cache import tokenize
    from bailong.tokenizer import byte_tokenizer
    chats = read_conversations([SAMPLES / "chats_sample.jsonl"])
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    chats = [c for c in chats if c[0]["role"] == "system"]
    first = chats[0][1]["content"][:40]
    with pytest.raises(BailongError, match=f"the model's chat_template fails on the conversation whose first "
                                           f"question begins "
                                           f"{re.escape(repr(first))} \\("):
        tokenize(byte_tokenizer(), chats, tmp_path, 1, template)


def test_held_out_split_is_whole_documents_and_seeded():
    items = [f"document {i}" for i in range(20)]
    train, held = split(items, 0.1, seed=3)
    assert len(held) == 2 and sorted(train + held) == sorted(items) and split(items, 0.1, seed=3) == (train, held)
    assert split(items[:1], 0.5, 0) == (items[:1], [])


def test_files_of_conversations_and_bench_questions_read_as_data_files_do(tmp_path):
    """chat.py --output's own file holding U+2028 was "not a file of answers" to --overwrite (split where
    Python splits lines); a bench question with half a character ended in a traceback once the model loaded."""
    import json

    from bailong.files import is_answers
    from bailong.eval import read_bench
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"messages": [{"role": "user", "content": "a\u2028b"}], "answered_by": "m"},
                                  ensure_ascii=False) + "\n", encoding="utf-8")
    assert is_answers(answers)
    bench = tmp_path / "bench.json"
    bench.write_text('[{"turns": ["fine"]}, {"turns": ["hi \\ud800 there"]}]')
    with pytest.raises(BailongError, match=r"bench.json: item 1: holds half a character \('\\ud800'"):
        read_bench(bench)


def test_a_corpus_is_read_again_on_each_pass_as_a_list_of_its_documents_would_be(tmp_path):
    """A corpus was read whole into a list, held through learning pieces and tokenizing (a corpus larger than
    memory could not be trained on); now only where each document lies is kept, and each pass reads them again:
    the same documents, in the same order, by position, slice or chosen positions, and split the same."""
    import json

    import numpy as np
    (tmp_path / "a.txt").write_bytes("\ufeff第一行\r\n\n  \n second\x0cline \nlast without end".encode())
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False)
                                                for t in ["臺灣", " ", "x\u2028y", *map(str, range(20))]))
    expected = ["第一行", " second\x0cline ", "last without end", "臺灣", "x\u2028y", *map(str, range(20))]
    texts = read_corpus([tmp_path])
    assert len(texts) == len(expected) and list(texts) == expected and list(texts) == expected  # twice over
    assert (texts[0], texts[-1], texts[4], list(texts[1:4]), list(texts[np.array([5, 0])])) == \
        (expected[0], expected[-1], expected[4], expected[1:4], [expected[5], expected[0]])
    with pytest.raises(IndexError):
        texts[len(expected)]
    for held_out, seed in [(0.1, 0), (0.3, 5), (0, 0)]:
        assert [list(part) for part in split(texts, held_out, seed)] == list(split(expected, held_out, seed))
    assert list(read_conversations([SAMPLES / "chats_sample.jsonl"])[2:4]) == \
        [json.loads(line)["messages"] for line in (SAMPLES / "chats_sample.jsonl").read_text().splitlines()[2:4]]


def test_a_corpus_from_a_pipe_is_read_once_and_held(tmp_path):
    """A pipe (``--data <(zcat corpus.txt.gz)``) cannot be read twice: it is held, as every corpus was."""
    import os
    import threading
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("one\ntwo\n\nthree\n"))
    writer.start()
    texts = read_corpus([fifo])
    writer.join()
    assert list(texts) == ["one", "two", "three"] and list(split(texts, 0.5, 0)[1]) == split(list(texts), 0.5, 0)[1]


def test_a_corpus_changed_while_a_run_reads_it_is_refused(tmp_path, monkeypatch):
    """Each pass reads the files again: one changed since (rewritten, cut short, appended to), or while a pass reads
    it (in place, the same size, its time of change even set back), would give other documents than were checked
    and counted, and a token cache named after the text first read would hold the tokens of another: it is
    refused, naming the file, and nothing is cached."""
    import os
    import time

    from bailong import token_cache
    from bailong.tokenizer import byte_tokenizer
    corpus, text = tmp_path / "corpus.txt", "".join(f"document {i}\n" for i in range(3000))

    def written(change=lambda f: f.write(text)):
        with open(corpus, "r+" if corpus.exists() else "w") as f:
            change(f)
        os.utime(corpus, ns=(10**18, 10**18))  # (an old file's time: a change in the same clock tick as the
        # writing goes unseen)

    def in_place(f):
        f.write(text.replace("document", "DOCUMENT"))

    def times_kept(f):  # in place, its time of change set back, as `cp -p` or `touch -r` set it
        in_place(f)
        f.flush()
        os.utime(corpus, ns=(10**18, 10**18))

    for change in (lambda f: (f.truncate(0), f.write("uno\ndos\n")), lambda f: f.truncate(5),
                   lambda f: (f.seek(0, 2), f.write("four\n")), in_place, times_kept):
        written()
        texts = read_corpus([corpus])
        first = iter(texts)
        assert next(first) == "document 0"  # a pass begun
        time.sleep(0.05)  # (a tick of the file system's clock: the inode's time of change is seen to move)
        with open(corpus, "r+") as f:
            change(f)
        for rest in (first, texts):  # the pass that was reading it, and the next
            with pytest.raises(BailongError, match=f"^{re.escape(str(corpus))}: changed since it was read"):
                list(rest)
    written()
    encode, seen = token_cache._encode, []

    def encode_and_change(item):  # the file written over as tokenizing reads it
        if len(seen) == 10:
            with open(corpus, "r+") as f:
                in_place(f)
        seen.append(item)
        return encode(item)

    monkeypatch.setattr(token_cache, "_encode", encode_and_change)
    (tmp_path / "cache").mkdir()
    with pytest.raises(BailongError, match="changed since it was read"):
        token_cache.tokenize(byte_tokenizer(), read_corpus([corpus]), tmp_path / "cache", 1)
    assert len(seen) >= 3000 and not list((tmp_path / "cache").iterdir())  # (seen once the file was read)
