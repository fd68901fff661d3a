"""train.py under torchrun (processes on the CPU, gloo): a step's gradients and loss, the held-out loss, each
process's dropout masks and random state, a stop by Ctrl-C or SIGTERM, and what each process says; and one
process whose standard output is closed."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from train_runs import evals, losses

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def train(out, *args, processes=2, **popen):
    command = (TORCHRUN if processes > 1 else [sys.executable]) + [str(ROOT / "train.py"), "--out", str(out), *args]
    if popen:
        return subprocess.Popen(command, env=ENV, text=True, **popen)
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("chunked", [[], ["chunked"], ["checkpointed"]])
def test_two_processes_give_the_gradients_and_loss_of_one_over_the_combined_batch(tmp_path, chunked):
    """Also (``chunked``) with the fused LoRA and the MLP in chunks, whose node hands DDP the summed gradients,
    and (``checkpointed``) with each layer checkpointed as a node of its own, which does too. The loss each
    process returns is the whole step's, as one process's over the combined batch is."""
    one = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_step.py"), str(tmp_path), "8", *chunked],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(TORCHRUN + [str(ROOT / "tests" / "ddp_step.py"), str(tmp_path), "4", *chunked],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    single, *double = (torch.load(tmp_path / f"step-{w}-{r}.pt") for w, r in ((1, 0), (2, 0), (2, 1)))
    for name, grad in single["grads"].items():
        torch.testing.assert_close(double[0]["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    for each in double:
        torch.testing.assert_close(each["loss"], single["loss"], atol=1e-6, rtol=1e-6)


def test_torchrun_trains_and_evaluates_as_one_process_with_the_whole_batch(tmp_path):
    """Two processes of batch 1 log the losses and held-out losses of one process of batch 2 (without dropout,
    whose masks are each process's own); rank 0 writes the run."""
    args = ["--steps", "4", "--new-pieces", "50", "--eval-every", "2", "--lora-dropout", "0"]
    result = train(tmp_path / "ddp", *args, "--batch-size", "1")
    train(tmp_path / "one", *args, "--batch-size", "2", processes=1)
    assert "2 process(es)" in result.stdout and [s for s, _ in losses(tmp_path / "ddp")] == [1, 2, 3, 4]
    for ours, theirs in ((losses, losses), (evals, evals)):
        ddp, one = ours(tmp_path / "ddp"), theirs(tmp_path / "one")
        assert [s for s, _ in ddp] == [s for s, _ in one]
        assert [loss for _, loss in ddp] == pytest.approx([loss for _, loss in one], abs=1e-5)
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()
    _, err = train(tmp_path / "ddp", *args, "--batch-size", "1", "--steps", "5", "--resume",
                   processes=1, stdout=subprocess.PIPE, stderr=subprocess.PIPE).communicate(timeout=300)
    assert "holds a different run (it was trained by 2 process(es), now 1)" in err


SLOW_RANK_0 = """
import os, runpy, sys, time
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
from bailong import data, runs, token_cache, vocab, zip_tie
init, tokenize, learn, read, grow = (dist.init_process_group, token_cache.tokenize, vocab.extend_tokenizer,
                                     data.read_corpus, zip_tie.extend_model)
timeout, pids, sleep, own_disk = sys.argv[1:5]
rank = os.environ["RANK"]
if timeout != "as torch's":
    dist.init_process_group = lambda *a, **k: init(*a, **k, timeout=timedelta(seconds=float(timeout)))
Path(pids, rank).write_text(str(os.getpid()))


def noted(name, function):  # the function, leaving a file name-rank where a process calls it
    def call(*args):
        Path(pids, f"{name}-{rank}").touch()
        return function(*args)
    return call


def slowly(*args):  # rank 0's tokenizing (with an own disk, rank 1's), as of a large corpus
    if rank == ("1" if own_disk else "0") and not hasattr(slowly, "slept"):
        Path(pids, "tokenizing").touch()
        slowly.slept = time.sleep(float(sleep))
    return tokenize(*args)


def grown(model, base, extended, *args):  # the tokenizer a process's model is grown for
    Path(pids, "tokenizer-" + rank).write_bytes(extended.serialized())
    return grow(model, base, extended, *args)


token_cache.tokenize, vocab.extend_tokenizer = noted("tokenized", slowly), noted("learned", learn)
data.read_corpus, zip_tie.extend_model = noted("read", read), grown
if own_disk and rank != "0":  # as on another machine (its first process), whose disk lacks rank 0's run folder
    token_cache.opened, runs.check_output, os.environ["LOCAL_RANK"] = lambda *a: None, lambda *a: 0, "0"
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def slow_rank_0(tmp_path, timeout, sleep, *args, own_disk=False, **popen):
    """train.py under torchrun, rank 0 tokenizing for ``sleep`` seconds first, the process group's timeout
    ``timeout`` seconds; ``own_disk``: rank 1 finds no run folder, nor rank 0's token cache, and tokenizes for
    ``sleep`` seconds instead. In tmp_path each process's pid
    (a file named by its rank), the tokenizer its model is grown for (tokenizer-rank), and whether it read the
    corpus (read-rank), learned pieces (learned-rank) and tokenized (tokenized-rank)."""
    (tmp_path / "slow.py").write_text(SLOW_RANK_0)
    command = TORCHRUN + [str(tmp_path / "slow.py"), timeout, str(tmp_path), sleep, "own disk" * own_disk,
                          str(ROOT / "train.py"), "--out", str(tmp_path / "out"), *args]
    return subprocess.Popen(command, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_the_others_wait_for_rank_0_to_tokenize_past_the_process_groups_timeout(tmp_path):
    """Rank 0 fills the token cache alone, and on a large corpus that can take longer than a collective may
    (NCCL's ten minutes): the others waited in a barrier, which failed at the timeout (here 8 seconds, rank 0
    tokenizing for 16). Rank 0 alone reads the corpus and learns the new pieces (each process learned them, all
    at once, each with every core and its own copy of the trainer's memory; and each read the whole corpus, and
    held its text through the run): the others take its tokenizer and open its token cache."""
    process = slow_rank_0(tmp_path, "8", "16", "--steps", "2", "--new-pieces", "50")
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and "step 2: held-out loss" in stdout, stderr[-3000:]
    assert [(tmp_path / f"{name}-{rank}").exists() for name in ("read", "learned", "tokenized") for rank in "01"] \
        == [True, False] * 3
    assert (tmp_path / "tokenizer-0").read_bytes() == (tmp_path / "tokenizer-1").read_bytes()


def test_a_process_whose_disk_lacks_rank_0s_run_folder_tokenizes_the_corpus_itself_and_may_not_resume(tmp_path):
    """On another machine, whose disk does not hold rank 0's run folder, a process tokenizes the corpus itself,
    with rank 0's tokenizer, and the run trains as one process with the whole batch: rank 0 waits for it on the
    store, where it failed in DDP's first collective at the process group's timeout (8 seconds here, the other
    tokenizing for 16). Resumed there, that process waited forever for the vocabulary: it is refused at once."""
    args = ["--steps", "3", "--new-pieces", "50", "--eval-every", "3", "--lora-dropout", "0"]
    process = slow_rank_0(tmp_path, "8", "16", *args, "--batch-size", "1", own_disk=True)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert all((tmp_path / f"{name}-1").exists() for name in ("read", "tokenized"))
    assert not (tmp_path / "learned-1").exists()
    assert (tmp_path / "tokenizer-0").read_bytes() == (tmp_path / "tokenizer-1").read_bytes()
    train(tmp_path / "one", *args, "--batch-size", "2", processes=1)
    for logged in (losses, evals):
        assert [loss for _, loss in logged(tmp_path / "out")] == pytest.approx(
            [loss for _, loss in logged(tmp_path / "one")], abs=1e-5)
    process = slow_rank_0(tmp_path, "8", "0", *args, "--batch-size", "1", "--steps", "4", "--resume", own_disk=True,
                          start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:  # (it hung): nothing left behind
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0 and "[rank 1] error: " + str(tmp_path / "out") + ": rank 0 finds 3 steps done " \
        "there, this process 0: processes on several machines need --out on a disk they share" in stderr, stderr


def test_a_process_waiting_for_rank_0_stops_at_sigterm(tmp_path):
    """Inside a barrier a process answered neither SIGTERM nor Ctrl-C (torchrun killed it 30 seconds later): it
    stops at once, and torchrun stops rank 0."""
    process = slow_rank_0(tmp_path, "as torch's", "600", "--steps", "2", "--new-pieces", "0", start_new_session=True)
    try:
        while not (tmp_path / "tokenizing").exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(3)  # rank 1 waiting
        start = time.monotonic()
        os.kill(int((tmp_path / "1").read_text()), signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # nothing left behind where it failed
            os.killpg(process.pid, signal.SIGKILL)
    assert time.monotonic() - start < 15 and "failed (exitcode: 143) local_rank: 1" in stderr, stderr[-3000:]
    assert stderr.count("exitcode  : 143") == 2 and stderr.count("Traceback") == 1  # torchrun's own, no other


SHARED = """
import hashlib, os
import torch.distributed as dist
from bailong.processes import rank_0_done
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
for size in (0, 5, 12 << 20):  # nothing, a word, more than the store takes in one message (a large tokenizer.json)
    value = rank_0_done(f"value {size}", world, rank, os.urandom(size) if rank == 0 else b"")
    line = f"{size} {len(value)} {hashlib.sha256(value).hexdigest()}\\n"  # written at once: print's two writes
    os.write(1, line.encode())  # (the text, then its end) let the other process's lines come between them
dist.destroy_process_group()
"""


def test_what_rank_0_made_reaches_every_process_whatever_its_size(tmp_path):
    (tmp_path / "shared.py").write_text(SHARED)
    run = subprocess.run(TORCHRUN + [str(tmp_path / "shared.py")], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = sorted(run.stdout.split("\n")[:-1])
    assert len(lines) == 6 and lines[0::2] == lines[1::2], run.stdout  # both processes the same
    assert [line.split()[:2] for line in lines[0::2]] == [["0", "0"], [str(12 << 20)] * 2, ["5", "5"]]


def test_a_terminals_ctrl_c_stops_every_process_after_the_save_and_the_run_resumes_exactly(tmp_path):
    """Ctrl-C reaches each process from the terminal and again from torchrun: one stop, saved once all of them
    finished the step. Each process draws its own dropout masks and keeps its own random state, so the resumed
    run goes on as one never stopped."""
    args = ["--steps", "20", "--new-pieces", "50", "--eval-every", "4", "--save-every", "100", "--lora-dropout", "0.1"]
    train(tmp_path / "whole", *args)
    process = train(tmp_path / "stopped", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    start_new_session=True)  # its own process group, as a terminal's foreground job
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4) and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the signal to every process of the group
    stdout, stderr = process.communicate(timeout=300)
    assert "interrupted after step" in stdout, stderr[-3000:]
    stopped_at = int(stdout.split("interrupted after step ")[1].split(":")[0])
    assert stopped_at < 20 and stderr.count("stopping after this step") == 1
    state = torch.load(tmp_path / "stopped" / "checkpoints" / f"step-{stopped_at:07d}" / "state.pt",
                       weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    result = train(tmp_path / "stopped", *args, "--resume")
    assert "resumed from" in result.stdout
    assert losses(tmp_path / "stopped") == losses(tmp_path / "whole")
    assert evals(tmp_path / "stopped") == evals(tmp_path / "whole")


def test_a_closed_standard_output_stops_after_the_save(tmp_path):
    """train.py | head, or a pager quit: the run stops as on Ctrl-C, saving the step (it ended on "Broken pipe" and
    lost every step since its last checkpoint); closed before training begins, it ends quietly, as a pipe's
    writer does."""
    args = ["--steps", "200", "--new-pieces", "0", "--eval-every", "2", "--save-every", "100"]
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # each line sent as it is said all the same

    def train(out, *args, stderr=subprocess.PIPE):
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out", str(out), *args], env=env,
                                text=True, stdout=subprocess.PIPE, stderr=stderr)
    process = train(tmp_path / "run", *args)
    while "step 4: held-out loss" not in process.stdout.readline():
        assert process.poll() is None
    process.stdout.close()  # the reader goes
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 128 + signal.SIGPIPE, stderr[-3000:]
    assert "the output was closed: stopping after this step to save a checkpoint; continue with --resume" \
        in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and 6 <= int(saved[0].name[5:]) < 200  # a step after the one that found it closed
    process = train(tmp_path / "both", *args, stderr=subprocess.STDOUT)  # 2>&1 | head: the notice has nowhere to go
    while "step 4: held-out loss" not in process.stdout.readline():
        assert process.poll() is None
    process.stdout.close()
    assert process.wait(timeout=300) == 128 + signal.SIGPIPE
    assert len(list((tmp_path / "both" / "checkpoints").glob("step-*"))) == 1
    process = train(tmp_path / "early", *args)
    process.stdout.close()  # before its first line (after one, a busy machine let it say all before training)
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 128 + signal.SIGPIPE and stderr.strip() == "", stderr[-3000:]


def test_a_signal_echoed_by_torchrun_is_one_stop_and_a_later_one_stops_at_once():
    from bailong.progress import GracefulStop
    with GracefulStop(lambda *a, **k: None, echoes=0.5) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun passing the terminal's on
        assert stop.requested and stop.code == 130
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_each_machines_first_process_says_its_error_naming_its_rank(monkeypatch, capsys):
    from bailong.errors import BailongError, run_cli

    def fails(argv):
        raise BailongError("corpus.txt: no such file or folder")
    said = []
    for local, rank in (("0", "0"), ("1", "1"), ("0", "8")):
        monkeypatch.setenv("LOCAL_RANK", local)
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit):
            run_cli(fails, [])
        said.append(capsys.readouterr().err)
    assert said == ["error: corpus.txt: no such file or folder\n", "",
                    "[rank 8] error: corpus.txt: no such file or folder\n"]
