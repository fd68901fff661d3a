"""Every row of docs/BAD_INPUT.md, run as written: its answer, its exit code, no traceback, and the user's
files unchanged. The commands run in this process (an entry point's main under run_cli), which takes
seconds for the whole table where new processes would take minutes."""
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sys

import pytest
import torch

from bailong.training import SAMPLES
from bailong.errors import run_cli
from conftest import ROOT

TABLE = ROOT / "docs" / "BAD_INPUT.md"
RUN = ["--data", "corpus.txt", "--steps", "4", "--save-every", "2", "--eval-every", "2", "--new-pieces", "20"]


def rows():
    """(command, answer, exit code) of every table row: | mistake | `command` | `answer` | exit |."""
    found = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) == 4 and cells[1].startswith("`") and cells[3].isdigit():
            found.append(pytest.param(cells[1].strip("`"), cells[2].strip("`"), int(cells[3]), id=cells[0]))
    return found


def entry_point(name):
    import importlib
    return importlib.import_module({"train.py": "train", "chat.py": "chat"}.get(name, name)).main


def run(argv, capsys, stdin=""):
    """Run one command line of the table here; (exit code, everything it printed)."""
    name, args = (argv[1], argv[2:]) if argv[0] == "-m" else (argv[0], argv[1:])
    capsys.readouterr()
    old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        with pytest.raises(SystemExit) as exit_:
            run_cli(entry_point(name), args)
    finally:
        sys.stdin = old_stdin
    captured = capsys.readouterr()
    return exit_.value.code, captured.out + captured.err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The folder the table's commands run in: the user's files, a finished run, damaged copies of it."""
    from bailong.tokenizer import byte_tokenizer
    d = tmp_path_factory.mktemp("user")
    corpus = (SAMPLES / "zh_tw_sample.txt").read_text()
    files = {"corpus.txt": corpus, "empty.txt": "\n  \n", "notes.txt": "my own notes\n", "mine/notes.txt": "mine\n",
             "long.txt": corpus + corpus.replace("\n", "") * 12 + "\n",  # one line of about 100 KiB
             "wrong-type.json": '{"lora_r": "16"}', "unknown.json": '{"lora_rank": 16}',
             "q.jsonl": '{"messages": [{"role": "user", "content": "臺灣最高的山？"}]}\n',
             "q-long.jsonl": '{"messages": [{"role": "user", "content": "臺灣最高的山？"}]}\n\n'
                             '{"messages": [{"role": "user", "content": "' + "山" * 1000 + '"}]}\n',
             "answers.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                              '"content": "yo"}], "answered_by": "run"}\n',
             "chats.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                            '"content": "yo"}]}\n',
             "chats-broken.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                   '"content": "yo"}]}\nnot json\n',
             "chats-robot.jsonl": '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", '
                                  '"content": "yo"}]}\n',
             "bench.json": '[{"category": "writing", "turns": ["你好"]}]', "overwrite.json": '{"overwrite": true}',
             "bench-category.json": '[{"category": ["writing"], "turns": ["你好"]}]',
             "corpus2.txt": corpus + "多了一行。\n", "other-tool/run.json": '{"experiment": "my other tool"}',
             "other-tool/base/model.bin": "weights of another tool", "old.gguf": "GGUF, an earlier export",
             "text-number.jsonl": '{"text": 5}\n', "text-null.jsonl": '{"text": null}\n'}
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    (d / "latin1.txt").write_bytes("臺灣 café".encode() + "café".encode("latin-1"))
    for name in ("tok.model", "old.model"):
        (d / name).write_bytes(byte_tokenizer().sp.serialized_model_proto())
    return d


@pytest.fixture(scope="module")
def prepared(folder):
    """The finished run and its damaged copies, made once (training runs in this process, under the folder)."""
    import os

    from bailong.weights import load, save
    train = entry_point("train.py")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with pytest.raises(SystemExit) as exit_:
            run_cli(train, [*RUN, "--out", "run"])
        assert exit_.value.code == 0
    finally:
        os.chdir(cwd)
    run_dir = folder / "run"
    for name in ("run-notes", "run-cut-adapter", "run-cut-state", "run-latest-gone", "run-broken", "run-busy",
                 "run-cut-cache", "run-killed-save"):
        shutil.copytree(run_dir, folder / name)
    (folder / "run-notes" / "notes.txt").write_text("added by the user\n")
    shutil.copytree(run_dir, folder / "run-older")  # as an earlier version recorded it
    older = json.loads((run_dir / "run.json").read_text())
    del older["inputs"]["documents"]
    (folder / "run-older" / "run.json").write_text(json.dumps(older))
    cut = folder / "run-cut-adapter" / "checkpoints" / "step-0000004" / "adapter" / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[:1000])
    cut = folder / "run-cut-state" / "checkpoints" / "step-0000004" / "state.pt"
    cut.write_bytes(cut.read_bytes()[:500])
    (folder / "run-latest-gone" / "checkpoints" / "LATEST").write_text("step-0000009")
    cut = next((folder / "run-cut-cache" / "cache").glob("*.ids.npy"))
    cut.write_bytes(cut.read_bytes()[:200])
    checkpoints = folder / "run-killed-save" / "checkpoints"  # a save killed half way
    shutil.copytree(checkpoints / "step-0000004", checkpoints / ".step-0000006.4242.tmp")
    for state in (folder / "run-broken" / "checkpoints").glob("step-*/state.pt"):
        state.write_bytes(b"")
    (folder / "run-early").mkdir()  # stopped before its first adapter was kept
    shutil.copy(run_dir / "run.json", folder / "run-early" / "run.json")
    base = run_dir / "base"
    shutil.copytree(base, folder / "no-layers")
    config = json.loads((base / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "no-layers" / "config.json").write_text(json.dumps(config))
    for name, file, text in [("bad-generation", "generation_config.json", '{"temperature": -1}'),
                             ("bad-length", "generation_config.json", '{"max_new_tokens": "abc"}'),
                             ("bad-template", "tokenizer_config.json", '{"chat_template": "{{ messages[0] }"}'),
                             ("template-list", "tokenizer_config.json", '{"chat_template": ["{{ messages[0] }}"]}'),
                             ("deep-template", "tokenizer_config.json",
                              json.dumps({"chat_template": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"}))]:
        shutil.copytree(base, folder / name)
        (folder / name / file).write_text(text)
    shutil.copytree(base, folder / "no-tokenizer")
    (folder / "no-tokenizer" / "tokenizer.model").unlink()
    config = json.loads((base / "config.json").read_text())
    for name, key, value in [("eps-string", "rms_norm_eps", "1e-5"), ("theta-string", "rope_theta", "10000"),
                             ("tie-no", "tie_word_embeddings", "no"), ("rope-number", "rope_scaling", 5)]:
        shutil.copytree(base, folder / name)
        (folder / name / "config.json").write_text(json.dumps({**config, key: value}))
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    for name, changed in [("alpha-string", {**adapter, "lora_alpha": "32"}),
                          ("no-rank", {k: v for k, v in adapter.items() if k != "r"})]:
        for part in ("base", "adapter"):  # a training output, without its checkpoints
            shutil.copytree(run_dir / part, folder / name / part)
        (folder / name / "adapter" / "adapter_config.json").write_text(json.dumps(changed))
    from bailong.config import preset
    from bailong.model import Llama, init_weights
    small = preset("tiny")
    small.vocab_size = 260  # the run's tokenizer has 280 pieces
    save(init_weights(Llama(small)), folder / "small-vocab")
    shutil.copy(base / "tokenizer.model", folder / "small-vocab")
    model, _ = load(base, device="cpu")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    save(model, folder / "nan-model")
    shutil.copy(base / "tokenizer.model", folder / "nan-model")
    os.mkfifo(folder / "pipe")  # as /dev/null is: no file to write over
    import fcntl
    busy = open(folder / "run-busy" / ".lock", "a")  # as a training process in that folder holds it
    fcntl.flock(busy, fcntl.LOCK_EX | fcntl.LOCK_NB)
    yield folder
    busy.close()


def fingerprint(folder):
    """Hashes of the user's files and of the finished run, which no row may change."""
    names = ["corpus.txt", "empty.txt", "latin1.txt", "notes.txt", "mine/notes.txt", "tok.model", "old.model",
             "q.jsonl", "q-long.jsonl", "answers.jsonl", "bench.json", "long.txt", "other-tool/run.json",
             "other-tool/base/model.bin",
             "old.gguf", "text-number.jsonl", "text-null.jsonl", "bench-category.json"]
    paths = [folder / n for n in names] + sorted(p for p in (folder / "run").rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths} | \
        {"mine/": sorted(p.name for p in (folder / "mine").iterdir())}


@pytest.mark.parametrize("command, answer, code", rows())
def test_every_row_of_the_bad_input_table(command, answer, code, prepared, capsys, monkeypatch):
    monkeypatch.chdir(prepared)
    for name in ("BAILONG_FUSED_LORA", "BAILONG_LAYER_KERNELS"):  # the rows answer as the defaults do
        monkeypatch.delenv(name, raising=False)
    before = fingerprint(prepared)
    command, _, stdin = command.partition(" <<< ")  # the text a user types, as in bash: <<< $'line\nline'
    assert not stdin or re.fullmatch(r"\$'[^']*'", stdin), f"{stdin}: write it as bash reads it, $'...'"
    stdin = stdin[2:-1].replace("\\n", "\n")
    argv = shlex.split(command)
    while re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # the environment, as in bash: NAME=value command
        monkeypatch.setenv(*argv.pop(0).split("=", 1))
    status, printed = run(argv, capsys, stdin)
    pattern = ".*?".join(re.escape(part) for part in answer.split("…"))
    assert status == code and any(re.match(pattern, line) for line in printed.splitlines()), printed[-3000:]
    assert "Traceback" not in printed
    errors = [line for line in printed.splitlines() if re.match(r"(\[rank \d+\] )?error:", line)]
    assert len(errors) == (1 if code else len(errors)), errors  # a failure says one thing
    assert fingerprint(prepared) == before  # nothing the user had changed
    assert not list(prepared.glob(".*.tmp")) and not list(prepared.glob("*.tmp"))  # and nothing left behind


def test_the_table_covers_the_entry_points():
    commands = [r.values[0] for r in rows()]
    assert len(commands) >= 70
    for name in ("train.py", "chat.py", "-m bailong.vocab", "-m bailong.eval", "-m bailong.export"):
        assert any(c.startswith(name) for c in commands), name


def test_a_name_not_in_utf8_is_refused_by_every_entry_point(tmp_path, capsys, monkeypatch):
    """Bytes that are not UTF-8 reach Python as surrogates ("\\udce9" for é in Latin-1), which run.json and the
    outputs cannot hold: train.py wrote the folder, then ended in a traceback."""
    monkeypatch.chdir(tmp_path)
    for argv, name in [(["train.py", "--out", "lat\udce9n"], "--out"),
                       (["train.py", "--data", "a\udce9.txt"], "--data"), (["chat.py", "m\udce9"], "model"),
                       (["chat.py", "--preset", "tiny", "--system", "\udce9"], "--system"),
                       (["-m", "bailong.vocab", "extend", "--base", "b", "--corpus", "c", "--new-pieces", "5", "--out",
                         "\udce9"], "--out"),
                       (["-m", "bailong.export", "--base", "b", "--out", "x\udce9"], "--out")]:
        code, said = run(argv, capsys)
        assert code == 2 and said.startswith(f"error: {name} is not UTF-8 text (b'"), (argv, said)
    (tmp_path / "config.json").write_text('{"out": "lat\\udce9n"}')  # JSON's escape for the same
    code, said = run(["train.py", "--config", "config.json"], capsys)
    assert code == 2 and said == "error: --out is not UTF-8 text (b'lat\\xe9n')\n", said
    (tmp_path / "config.json").unlink()
    assert list(tmp_path.iterdir()) == []


def test_a_command_shows_the_projects_warnings_as_lines_and_others_as_python_does(tmp_path):
    """A warning of the project's (BailongWarning: an adapter trained on another base, a damaged token cache) is
    one line in a command, said as its errors are (under torchrun by each machine's first process, naming its
    rank), each time it comes; a Python caller gets it as a warning to catch or silence (tests of each); python's
    -W option comes first (-W error: a one-line error); another library's warnings keep Python's form."""
    import subprocess
    script = tmp_path / "command.py"
    script.write_text("import warnings\n"
                      "from bailong.errors import BailongWarning, run_cli\n"
                      "def main(argv):\n"
                      "    for _ in range(2):\n"
                      "        warnings.warn('a.bin: worth knowing', BailongWarning)\n"
                      "    warnings.warn('an old call', FutureWarning)\n"
                      "run_cli(main)\n")
    for rank, local_rank, said in (("0", "0", "warning: a.bin: worth knowing"),
                                   ("3", "0", "[rank 3] warning: a.bin: worth knowing"),  # another machine's first
                                   ("3", "1", None)):  # said by its machine's first process, as errors are
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "RANK": rank, "LOCAL_RANK": local_rank})
        lines = result.stderr.splitlines()
        assert result.returncode == 0 and lines[:-2] == ([said] * 2 if said else []), result.stderr  # each time
        assert lines[-2].endswith("command.py:6: FutureWarning: an old call"), result.stderr
    for option, code, said in (("ignore", 0, ""), ("error", 1, "error: a.bin: worth knowing\n")):  # -W first
        result = subprocess.run([sys.executable, "-W", option, str(script)], capture_output=True, text=True,
                                timeout=60)
        assert (result.returncode, result.stderr) == (code, said)
