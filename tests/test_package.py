"""The package's seams: what imports what, and the layout the README describes."""
import ast
import importlib
import os
import re
import signal
import subprocess
import sys
import types

import pytest
import torch

import bailong
import bailong_kernels
from bailong.errors import BailongWarning
from conftest import ROOT

PACKAGES = {"bailong": ROOT / "bailong", "bailong_kernels": ROOT / "kernels"}


def imports():
    """Each module of the two packages -> the modules of ours it imports, at the top or inside a function."""
    found = {}
    for package, folder in PACKAGES.items():
        for file in folder.glob("*.py"):
            name = package if file.stem == "__init__" else f"{package}.{file.stem}"
            targets = set()
            for node in ast.walk(ast.parse(file.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:  # from bailong_kernels import decode
                    names = [f"{node.module}.{a.name}" for a in node.names]
                targets |= {n for n in names if n.split(".")[0] in PACKAGES}
            found[name] = targets - {name}
    return found


def test_no_import_cycles():
    graph = imports()
    graph = {m: {t for t in targets if t in graph} for m, targets in graph.items()}

    def reaches(start):
        seen, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()] - seen:
                if t not in PACKAGES:  # a package's __init__ is not a step between its modules
                    seen.add(t)
                    todo.append(t)
        return seen

    assert [m for m in graph if m in reaches(m)] == []


def test_the_kernels_folder_imports_as_bailong_kernels_and_no_function_shadows_a_module():
    assert bailong_kernels.__file__ == str(ROOT / "kernels" / "__init__.py")
    assert bailong.__file__ == str(ROOT / "bailong" / "__init__.py")
    for file in (ROOT / "kernels").glob("[!_]*.py"):
        assert not hasattr(bailong_kernels, file.stem) or not callable(getattr(bailong_kernels, file.stem))
    assert set(bailong.__all__) & {f.stem for f in (ROOT / "bailong").glob("*.py")} == set()
    importlib.import_module("bailong.generation")  # a submodule imported first, as chat.py does
    for name in bailong.__all__:  # the package's names load on first use, each the thing its module defines
        assert not isinstance(getattr(bailong, name), types.ModuleType), name
        assert name in dir(bailong)
    assert bailong.lora.__name__ == "bailong.lora"  # submodules too, as when the package imported them all
    with pytest.raises(AttributeError):
        bailong.no_such_module


@pytest.mark.parametrize("args", [["--quantize", "int8"], ["--device", "gpu"], ["--lr", "-1"], ["--seq-len", "1024"],
                                  ["--stage", "sft", "--init", "nowhere"], ["--out", "train.py"]])
def test_options_and_the_output_folder_are_refused_before_torch_loads(args):
    """Importing torch takes about a second: train.py checks every option and --out first, with modules that
    do not import it, so that a mistake is answered at once."""
    code = ("import sys, train\n"
            f"try:\n    train.main({args!r})\nexcept Exception as e:\n    print(type(e).__name__)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["UsageError", "False"]


@pytest.mark.parametrize("args", [["--temperature", "-1"], ["--device", "gpu"], ["--preset", "tiny", "m"],
                                  ["--output", "x.jsonl"], ["--input", "x.jsonl", "--output", "README.md"],
                                  ["--help"]])
def test_chat_options_are_refused_before_torch_loads(args):
    """As train.py's: a mistake answered at once, and Ctrl-C while the libraries load is run_cli's (it printed
    a traceback of the import when chat.py imported them at its top)."""
    code = ("import sys, chat\n"
            f"try:\n    chat.main({args!r})\nexcept BaseException as e:\n    print(type(e).__name__)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["SystemExit" if args == ["--help"] else "UsageError", "False"]


@pytest.mark.parametrize("command, pressed", [
    (["train.py", "--steps", "1", "--out", "{tmp}/run"], "numpy"), (["train.py", "--help"], "tqdm"),
    (["chat.py", "--preset", "tiny", "--prompt", "hi"], "numpy"),
    *((["-m", f"bailong.{name}", "--help"], "numpy") for name in ("eval", "export", "vocab")),
    (["-m", "bailong.eval", "--help"], "bailong.data"), (["-m", "bailong.export", "--help"], "bailong.weights"),
    (["-m", "bailong.vocab", "--help"], "bailong.vocab_bpe")])
def test_ctrl_c_while_a_command_loads_torch_ends_it(command, pressed, tmp_path):
    """torch's import swallows a Ctrl-C that comes while it imports numpy (python -m bailong.export went on to
    do its work; bailong.vocab printed a traceback of the import): every command holds it until torch and its
    modules have loaded (a Ctrl-C as they did, torch loaded, was a traceback), then ends with exit 130 and no
    traceback, before it has written anything."""
    script = ("import os, runpy, signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (where the tests\n"
              "# run under nohup ... &, Ctrl-C is ignored, and so in every process they start)\n"
              "class CtrlC:  # pressed as the module named first begins to load\n"
              "    pressed = sys.argv[1]\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == self.pressed:\n"
              "            sys.meta_path.remove(self)\n"
              "            os.kill(os.getpid(), signal.SIGINT)\n"
              "sys.meta_path.insert(0, CtrlC())\n"
              "sys.argv = sys.argv[2:]\n"
              "if sys.argv[0] == '-m':\n"
              "    sys.argv.pop(0)\n"
              "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
              "else:\n"
              "    runpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = [a.format(tmp=tmp_path) for a in command]
    done = subprocess.run([sys.executable, "-c", script, pressed, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 130 and "Traceback" not in done.stderr and done.stdout == "", done.stderr[-500:]
    assert not (tmp_path / "run").exists()
    if command[0] == "-m":  # imported by another module (a notebook's import of bailong.export): raised there
        import threading

        from bailong.errors import handling, loading
        with handling(signal.default_int_handler, (signal.SIGINT,)), pytest.raises(KeyboardInterrupt):  # (as above)
            with loading(command[1]):
                signal.pthread_kill(threading.get_ident(), signal.SIGINT)


def test_the_readme_layout_lists_every_module_and_folder():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    listed = set(re.findall(r"^ *([\w./-]+)", layout, flags=re.M))
    in_tree = {f"{p.name}/" if p.is_dir() else p.name for folder in ("bailong", "kernels")
               for p in (ROOT / folder).iterdir() if p.name not in ("__pycache__", "__init__.py")}
    in_tree |= {"pyproject.toml", "bailong/", "kernels/", "train.py", "chat.py", "tests/", "bench/", "docs/"}
    assert in_tree - listed == set(), "in the tree, not in the README's layout"
    assert {name for name in listed if name.endswith((".py", "/", ".toml"))} - in_tree == set(), \
        "in the README's layout, not in the tree"


NO_TRITON = "import runpy, sys; sys.modules['triton'] = None; sys.argv = sys.argv[1:]; " \
    "runpy.run_path(sys.argv[0], run_name='__main__')"  # import triton fails, find_spec finds none: macOS's lot


def test_the_recipe_on_the_cpu_needs_no_triton(tmp_path):
    """Triton ships for Linux alone (requirements.txt installs it there): on macOS both stages and the chat run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    short = ["--steps", "2", "--eval-every", "1"]
    for command in (["train.py", *short, "--new-pieces", "20", "--out", "pre"],
                    ["train.py", "--stage", "sft", "--init", "pre", *short, "--out", "sft"],
                    ["chat.py", "sft", "--prompt", "你好", "--max-new-tokens", "4"]):
        done = subprocess.run([sys.executable, "-c", NO_TRITON, str(ROOT / command[0]), *command[1:]], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "Triton" not in done.stderr


WITHOUT_POSIX = """
import os, random, signal, sys, torch  # (imported first: on Windows they ask for no fork hook)
sys.modules["fcntl"] = None  # what native Windows lacks, taken away before anything imports
del signal.pthread_sigmask, os.register_at_fork
sys.path.insert(0, os.getcwd())
import chat, train  # the commands and the library import
import bailong; bailong.load, bailong.generate
from bailong.errors import run_cli
try:
    train.main(["--out", "run"])  # training called from Python
except Exception as e:
    print(type(e).__name__, e)
sys.platform = "win32"  # (after torch's import, which reads it)
run_cli(chat.main, ["x", "--prompt", "hi"])
"""


def test_on_windows_the_commands_say_in_one_line_to_use_wsl(tmp_path):
    """Native Windows has no run locks (fcntl) nor signal masks: the modules still import, and a command or
    training says where Bailong runs, where before every command stopped on ``import fcntl``'s traceback."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_POSIX], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    said = "Bailong's commands and training run on Linux and macOS; on Windows, run them in WSL"
    assert done.returncode == 1 and done.stdout == f"BailongError {said}\n"
    assert done.stderr == f"error: {said}\n"
    assert not (ROOT / "run").exists()


def test_without_triton_cuda_runs_the_pytorch_code_and_says_so_once(monkeypatch):
    monkeypatch.setattr(bailong_kernels, "TRITON", False)
    monkeypatch.setattr(bailong_kernels, "_said_no_triton", False)
    on_cuda = types.SimpleNamespace(is_cuda=True)
    with pytest.warns(BailongWarning, match="Triton is not installed: on CUDA the PyTorch code runs") as said:
        assert not bailong_kernels.enabled(on_cuda) and not bailong_kernels.enabled(on_cuda)
    assert len(said) == 1
    with torch.no_grad():
        assert not bailong_kernels.decode_enabled(on_cuda)
    assert not bailong_kernels.layer_enabled(on_cuda)
    monkeypatch.setattr(bailong_kernels, "TRITON", True)
    assert bailong_kernels.enabled(on_cuda) and bailong_kernels.layer_enabled(on_cuda)


def test_every_switch_is_read_through_bailong_switches_with_its_default():
    """Each BAILONG_... variable the code names is in ``bailong.switches.DEFAULTS`` (its one default, and its
    line in that module's docstring), and no module reads the environment for one itself."""
    from bailong.switches import DEFAULTS
    named, read_elsewhere = set(), []
    for file in [*(ROOT / "bailong").glob("*.py"), *(ROOT / "kernels").glob("*.py"), ROOT / "train.py",
                 ROOT / "chat.py"]:
        text = file.read_text()
        named |= set(re.findall(r"\bBAILONG_[A-Z0-9_]*[A-Z]\b", text))
        if file.name != "switches.py" and re.search(r"environ[^\n]*BAILONG_", text):
            read_elsewhere.append(file.name)
    assert named == set(DEFAULTS) and read_elsewhere == []
    doc = importlib.import_module("bailong.switches").__doc__
    for name, on in DEFAULTS.items():  # the docstring gives the value that changes the default
        assert f"{name}={'0' if on else '1'} " in doc


@pytest.mark.parametrize("command", [["train.py"], ["chat.py"], ["-m", "bailong.export"], ["-m", "bailong.eval"],
                                     ["-m", "bailong.vocab"]])
def test_every_command_refuses_a_value_no_switch_takes_in_one_line(command):
    """In a new process, where the modules read their switches as they are imported, before the command runs."""
    env = {**os.environ, **{name: "maybe" for name in importlib.import_module("bailong.switches").DEFAULTS}}
    done = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert (done.returncode, done.stdout) == (2, "") and done.stderr.startswith("error: BAILONG_") and \
        done.stderr.count("\n") == 1, done.stderr[-2000:]


@pytest.mark.parametrize("value, on", [(None, "default"), ("", False), ("0", False), ("false", False), ("Off", False),
                                       ("no", False), ("1", True), ("yes", True), ("TRUE", True), ("on", True),
                                       ("maybe", "refused"), ("2", "refused")])
def test_a_switch_is_off_at_0_or_false_on_at_1_or_true_and_its_default_when_unset(value, on, monkeypatch):
    """"false" used to switch a switch on, as anything but "" and "0" did (the commands refuse another value in one
    line: docs/BAD_INPUT.md)."""
    from bailong.switches import DEFAULTS, switched_on
    for name, default in DEFAULTS.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        if on == "refused":
            with pytest.raises(ValueError, match=f"{name}={value}: a switch is 1 .or true, on, yes. or 0"):
                switched_on(name)
        else:
            assert switched_on(name) is (default if on == "default" else on)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_once_a_command_is_done_leaves_its_exit_alone(signum):
    """A Ctrl-C as the interpreter cleaned up after a command (torch's clean-up at exit) printed "Exception
    ignored in atexit callback" and a traceback (and SIGTERM cut the clean-up short); the work done, either is
    let pass, unanswered, whatever thread takes it (torch's), and the exit ends as the command did. A signal
    the process ignores (a job started with & from a script) stays ignored."""
    script = ("import atexit, os, signal, sys, threading, time\n"
              "from bailong.errors import run_cli\n"
              "ignored = sys.argv[1] == 'ignored'\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.default_int_handler)\n"
              "def clean_up():  # a library's, registered before the command ran\n"
              f"    os.kill(os.getpid(), signal.{signum})\n"
              "    time.sleep(0.5)\n"
              "    print('cleaned up', signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n"
              "atexit.register(clean_up)\n"
              "def main(argv):\n"
              "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
              "    print('done')\n"
              "    return 3\n"
              "run_cli(main)\n")
    for sigint in ("answered", "ignored"):
        done = subprocess.run([sys.executable, "-c", script, sigint], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (3, f"done\ncleaned up {sigint == 'ignored'}\n", "")
    twice = script.replace("time.sleep(0.5)", f"time.sleep(0.5)\n    os.kill(os.getpid(), signal.{signum})\n"
                                              "    time.sleep(5)  # (an exit that hangs)")
    done = subprocess.run([sys.executable, "-c", twice, "answered"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (128 + getattr(signal, signum), "done\n", "")


def test_signals_held_within_another_hold_stay_held_until_it_ends():
    """A command's module imports another's (bailong.vocab imports bailong.eval), each holding Ctrl-C while it
    loads: the inner hold's end let signals through for the rest of the outer's imports."""
    from bailong.errors import signals_held
    with signals_held():
        with signals_held():
            pass
        assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
