"""User-facing errors (one line, no traceback, non-zero exit) and warnings (a line each in a command)."""
import argparse
import atexit
import contextlib
import os
import re
import signal
import sys
import threading
import warnings
from functools import partial

# run locks (fcntl), signal masks, forked workers: POSIX's, and never tried on native Windows
NOT_HERE = "Bailong's commands and training run on Linux and macOS; on Windows, run them in WSL"


class BailongError(Exception):
    """A problem with the user's input (a path, a file, an option), not a bug.

    The message is one line that names the file and the problem; command-line
    entry points print it as ``error: ...`` and exit with status 1.
    """


class UsageError(BailongError):
    """A command-line option out of range or of the wrong kind: caught before anything is read or
    written, and reported like argparse's own errors, with exit status 2."""


class BailongWarning(UserWarning):
    """Something the user should know that stops nothing (an adapter trained on another base, a rounding kept):
    a Python caller may catch or silence it as any warning; a command shows it as a ``warning: ...`` line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (no usage block), exit status 2."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, and every text given is UTF-8: the bytes of a name in another encoding reach Python
        as characters that no file the run writes (run.json, its outputs) can hold."""
        parsed = super().parse_args([] if args is None else args, namespace)  # main(): the defaults, not sys.argv
        names = {a.dest: a.option_strings[0] if a.option_strings else a.dest for a in _actions(self)}
        for dest, values in vars(parsed).items():
            if (text := not_utf8(values)) is not None:
                self.error(f"{names.get(dest, dest)} is not UTF-8 text ({os.fsencode(text)!r})")
        return parsed


def not_utf8(values) -> str | None:
    """The first of ``values`` (a value, or a list of them) that is text but not UTF-8: bytes of another encoding,
    which Python gives as lone surrogates ("\\udce9"), as a config file's JSON can too; else None."""
    for value in values if isinstance(values, list) else [values]:
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return value
    return None


def _actions(parser):
    """A parser's arguments, its subcommands' too."""
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)


class Terminated(BaseException):
    """SIGTERM (``kill``, a job scheduler's stop), raised where the program is, so that an unfinished write
    removes its temporary copy on the way out, as for Ctrl-C; unlike Ctrl-C nothing stops it short of the exit
    (Ctrl-C in a chat only ends the reply)."""


def _terminate(signum, frame):
    raise Terminated


def _quiet_exit():
    """As the interpreter exits after a command, its work done and its status known: a Ctrl-C or SIGTERM is let
    pass, unanswered (it interrupted the exit's clean-up, torch's too, with an "Exception ignored" traceback, and
    changed nothing else); a second ends the process at once (an exit that hangs); one ignored stays ignored."""
    def let_pass(signum, frame):
        signal.signal(signum, lambda signum, frame: os._exit(128 + signum))
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, let_pass)


@contextlib.contextmanager
def signals_held(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within, ``signals`` wait; after, one that came is delivered where the program then is (run_cli answers
    it). For torch's import, which swallows a Ctrl-C that comes while it imports numpy and leaves numpy half
    made: an error minutes later, or a run that goes on. Only the main thread's are held (and none on Windows,
    which has no signal masks); one another thread takes (a notebook's kernel has several) is kept till after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    came = []
    held = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    recorded = [s for s in signals if signal.getsignal(s) not in (None, signal.SIG_IGN)]  # (None: set outside Python)
    try:
        with handling(lambda signum, frame: came.append(signum), recorded):
            yield
    finally:  # as they were: within another such block (a command's module imports another's), still held
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # (the main thread's own, delivered here, may raise)
        finally:
            for signum in dict.fromkeys(came):
                signal.raise_signal(signum)


@contextlib.contextmanager
def loading(module: str):
    """Around the import of torch at the top of a command's module (``python -m bailong.export``), where run_cli
    cannot answer yet: Ctrl-C and SIGTERM are held while it loads (``signals_held``), then a Ctrl-C that came
    ends the command as run_cli would (exit 130, no traceback), or, where another module imports this one, is
    raised there."""
    try:
        with signals_held():
            yield
    except KeyboardInterrupt:
        if module != "__main__":
            raise
        print(file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def handling(handler, signals=(signal.SIGINT, signal.SIGTERM)):
    """Within, ``handler`` answers ``signals``; after, the handlers before again. Only the main thread may set
    them: elsewhere (a notebook's worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before or signal.SIG_DFL)  # None: set outside Python


def silence(stream):
    """Send what ``stream`` still writes, what is buffered too, nowhere: its reader went (``| head``)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def in_a_command() -> bool:
    """Whether ``run_cli`` runs this process's command (it answers SIGTERM): then the command may end the
    process at once; called from Python (a notebook, ``%run train.py`` too), the process is the caller's."""
    return signal.getsignal(signal.SIGTERM) is _terminate and not in_ipython()


def in_ipython() -> bool:
    """Whether IPython runs this process (a notebook's kernel, or its shell)."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def run_cli(main, argv=None, less_memory="less at once fits, or a GPU other processes leave free"):
    """Run ``main(argv)`` and turn user errors, failed file operations, the GPU's memory running out (said with
    ``less_memory``: what takes less), Ctrl-C and SIGTERM into a clean exit.
    Under torchrun the processes of one machine meet the same mistake, and its first one says it (another
    machine's files may differ: its first process says what it met, naming its rank)."""
    say = os.environ.get("LOCAL_RANK", "0") == "0"
    rank = os.environ.get("RANK", "0")
    where = f"[rank {rank}] " if rank not in ("0", "") else ""
    for stream in (sys.stdout, sys.stderr):  # text the output cannot hold (Chinese to an ASCII or cp1252 one,
        if hasattr(stream, "reconfigure"):  # as Windows gives a redirected file) shown as "?", not a traceback;
            stream.reconfigure(errors="replace", line_buffering=True)  # a line as it is said, in a log file too
    try:
        if sys.platform == "win32":
            raise BailongError(NOT_HERE)
        from bailong.cores import fitted_threads
        from bailong.switches import switch_mistake
        if mistake := switch_mistake():  # answered at once, whether or not this command reads that switch
            raise UsageError(mistake)
        # PyTorch's threads fitted to a container's CPU quota, where it is less than the cores the process sees
        with handling(_terminate, (signal.SIGTERM,)), warnings.catch_warnings(), fitted_threads():
            warnings.showwarning = partial(_show_warning, say, where, warnings.showwarning)
            warnings.filterwarnings("always", category=BailongWarning, append=True)  # each time, as a line; -W first
            sys.exit(main(sys.argv[1:] if argv is None else argv))
    except (BailongError, BailongWarning) as e:  # a warning: under python -W error
        if say:
            print(f"{where}error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    except BrokenPipeError:  # the output's reader went (| head): ended quietly, as a pipe's writer is
        silence(sys.__stdout__)
        sys.exit(128 + signal.SIGPIPE)
    except OSError as e:  # a full disk, a read-only folder, a vanished file: the machine's, not a bug
        if say:
            print(f"{where}error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the GPU's memory, too small for what was asked: said by each process it stops
        if not (said := out_of_memory(e)):
            raise
        print(f"{where}error: {said}: {less_memory}", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        sys.exit(128 + 15)  # the shell's code for SIGTERM
    finally:
        if getattr(main, "__module__", None) == "__main__" and not in_ipython():  # the command is the program
            atexit.unregister(_quiet_exit)  # (once; and the last registered runs first, before torch's clean-up)
            atexit.register(_quiet_exit)


def out_of_memory(e) -> str | None:
    """torch's out-of-memory error in one line, or None for any other error: its first sentences, which say what
    was asked for and what the device holds (pages of the allocator's state follow; cudaMallocAsync's, lines)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(e, torch.OutOfMemoryError):
        return None
    return ". ".join(str(e).split("\n")[0].split(". ")[:3]).rstrip(". ")


def _show_warning(say, where, shown, message, category, *args, **kwargs):
    """A command's warnings: the project's as one line each, said as its errors are (by the first process of
    each machine under torchrun); Python's and other libraries' as Python shows them."""
    if issubclass(category, BailongWarning):
        if say:
            print(f"{where}warning: {message}", file=sys.stderr)
    else:
        shown(message, category, *args, **kwargs)


def check_device(device: str, said=None) -> str:
    """``device`` when this machine has it (for --device, or as ``said`` names it), else a one-line
    UsageError. torch is imported only to count the CUDA devices a cuda device needs, so that a misspelt name
    is answered at once."""
    said = said or f"--device {device}"
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", device):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda"):
        import torch
        if int(device[5:] or 0) >= torch.cuda.device_count():
            found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
            raise UsageError(f"{said}: this machine has {found}")
    return device


def read_json(path, missing="no such file", expect=dict):
    """The JSON value (an object, or ``expect``) in ``path``, or a one-line BailongError naming the file
    and the problem."""
    import json
    from pathlib import Path
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BailongError(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise BailongError(f"{path}: is a folder; expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BailongError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, expect):
        raise BailongError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}")
    return data
