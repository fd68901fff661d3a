"""python -m bailong.eval: perplexity per token and character, tokenizer efficiency, the bench and its judge."""
import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

import bailong
from bailong.errors import BailongError
from bailong.eval import bench, compare_tokenizers, perplexity
from conftest import asset


@pytest.fixture
def model_folder(tmp_path):
    from hf_models import write_hf
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32000, max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), folder / "tokenizer.model")
    return folder


def test_perplexity_and_bits_per_character(model_folder, tmp_path, capsys):
    """perplexity() returns its figures (a notebook's: it printed them too); the command prints them."""
    from bailong.errors import run_cli
    from bailong.eval import main
    text = tmp_path / "held.txt"
    text.write_text("臺灣的夜市很熱鬧。\nThe night market is busy.\n")
    result = perplexity(model_folder, text)
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["perplexity", "--model", str(model_folder), "--text", str(text)])
    assert exit_.value.code == 0 and capsys.readouterr().out == (
        f"34 characters: {result['loss_per_token']:.4f} nats per token (perplexity {result['perplexity']:.2f}), "
        f"{result['bits_per_char']:.4f} bits per character\n")
    model, tok = bailong.load(model_folder, device="cpu")
    nll, chars, tokens = 0.0, 0, 0
    with torch.no_grad():
        for line in ["臺灣的夜市很熱鬧。", "The night market is busy."]:
            ids = torch.tensor([tok.encode(line, bos=True)])
            nll -= model(ids)[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum().item()
            chars += len(line)
            tokens += len(tok.encode(line))
    assert result["bits_per_char"] == pytest.approx(nll / chars / math.log(2), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_perplexity_loads_a_checkpoint_in_its_own_dtype(model_folder, tmp_path, monkeypatch):
    """A bfloat16 checkpoint was measured in float32 on a CPU (a 7B one: 25 GiB, past a 24 GiB machine): its own
    dtype now, --dtype another."""
    from bailong import weights
    from bailong.eval import main
    model, _ = bailong.load(model_folder, device="cpu", dtype=torch.bfloat16)
    bailong.save(model, model_folder)
    (tmp_path / "held.txt").write_text("臺灣的夜市很熱鬧。\n")
    loaded, load = [], weights.load
    monkeypatch.setattr(weights, "load", lambda *args, **kwargs: loaded.append(load(*args, **kwargs)) or loaded[-1])
    for argv in [[], ["--dtype", "float32"]]:
        assert main(["perplexity", "--model", str(model_folder), "--text", str(tmp_path / "held.txt"), *argv]) == 0
    assert [m.lm_head.weight.dtype for m, _ in loaded] == [torch.bfloat16, torch.float32]


def test_a_text_longer_than_the_context_is_scored_token_by_token(tmp_path):
    """Windows of the context's length sharing one token: every token after the first scored once, with all the
    context before it in its window."""
    from hf_models import write_hf

    from bailong.eval import loss_per_char
    from bailong.tokenizer import byte_tokenizer
    folder, _ = write_hf(tmp_path, "gqa", max_position_embeddings=16)
    model, _ = bailong.load(folder, device="cpu")
    tokenizer, text = byte_tokenizer(), "abcdefghijklmnopqrstuvwxyz0123456789"
    ids = tokenizer.encode(text, bos=True)
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 15):
            window = torch.tensor([ids[start:start + 16]])
            nll -= model(window)[0, :-1].log_softmax(-1).gather(1, window[0, 1:, None]).sum().item()
    assert len(ids) > 32 and loss_per_char(model, tokenizer, [text]) == pytest.approx(nll / len(text), rel=1e-5)


def test_without_bos_every_token_is_scored_after_eos(tmp_path):
    """A tokenizer.json that begins no text with a bos: each text's first token went unscored, yet counted per
    token."""
    from hf_models import write_hf
    from bpe_models import bpe_folder
    tok_folder = bpe_folder(tmp_path / "tok")
    config = json.loads((tok_folder / "tokenizer_config.json").read_text())
    del config["bos_token"]
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=700, max_position_embeddings=256)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = json.loads((tok_folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**data, "post_processor": None}))
    lines = ["臺灣的夜市很熱鬧。", "The night market is busy."]
    (tmp_path / "held.txt").write_text("\n".join(lines) + "\n")
    result = perplexity(folder, tmp_path / "held.txt")
    model, tok = bailong.load(folder, device="cpu")
    assert tok.bos_id == -1 and tok.eos_id == 1
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([[tok.eos_id] + tok.encode(line)])
            nll -= model(ids)[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum().item()
            tokens += len(tok.encode(line))
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_tokenizer_efficiency(tmp_path):
    text = tmp_path / "zh.txt"
    text.write_text("臺灣的繁體中文\n")
    rows = compare_tokenizers(text, [str(asset("llama2-tokenizer/tokenizer.model"))])
    assert list(rows.values())[0] == pytest.approx(len(bailong.Tokenizer(
        asset("llama2-tokenizer/tokenizer.model")).encode("臺灣的繁體中文")) / 7)



def test_a_training_output_is_measured_with_its_tokenizer(tmp_path, capsys):
    """A training output's tokenizer is its adapter's grown vocabulary, as loading it gives (it was 'no
    tokenizer.model or tokenizer.json'), or its base's where it did not grow."""
    from train_runs import run_train
    text = tmp_path / "zh.txt"
    text.write_text("臺灣的繁體中文\n")
    found = []
    for pieces in ("20", "0"):
        run = tmp_path / f"run-{pieces}"
        run_train(capsys, "--steps", "1", "--new-pieces", pieces, "--out", run)
        found += compare_tokenizers(text, [str(run)]).values()
        assert found[-1] == list(compare_tokenizers(text, [str(run / ("base" if pieces == "0" else "adapter"))])
                                 .values())[0]
    assert found[0] < found[1]  # the grown vocabulary writes the text in fewer tokens than the bytes


class Judge(BaseHTTPRequestHandler):
    replies = []
    says = {}  # the judge's reply to its nth request, where not "Score: 7"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.replies.append(body)
        said = Judge.says.get(len(Judge.replies) - 1, "Score: 7")
        reply = {"choices": [{"message": {"content": said if "[Answer to grade]" in
                                          body["messages"][0]["content"] else "?"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_bench_with_a_judge_on_localhost(model_folder, tmp_path, capsys):
    server = HTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    questions = tmp_path / "bench.json"
    questions.write_text(json.dumps([{"category": "寫作", "turns": ["寫一句話", "再寫一句"]},
                                     {"category": "math", "turns": ["1+1?"]}], ensure_ascii=False))
    try:
        rows, scores = bench(model_folder, questions, tmp_path / "answers.jsonl",
                             judge_url=f"http://127.0.0.1:{server.server_port}/v1", max_new_tokens=4)
    finally:
        server.shutdown()
    assert scores == {"寫作": [7, 7], "math": [7]} and len(Judge.replies) == 3
    assert "Simplified Chinese" in Judge.replies[0]["messages"][0]["content"]
    saved = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [m["role"] for m in saved[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved[0]["scores"] == [7, 7] and saved[0]["judge_replies"] == ["Score: 7", "Score: 7"]
    assert [row["answered_by"] for row in saved] == [str(model_folder)] * 2
    assert "寫作" in capsys.readouterr().out
    Judge.says = {4: "I am sorry, but I cannot evaluate this content."}  # a refusal: that turn unscored, no more
    try:
        server = HTTPServer(("127.0.0.1", 0), Judge)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        rows, scores = bench(model_folder, questions, tmp_path / "refused.jsonl",
                             judge_url=f"http://127.0.0.1:{server.server_port}/v1", max_new_tokens=4)
    finally:
        server.shutdown()
        Judge.says = {}
    assert scores == {"寫作": [7], "math": [7]} and rows[0]["scores"] == [7, None]
    assert rows[0]["judge_replies"][1].startswith("I am sorry")
    assert f"1 answer(s) unscored: the judge's reply gave no plain score (each item's judge_replies in " \
           f"{tmp_path / 'refused.jsonl'} holds them)" in capsys.readouterr().out
    with pytest.raises(BailongError, match="the judge did not answer .*; 0 of the 2 items answered$"):
        bench(model_folder, questions, tmp_path / "a2.jsonl", judge_url="http://127.0.0.1:9/v1", max_new_tokens=2)
    assert not (tmp_path / "a2.jsonl").exists()
    questions.write_text(json.dumps([{"turns": ["1+1?"]}, {"turns": ["字" * 2000]}], ensure_ascii=False))
    with pytest.raises(BailongError, match="the context leaves room for .*; 1 of the 2 items answered, written to"):
        bench(model_folder, questions, tmp_path / "a4.jsonl", max_new_tokens=2)  # the answers so far are kept
    assert len((tmp_path / "a4.jsonl").read_text().splitlines()) == 1
    questions.write_text('[{"category": "x"}]')
    with pytest.raises(BailongError, match="item 0 needs"):
        bench(model_folder, questions, tmp_path / "a3.jsonl")


def test_a_judges_score_is_read_only_where_it_is_plain():
    """The prompt asks for "Score: N"; judges also write "**Score:** N", "N/10", "[[N]]" or a lone number. A reply
    with several numbers and no such form, or none (a refusal), is no score: the first number of a reply was taken
    ("on a scale from 0 to 10, ... 3" scored 0; "Out of 10 points I give it 7" scored 10)."""
    from bailong.eval import score_of
    replies = {"Score: 7": 7, "Score: 7/10": 7, "**Score:** 9": 9, "Score: **8**": 8, "Rating: [[6]]": 6, "7.5": 8,
               "分數：7": 7, "評分：8/10": 8, "I'd rate this 8 out of 10.": 8, "It has 2 problems. Score: 5": 5,
               "The score is 6.": 6, "Score: -3": 0, "Score: 12": 10, "6.5": 7,
               "On a scale from 0 to 10, this answer deserves 3.": None, "Out of 10 points I give it 7.": None,
               "I am sorry, but I cannot evaluate this content.": None, "8/100": None,
               "Score: 6 (clarity 9/10, accuracy 2/10)": 6, "Score: 8\n\nThe 2nd turn is 5/10 quality": 8,
               "Score (0-10): 7": 7, "Score [0-10]: 8": 8, "score: 0-10 scale, 7": None}
    assert {reply: score_of(reply) for reply in replies} == replies


def test_the_judge_sees_what_the_model_saw(model_folder, tmp_path, monkeypatch):
    """Turns too long for the context together: the model's prompt leaves out the oldest, and so does what the
    judge is shown (it was shown the whole history, turns the model never saw)."""
    import bailong.eval as module
    seen = []
    monkeypatch.setattr(module, "judge", lambda url, model, conversation, answer, api_key=None:
                        seen.append([m["content"] for m in conversation]) or (5, "Score: 5"))
    questions = tmp_path / "bench.json"
    questions.write_text(json.dumps([{"turns": ["word " * 60 + str(i) for i in range(4)]}]))
    bench(model_folder, questions, tmp_path / "answers.jsonl", judge_url="http://judge", max_new_tokens=4)
    assert [len(s) for s in seen][0] == 1 and any(len(s) < 2 * i + 1 for i, s in enumerate(seen))
    assert all(s[-1].endswith(str(i)) for i, s in enumerate(seen))  # each ends with the turn answered


def test_sigterm_during_a_bench_keeps_the_items_answered(model_folder, tmp_path, monkeypatch):
    """A job scheduler's stop wrote nothing; Ctrl-C kept the items answered, and now SIGTERM does too."""
    from bailong import conversation
    from bailong.errors import Terminated
    generate_, calls = conversation.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Terminated
        return generate_(*args, **kwargs)
    monkeypatch.setattr(conversation, "generate", generate)
    questions = tmp_path / "bench.json"
    questions.write_text(json.dumps([{"turns": ["one"]}, {"turns": ["two"]}, {"turns": ["three"]}]))
    with pytest.raises(Terminated):
        bench(model_folder, questions, tmp_path / "answers.jsonl", max_new_tokens=2)
    assert [json.loads(line)["turns"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()] == [["one"]]
    earlier, calls[:] = (tmp_path / "answers.jsonl").read_text(), []  # cut short again: beside the file, not over it
    with pytest.raises(Terminated):
        bench(model_folder, questions, tmp_path / "answers.jsonl", max_new_tokens=2, overwrite=True)
    assert (tmp_path / "answers.jsonl").read_text() == earlier
    assert [json.loads(line)["turns"] for line in (tmp_path / "answers.partial.jsonl").read_text().splitlines()] == [
        ["one"]]
