"""Running train.py from the tests: in this process, and reading the metrics a run logs."""
import json

import pytest

from bailong.errors import run_cli


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def evals(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


def run_train(capsys, *argv, code=0):
    """train.py in this process (seconds faster than a new one): its exit code checked, its output returned."""
    import train
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, list(map(str, argv)))
    captured = capsys.readouterr()
    assert exit_.value.code == code, captured.err[-2000:]
    return captured.out, captured.err
