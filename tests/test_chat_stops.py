"""What stops an answer or a chat, and what goes on: Ctrl-C and SIGTERM (at the prompt, in an answer, while
answering a file, while torch loads), logits that are not finite, and the GPU's memory running out."""
import json
import re

import pytest

import bailong
import chat


@pytest.mark.parametrize("fault", ["KeyboardInterrupt", "Terminated", "FloatingPointError"])
def test_ctrl_c_while_answering_a_file_stops_it_and_keeps_the_answers_so_far(tmp_path, monkeypatch, capsys, fault):
    """Ctrl-C used to stop one answer, cut short and written as if whole, and the next question went on; SIGTERM
    (a job scheduler's stop) lost every answer; logits that are not finite end it in one line, the answers so far
    kept too. Answers cut short never replace the file --overwrite names (a whole batch's answers were lost to
    an empty file): they go beside it."""

    from bailong import conversation
    from bailong.errors import BailongError, Terminated
    fault = {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": Terminated}.get(fault, FloatingPointError)
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                                 for q in ("one", "two", "three")))
    generate_, calls = conversation.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise fault("the model's logits are not finite")
        return generate_(*args, **kwargs)
    monkeypatch.setattr(conversation, "generate", generate)
    argv = ["--preset", "tiny", "--input", str(questions), "--output", str(answers), "--max-new-tokens", "3"]
    earlier = None
    for overwrite, written in [([], answers), (["--overwrite"], tmp_path / "a.partial.jsonl"),
                               (["--overwrite"], tmp_path / "a.partial-2.jsonl")]:
        calls.clear()
        said = f"1 of the 3 conversations answered, written to {written}" + (
            f" ({answers} is as it was)" if overwrite else "")
        if fault is KeyboardInterrupt:
            assert chat.main(argv + overwrite) == 130 and f"interrupted: {said}\n" in capsys.readouterr().err
        elif fault is Terminated:
            with pytest.raises(Terminated):  # run_cli's exit 143, once the answers are written
                chat.main(argv + overwrite)
            assert f"terminated: {said}\n" in capsys.readouterr().err
        else:
            with pytest.raises(BailongError, match=f"not finite; {re.escape(said)}$"):
                chat.main(argv + overwrite)
        rows = [json.loads(line)["messages"] for line in written.read_text().splitlines()]
        assert len(calls) == 2 and [r[0]["content"] for r in rows] == ["one"]
        assert answers.read_text() == (earlier or answers.read_text())
        earlier = answers.read_text()
    calls[:], said = [1], ""  # stopped before its first answer: no empty file beside the earlier one
    capsys.readouterr()
    if fault is KeyboardInterrupt:
        assert chat.main(argv + ["--overwrite"]) == 130
    else:
        with pytest.raises((Terminated, BailongError)) as stopped:
            chat.main(argv + ["--overwrite"])
        said = str(stopped.value)
    said += capsys.readouterr().err
    assert "0 of the 3 conversations answered" in said and "written" not in said, said
    assert not (tmp_path / "a.partial-3.jsonl").exists() and answers.read_text() == earlier


def test_ctrl_c_at_the_prompt_asks_before_a_conversation_is_lost(monkeypatch, capsys, tmp_path):
    """A second Ctrl-C (the first stopping an answer) quit at once, the conversation unsaved and gone."""
    import builtins

    def typed(*lines):
        lines = iter(lines)

        def input_(prompt=""):
            line = next(lines)
            if line is KeyboardInterrupt:
                raise KeyboardInterrupt
            return line
        monkeypatch.setattr(builtins, "input", input_)
    argv = ["--preset", "tiny", "--max-new-tokens", "2"]
    typed(KeyboardInterrupt)  # nothing said yet: nothing to lose
    assert chat.main(argv) == 0 and "Ctrl-C again" not in capsys.readouterr().err
    typed("hi", KeyboardInterrupt, f"/save {tmp_path / 'chat.jsonl'}", KeyboardInterrupt, KeyboardInterrupt)
    assert chat.main(argv) == 0
    asked = "(Ctrl-C again, Ctrl-D or /exit quits; /save FILE keeps the conversation)"
    assert capsys.readouterr().err.count(asked) == 2
    assert (tmp_path / "chat.jsonl").is_file()


def test_ctrl_c_before_an_answer_begins_or_in_a_command_stops_that_alone(monkeypatch, capsys, tmp_path):
    """Ctrl-C while a prompt was made (after Enter, before the first token) or while /save wrote ended the chat,
    the conversation lost; now the question is taken back, the command stopped, and the chat goes on."""
    import builtins

    from bailong import conversation, files
    lines = iter(["hi", "again", f"/save {tmp_path / 'chat.jsonl'}", f"/save {tmp_path / 'chat.jsonl'}", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    stops = {"prompt": 2, "write": 1}  # the second message's prompt, the first /save's write

    def stopping(name, function):
        def call(*args, **kwargs):
            stops[name] -= 1
            if stops[name] == 0:
                raise KeyboardInterrupt
            return function(*args, **kwargs)
        return call
    monkeypatch.setattr(conversation.Chat, "prompt", stopping("prompt", conversation.Chat.prompt))
    monkeypatch.setattr(conversation, "atomic_write", stopping("write", files.atomic_write))
    assert chat.main(["--preset", "tiny", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err.count("(stopped; the conversation goes on)") == 2
    saved = json.loads((tmp_path / "chat.jsonl").read_text())["messages"]
    assert [(m["role"], m["content"]) for m in saved][:1] == [("user", "hi")] and len(saved) == 2


def test_ctrl_c_in_a_one_shot_answer_exits_130_and_keeps_the_note_off_the_answer(monkeypatch, capsys):
    from bailong import conversation

    def generate(model, ids, n, sampling, stop_ids, on_token):
        on_token(ids[-1])
        raise KeyboardInterrupt
    monkeypatch.setattr(conversation, "generate", generate)
    assert chat.main(["--preset", "tiny", "--prompt", "hi"]) == 130
    out, err = capsys.readouterr()
    assert "[stopped]" not in out and " [stopped]" in err


def test_ctrl_c_while_torch_loads_waits_until_it_has():
    """torch's import swallows a Ctrl-C that comes while it imports numpy, leaving numpy half made (train.py then
    went on training, or failed minutes later on numpy.intp): train.py and chat.py hold Ctrl-C and SIGTERM while
    it loads, and one that came is raised after, where run_cli answers it."""
    import signal
    import threading

    from bailong.errors import handling, signals_held
    reached = False
    with handling(signal.default_int_handler, (signal.SIGINT,)):  # a terminal's (under nohup ... &, ignored)
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # (to this thread: others a test made
                reached = True  # may take a signal sent to the process)
        assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # nothing is held after


SAID = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.68 GiB of which 1.19 GiB "
        "is free")
OUT_OF_MEMORY = SAID + (". Including non-PyTorch memory, this process has 22.47 GiB memory in use. Of the allocated "
                        "memory 21.9 GiB is allocated by PyTorch, and 12.3 MiB is reserved by PyTorch but unallocated. "
                        "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=...")


def test_out_of_gpu_memory_is_one_line_that_says_what_takes_less(capsys):
    """A command stopped by the GPU's memory (training's most common end on a small GPU) says so in a line: what
    was asked for and what was free, then what takes less (train.py: options a new run or a resumed one takes);
    it was torch's traceback and its page. cudaMallocAsync's message is lines."""
    import torch

    from bailong.errors import run_cli
    from bailong.training import LESS_MEMORY

    async_said = "Allocation on device 0 would exceed allowed memory. (out of memory)"  # cudaMallocAsync's
    for message, said in [(OUT_OF_MEMORY, SAID), (async_said + "\nCurrently allocated     : 23.1 GiB", async_said)]:
        def main(argv):
            raise torch.OutOfMemoryError(message)
        with pytest.raises(SystemExit) as stopped:
            run_cli(main, [], less_memory=LESS_MEMORY)
        assert stopped.value.code == 1 and capsys.readouterr().err == f"error: {said}: {LESS_MEMORY}\n"
    with pytest.raises(RuntimeError):  # any other error is a bug: its traceback shows
        run_cli(lambda argv: torch.zeros(2) @ torch.zeros(3), [])


def test_out_of_gpu_memory_in_a_chat_ends_that_answer_alone(monkeypatch, capsys, tmp_path):
    """The answer streaming when the memory ran out ends its line; the question is taken back, the chat goes on."""
    import builtins

    import torch

    from bailong import conversation
    lines = iter(["a long question", "a short one", f"/save {tmp_path / 'chat.jsonl'}", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    generate, calls = conversation.generate, []

    def once_too_much(model, ids, n, sampling, stop_ids, on_token):
        calls.append(1)
        if len(calls) == 1:
            on_token(ord("x") + 3)  # the byte tokenizer's "x", streamed before the memory ran out
            raise torch.OutOfMemoryError(OUT_OF_MEMORY)
        return generate(model, ids, n, sampling, stop_ids, on_token=on_token)
    monkeypatch.setattr(conversation, "generate", once_too_much)
    assert chat.main(["--preset", "tiny", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("x\n") and f"error: {SAID}: the chat goes on (/reset begins a shorter one" in err
    saved = json.loads((tmp_path / "chat.jsonl").read_text())["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"] == ["a short one"]


def test_out_of_gpu_memory_while_answering_a_file_keeps_the_answers_so_far(monkeypatch, capsys, tmp_path):
    import torch

    from bailong import conversation
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                                 for i in range(3)))
    answer = conversation.Chat.answer

    def third_too_much(self, text, *args, **kwargs):
        if text == "q2":
            raise torch.OutOfMemoryError(OUT_OF_MEMORY)
        return answer(self, text, *args, **kwargs)
    monkeypatch.setattr(conversation.Chat, "answer", third_too_much)
    with pytest.raises(bailong.BailongError, match=re.escape(f"{SAID}: {chat.LESS_MEMORY}; 2 of the 3 conversations "
                                                             "answered, written")):
        chat.main(["--preset", "tiny", "--max-new-tokens", "2", "--input", str(questions), "--output",
                   str(tmp_path / "a.jsonl")])
    written = [p for p in tmp_path.iterdir() if p.name.startswith("a")]
    assert len(written) == 1 and len(written[0].read_text().splitlines()) == 2
