"""A run's progress as train.py keeps it (bailong/progress.py): progress lines where no bar shows, metrics.jsonl
and loss.png, the closing summary, a graceful stop on SIGTERM."""
import json
import math
import os
import signal

import pytest

from train_runs import run_train


def test_an_output_that_shows_no_bar_gets_progress_lines(tmp_path, capsys, monkeypatch):
    """A log file (nohup, a job scheduler's) shows no progress bar: it gets a line every minute instead, here
    every step; a terminal gets the bar alone."""
    import re

    from bailong import progress
    stdout, _ = run_train(capsys, "--steps", "2", "--eval-every", "2", "--out", tmp_path / "quiet")
    assert "step 1/2" not in stdout  # runs of under a minute
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    stdout, _ = run_train(capsys, "--steps", "3", "--eval-every", "3", "--out", tmp_path / "run")
    lines = [line for line in stdout.splitlines() if re.match(r"step \d/3: loss", line)]
    assert [line.split(":")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"], stdout
    assert re.fullmatch(r"step 1/3: loss \d+\.\d{4}, [\d,]+ tokens/s, 0m \d\ds elapsed, 0m \d\ds left", lines[0])
    assert progress.progress_line(10, 1000, 2.5, 1234.5, 600.0, 10) == \
        "step 10/1,000: loss 2.5000, 1,234 tokens/s, 10m 00s elapsed, 16h 30m left"


def test_the_closing_means_are_of_steps_apart_in_a_short_run(tmp_path):
    from bailong.progress import summary
    from bailong.run_folder import RunFolder
    rows = [{"step": i + 1, "loss": loss} for i, loss in enumerate([5.0, 4.0, 3.0, 2.0, 1.0])]
    assert "training loss 4.5000 -> 1.5000 (means of the first and last 2 steps)" in summary(
        rows, 5, None, RunFolder(tmp_path), None, 0)
    # a held-out loss never lowered: memorised where the training loss fell, not learned where it rose too (it
    # said "memorised" of a run a high --lr made diverge), or where it fell from a spike only to the held-out
    # loss (a run collapsed to uniform outputs, ln 260 on any data)
    evals = [{"step": 0, "eval_loss": 4.0}, {"step": 5, "eval_loss": 4.5}]
    collapsed = [{"step": 0, "eval_loss": 5.559}, {"step": 5, "eval_loss": 5.5607}]
    for trained, said, evals in [
            ([5.0, 4.0, 3.0, 2.0, 1.0], ": the run memorised its data rather than learned", evals),
            ([5.0, 6.0, 7.0, 7.0, 8.0], ", nor its own: the run did not learn (a --lr too high", evals),
            ([5.57, 11794.0, 5.5607, 5.5607, 5.5607], ", and its own no lower than it (a run collapsed to outputs "
             "that fit nothing): the run did not learn (a --lr too high", collapsed)]:
        text = summary([{"step": i + 1, "loss": x} for i, x in enumerate(trained)] + evals, 5, None,
                       RunFolder(tmp_path), 5, 0.1)
        assert f"warning: training never lowered the held-out loss{said}" in text
        assert "; the adapter kept does worse on it than none" in text


def test_sigterm_during_training_stops_as_ctrl_c_does():
    """The first SIGTERM (a job scheduler's stop) lets the step finish and the run save; a second stops at once,
    as SIGTERM ends a command (exit 143; it was raised as Ctrl-C, 130)."""
    from bailong.errors import Terminated
    from bailong.progress import GracefulStop
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), GracefulStop(lambda *a, **k: None) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.code == 143  # the exit status train.py gives after saving
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(KeyboardInterrupt), GracefulStop(lambda *a, **k: None):  # a Ctrl-C after a SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)


def test_a_plot_that_cannot_be_written_is_a_warning(tmp_path, capsys):
    """loss.png is a picture of metrics.jsonl: a run whose adapter and checkpoint were saved ended with exit 1 and
    only "loss.png: could not write" when the disk filled at the plot."""
    from bailong.progress import Metrics
    (tmp_path / "a-file").write_text("not a folder")
    metrics = Metrics(tmp_path / "metrics.jsonl", tmp_path / "a-file" / "loss.png")
    metrics.log(step=1, loss=2.0)
    metrics.plot()
    assert capsys.readouterr().err == (f"warning: {tmp_path}/a-file/loss.png: could not write ({tmp_path}/a-file is "
                                       "a file, not a folder); the plot was not updated\n")


def test_the_plot_is_drawn_again_only_for_new_rows(tmp_path, monkeypatch):
    """A run whose last step is evaluated drew the same picture twice (at the evaluation and at the end), and a
    plot a run cannot write is tried again at the next call."""
    from bailong import progress
    from bailong.progress import Metrics
    drawn, write = [], progress.atomic_write
    monkeypatch.setattr(progress, "atomic_write", lambda path, *a: drawn.append(path) or write(path, *a))
    metrics = Metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    metrics.log(step=1, loss=2.0)
    metrics.plot(), metrics.plot()
    metrics.log(step=1, eval_loss=2.5)
    metrics.plot(), metrics.plot()
    assert len(drawn) == 2
    (tmp_path / "a-file").write_text("not a folder")
    metrics.plot_file = tmp_path / "a-file" / "loss.png"
    metrics.log(step=2, loss=1.5)
    metrics.plot(), metrics.plot()
    assert len(drawn) == 4


def test_the_plot_leaves_a_callers_matplotlib_as_it_was(tmp_path):
    """A run from Python (a notebook calling train.main): drawing the losses switched matplotlib's backend to Agg,
    and the notebook's own plots stopped showing. It is drawn apart, and is a PNG."""
    import matplotlib

    from bailong.progress import Metrics
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        metrics = Metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
        for step, loss in [(0, 6.0), (1, 5.0), (2, 4.5)]:
            metrics.log(step=step, loss=loss, eval_loss=loss + 0.1)
        metrics.plot()
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_damaged_metrics_file_keeps_its_readable_records(tmp_path, capsys):
    """A record that is not a step's (a list, no "step", a step that is not a number, bytes not UTF-8) ended
    --resume in a traceback; the readable ones are kept, the others named, a last line cut short dropped."""
    from bailong.progress import Metrics
    file = tmp_path / "metrics.jsonl"
    good = ['{"step": 0, "eval_loss": 6.3}', '{"step": 2, "loss": 5.0}', '{"step": 2, "eval_loss": 5.1}']
    file.write_bytes("\n".join([good[0], "[1]", good[1], '{"eval_loss": 1}', '{"step": "x"}', good[2]]).encode()
                     + b"\n\xff\xfe\n" + b'{"step": 3, "lo')
    metrics = Metrics(file, tmp_path / "loss.png", keep_until=2)
    assert metrics.rows == [json.loads(r) for r in good] and file.read_text().splitlines() == good
    assert [line.split(": not")[0] for line in capsys.readouterr().err.splitlines()] == \
        [f"warning: {file}:{n}" for n in (2, 4, 5, 7)]


def test_perplexity_is_exp_of_the_loss_past_50_too():
    """A run that diverged past a held-out loss of 50 was said and logged at exp(50) = 5.18e21, whatever its loss;
    eval's perplexity ended in OverflowError's traceback past 709.78."""
    from bailong.progress import perplexity
    assert perplexity(60.0) == math.exp(60.0) and perplexity(710.0) == math.inf
