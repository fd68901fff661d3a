"""chat.py end to end: one-shot answers, the interactive loop, at a terminal too (what stops an answer or a
chat: tests/test_chat_stops.py)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from hf_models import write_hf

import bailong
import chat
from bailong.chat_template import llama2_turns
from bailong.generation import Sampling, generate
from conftest import ROOT, asset

GREEDY = ["--temperature", "0", "--top-k", "0", "--top-p", "1", "--repetition-penalty", "1"]


def run_chat(*args, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_prompt_answers_once_with_the_streamed_greedy_reply(tmp_path, capsys):
    tokenizer_file = asset("llama2-tokenizer/tokenizer.model")
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32000, max_position_embeddings=256)
    shutil.copy(tokenizer_file, folder / "tokenizer.model")
    chat.main([str(folder), "--prompt", "臺灣 hello", "--system", "be brief", "--max-new-tokens", "25",
               "--device", "cpu", *GREEDY])
    printed = capsys.readouterr().out
    model, tok = bailong.load(folder, device="cpu")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "臺灣 hello"}]
    prompt = [i for p, a in llama2_turns(tok, messages) for i in p + a]
    greedy = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    expected = [i for i in generate(model, prompt, 25, greedy) if i != tok.eos_id]
    assert printed == tok.decode(expected) + "\n"


def test_preset_demo_runs_from_the_command_line():
    result = run_chat("--preset", "tiny", "--prompt", "Hello 你好", "--max-new-tokens", "20", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "[20 tokens," in result.stderr and result.stdout.strip()


def test_quantized_model_chats(tmp_path, capsys):
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32000, max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), folder / "tokenizer.model")
    # (seeded, as every test here that counts tokens: a random model's unseeded sampling may draw its eos early)
    chat.main([str(folder), "--quantize", "nf4", "--prompt", "hi", "--max-new-tokens", "5", "--device", "cpu",
               "--seed", "0"])
    assert "model memory:" in capsys.readouterr().err
    result = run_chat("--preset", "tiny", "--quantize", "nf4", "--prompt", "hi", "--max-new-tokens", "5", "--seed", "0")
    assert result.returncode == 0 and "[5 tokens," in result.stderr, result.stderr


def test_interactive_loop_ends_on_exit_command_and_on_end_of_input():
    # (seeded: the random model's unseeded sampling drew its eos after one token now and then)
    result = run_chat("--preset", "tiny", "--max-new-tokens", "5", "--seed", "0",
                      stdin="hi\n\nagain\n/exit\nnever read\n")
    assert result.returncode == 0 and result.stderr.count("[5 tokens,") == 2, result.stderr
    result = run_chat("--preset", "tiny", "--max-new-tokens", "5", stdin="hi\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr


def test_a_message_longer_than_the_context_is_an_error_not_a_crash():
    result = run_chat("--preset", "tiny", "--prompt", "x" * 400)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: the message is")


def test_a_line_that_is_not_utf8_is_an_error_and_the_chat_goes_on():
    """Bytes that are not UTF-8 (a terminal in Latin-1), read with surrogate escapes or strictly: one line, and the
    conversation goes on (SentencePiece's encode ended it in a traceback); in --prompt, a usage error."""
    for encoding in ({}, {"PYTHONIOENCODING": "utf-8"}):
        result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--preset", "tiny", "--max-new-tokens", "5",
                                 "--seed", "0"], input=b"caf\xe9\nhi\n/exit\n", capture_output=True, timeout=120,
                                env={**os.environ, **encoding})
        err = result.stderr.decode()
        assert result.returncode == 0 and "error: the line is not UTF-8 text" in err, err
        assert err.count("[5 tokens,") == 1 and "Traceback" not in err
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--preset", "tiny", "--prompt", b"caf\xe9"],
                            capture_output=True, timeout=120)
    assert result.returncode == 2 and b"error: --prompt is not UTF-8 text" in result.stderr, result.stderr


def test_an_answer_cut_by_the_context_says_so(capsys):
    from bailong.conversation import Chat
    model, tokenizer = bailong.load_preset("tiny", device="cpu")
    conversation = Chat(model, tokenizer, None, Sampling(temperature=0), 100_000)
    conversation.stop_ids = set()  # nothing ends the answer but the context
    conversation.answer("hi", stream=False)
    assert capsys.readouterr().err.endswith("; cut at the context's 256 tokens]\n")
    conversation.max_new_tokens = 5
    conversation.answer("hi", stream=False)
    assert "cut" not in capsys.readouterr().err


def test_model_without_tokenizer_needs_one(tmp_path, capsys):
    folder, _ = write_hf(tmp_path, "gqa")
    from test_weights import cli_error
    assert f"{folder}: no tokenizer.model or tokenizer.json; pass --tokenizer FILE" in cli_error(capsys, folder)


def test_chat_with_a_peft_adapter(tmp_path, capsys):
    from test_lora import make_peft_adapter
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32000, max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), folder / "tokenizer.model")
    make_peft_adapter(folder, tmp_path / "adapter", targets=["q_proj", "v_proj"])
    chat.main([str(folder), "--adapter", str(tmp_path / "adapter"), "--prompt", "臺灣", "--max-new-tokens", "8",
               "--device", "cpu", *GREEDY])
    printed = capsys.readouterr().out
    model, tok = bailong.load(folder, device="cpu", adapter=tmp_path / "adapter")
    prompt = [i for p, a in llama2_turns(tok, [{"role": "user", "content": "臺灣"}]) for i in p + a]
    greedy = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    assert printed == tok.decode([i for i in generate(model, prompt, 8, greedy) if i != tok.eos_id]) + "\n"
    assert "warning" not in capsys.readouterr().err  # PEFT's adapter names no base to compare with


def test_an_adapter_on_another_base_of_its_shape_is_warned_about(tmp_path, capsys, monkeypatch):
    """An adapter says which base it was trained on (a fingerprint of its first layer's stored weights, in the
    adapter file's metadata, which PEFT ignores); applied to another base of the same shape, which loads
    without complaint, it warns."""
    import warnings

    import torch
    from train_runs import run_train

    from bailong.errors import BailongWarning
    from bailong.weights import save
    monkeypatch.chdir(tmp_path)
    run_train(capsys, "--steps", "1", "--eval-every", "1", "--new-pieces", "0", "--out", "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BailongWarning)
        for model in ("run", "run/checkpoints/step-0000001"):
            bailong.load(model, device="cpu")
        bailong.load("run/base", device="cpu", adapter="run/adapter")
    other, _ = bailong.load("run/base", device="cpu")
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0, 0] += 1
    save(other, tmp_path / "other")
    with pytest.warns(BailongWarning, match=f"^run/adapter: trained on another base than {tmp_path / 'other'} "):
        bailong.load(tmp_path / "other", device="cpu", adapter="run/adapter")


def test_a_chat_template_that_fails_on_a_conversation_is_one_error_and_the_chat_goes_on():
    import pytest

    from bailong.conversation import Chat
    from bailong.errors import BailongError
    model, tokenizer = bailong.load_preset("tiny", device="cpu")
    conversation = Chat(model, tokenizer, ("{{ messages[0].content.nope.deeper }}", {}), Sampling(temperature=0), 4)
    with pytest.raises(BailongError, match="the model's chat_template fails on this conversation"):
        conversation.answer("hi")
    assert conversation.messages == []  # the failed turn is not kept
    conversation = Chat(model, tokenizer, ("{{ messages[0].content + 1 }}", {}), Sampling(temperature=0), 4)
    with pytest.raises(BailongError, match=r"fails on this conversation \(TypeError: "):  # Python's error, not
        conversation.answer("hi")  # jinja2's: a traceback, from the end-of-turn search when the chat began
    conversation.template = ("{{ messages[-1].content }}", {})
    assert isinstance(conversation.answer("hi"), str) and len(conversation.messages) == 2


def test_the_history_is_kept_whole_while_the_prompt_holds_what_fits(monkeypatch, capsys):
    """/save wrote only the exchanges that still fit the context (the history itself was trimmed); the prompt
    is still the newest exchanges that fit, as fit_prompt chooses from the whole history. A system prompt too
    long alone is named, not the message."""
    from bailong import conversation as module
    from bailong.chat_template import fit_prompt
    from bailong.conversation import Chat
    model, tokenizer = bailong.load_preset("tiny", device="cpu")
    chat_ = Chat(model, tokenizer, None, Sampling(temperature=0), 8, system="S")
    prompts, generate_ = [], module.generate
    monkeypatch.setattr(module, "generate", lambda m, ids, *a, **k: prompts.append(ids) or generate_(m, ids, *a, **k))
    for turn in range(6):
        chat_.answer(f"{turn}: " + "long words " * 5, stream=False)
        whole = fit_prompt(chat_.encode, chat_.messages[:-1], 256 - 8)[0]
        assert prompts[-1] == whole and len(chat_.messages) == 1 + 2 * (turn + 1)
    assert chat_.dropped > 0 and chat_.messages[1]["content"].startswith("0: ")
    chat_.messages = [{"role": "system", "content": "S " * 300}]
    with pytest.raises(module.BailongError, match=r"the system prompt alone is \d+ tokens; the context leaves room"):
        chat_.answer("hi")


def test_an_output_that_cannot_hold_the_text_shows_it_replaced_not_a_traceback():
    """An ASCII (or cp1252, as Windows gives a redirected file) standard output: characters it cannot hold are
    shown as "?" (the answer ended in a UnicodeEncodeError traceback, and the chat with it)."""
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--preset", "tiny", "--prompt", "你好",
                             "--max-new-tokens", "50", "--seed", "0"], capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and b"?" in result.stdout and b"Traceback" not in result.stderr


def test_answers_to_an_output_that_cannot_hold_them_keep_every_character():
    """jsonl answers on an ASCII standard output: JSON's escapes, not "?" (the questions and answers were lost)."""
    question = {"messages": [{"role": "user", "content": "介紹台灣的夜市"}]}
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--preset", "tiny", "--input", "/dev/stdin",
                             "--max-new-tokens", "5", "--seed", "0"], input=json.dumps(question).encode(),
                            capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr[-500:]
    answered = json.loads(result.stdout)
    assert answered["messages"][0] == question["messages"][0]


def at_a_terminal(tmp_path, lines, env=None) -> list[str]:
    """The user's messages of a chat typed at a terminal (a pseudo-terminal), each line sent at the next prompt."""
    import pty
    import select
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--preset", "tiny", "--max-new-tokens", "2"],
                               stdin=follower, stdout=follower, stderr=follower, cwd=tmp_path, env=env)
    os.close(follower)
    try:
        for line in [*lines, "/save talk.jsonl\r", "/exit\r"]:
            seen = b""
            while not seen.endswith(b"> "):
                assert select.select([leader], [], [], 60)[0], seen
                seen += os.read(leader, 4096)
            os.write(leader, line.encode())
        assert process.wait(60) == 0
    finally:
        process.kill()
        os.close(leader)
    messages = json.loads((tmp_path / "talk.jsonl").read_text())["messages"]
    return [m["content"] for m in messages if m["role"] == "user"]


def test_at_a_terminal_the_up_arrow_brings_back_the_last_message(tmp_path):
    """Lines are edited through readline at a terminal: the up arrow and Enter send the last message again (without
    it, the escape sequence itself went as a message)."""
    pytest.importorskip("readline", reason="this Python has no readline")
    assert at_a_terminal(tmp_path, ["你好\r", "\x1b[A\r"]) == ["你好", "你好"]


def test_at_a_terminal_in_a_locale_not_utf8_chinese_is_kept(tmp_path):
    """Under LC_ALL=C Python reads UTF-8 still, but readline read each byte of 你好 as a Meta key and dropped it:
    there lines are read without it."""
    assert at_a_terminal(tmp_path, ["你好 abc\r"], {**os.environ, "LC_ALL": "C"}) == ["你好 abc"]
