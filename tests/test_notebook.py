"""Bailong called from Python, as a notebook calls it: the process is the caller's, and what a command does to its
own process (ending it, seeding it, hiding bars off a terminal) is not done to the caller's."""
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bailong.errors import UsageError, in_a_command, run_cli, signals_held

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--steps", "3", "--eval-every", "2", "--save-every", "1", "--held-out", "0.1"]
IPYTHON = "import sys, types; sys.modules['IPython'] = types.SimpleNamespace(get_ipython=object)\n"  # a kernel's


def states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def test_training_leaves_the_callers_random_states_as_they_were(tmp_path, monkeypatch):
    """A run seeds torch's generator, and --resume sets Python's, numpy's and torch's to its checkpoint's: a
    notebook's own seeded draws after a run were the run's."""
    monkeypatch.chdir(tmp_path)
    import train
    for argv in (SHORT, [*SHORT[:1], "5", *SHORT[2:], "--resume"]):
        random.seed(1), np.random.seed(2), torch.manual_seed(3)
        before = states()
        assert train.main(argv) == 0
        assert states() == before


def test_an_interrupted_run_called_from_python_raises_keyboard_interrupt_once_saved(tmp_path, monkeypatch, capsys):
    """A notebook running every cell went on past an interrupted run (its status 130 returned), into cells that
    then used a half-trained run; it stops there now, as at any cell interrupted, the checkpoint saved."""
    monkeypatch.chdir(tmp_path)
    import train
    lr_at, sent = train.lr_at, []

    def interrupted_at_the_second_step(step, config):
        if step == 1 and not sent:
            sent.append(signal.raise_signal(signal.SIGINT))
        return lr_at(step, config)
    monkeypatch.setattr(train, "lr_at", interrupted_at_the_second_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(SHORT)
    assert "interrupted after step 2: saved" in capsys.readouterr().out
    assert (tmp_path / "out" / "pretrain" / "checkpoints" / "step-0000002").is_dir()
    monkeypatch.setattr(train, "lr_at", lr_at)
    assert train.main([*SHORT, "--resume"]) == 0  # the folder free again, in the same process


def test_a_command_called_from_python_takes_its_defaults_not_the_callers_argv(monkeypatch):
    """``train.main()`` in a notebook read the kernel's own arguments (``-f kernel.json``) and refused them."""
    import chat
    from bailong.training import parse_config
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel.json"])
    assert parse_config(None).steps == parse_config([]).steps
    with pytest.raises(UsageError, match="^no model given and no out/sft"):  # chat.py's default, here absent
        chat.parse_args(None)


def test_a_warning_is_said_at_each_run_called_from_python():
    """Python says a warning once a place: a second run's damaged token cache went unsaid in a notebook."""
    code = ("import warnings\nfrom bailong.errors import BailongWarning\nfrom bailong.processes import called\n"
            "run = lambda: warnings.warn(BailongWarning('the token cache is damaged')) or 0\n"
            "assert called(run) == called(run) == 0\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.count("the token cache is damaged") == 2, done.stderr


def test_under_ipython_a_command_is_not_the_process_and_bars_are_shown():
    """``%run train.py`` in a notebook: its Ctrl-C while documents were tokenized in parallel ended the kernel
    (the pool's wait ended the process, as a command's may), and bars were hidden, the output being no terminal."""
    code = (IPYTHON + "from bailong.errors import in_a_command, run_cli\nfrom bailong.progress import BAR_HIDDEN\n"
            "assert BAR_HIDDEN is False\nrun_cli(lambda argv: 3 + in_a_command(), [])\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 3
    code = "from bailong.errors import in_a_command, run_cli\nrun_cli(lambda argv: 3 + in_a_command(), [])\n"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 4  # a command's own
    assert not in_a_command()


@pytest.fixture(autouse=True)
def ctrl_c_as_in_a_terminal():
    """Ctrl-C answered as in a terminal or a notebook (a suite run under nohup, in the background, ignores it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_signal_another_thread_takes_waits_as_the_main_threads_does():
    """A notebook's kernel has threads of its own, which take a Ctrl-C the main thread holds: it was answered at
    once, inside torch's import, and left torch half imported until the kernel restarted."""
    go = threading.Event()
    sender = threading.Thread(target=lambda: go.wait() and os.kill(os.getpid(), signal.SIGINT))
    sender.start()  # (made while nothing is held: a thread takes its maker's mask)
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            go.set()
            sender.join()
            time.sleep(0.1)  # (a handler runs between bytecodes)
            reached = True
    assert reached


def test_run_cli_passes_the_command_line_where_no_arguments_are_given(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--steps", "7"])
    with pytest.raises(SystemExit) as done:
        run_cli(lambda argv: int(argv[1]))
    assert done.value.code == 7


def test_a_signal_another_thread_took_is_delivered_when_the_main_threads_own_raises_too():
    """The main thread's own Ctrl-C, delivered as the block ends, raised there: the SIGTERM another thread had
    taken meanwhile was never delivered."""
    got, go = [], threading.Event()
    sender = threading.Thread(target=lambda: go.wait() and os.kill(os.getpid(), signal.SIGTERM))
    sender.start()
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                go.set()
                sender.join()
                time.sleep(0.1)  # (taken by the sender, recorded in the main thread)
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # the main thread's: held till the end
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert got == [signal.SIGTERM]
