"""train.py end to end: the embedded default, exact resume, several processes, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from bailong.data import TokenData, split
from bailong.errors import UsageError, run_cli
from bailong.runs import latest_checkpoint
from bailong.training import CHOICES, SAMPLES, TrainConfig, lr_at, parse_config
from conftest import ROOT

TRAIN = [sys.executable, str(ROOT / "train.py")]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def evals(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


def test_embedded_default_pretrain_sft_and_chat(tmp_path):
    """The quick start: both stages learn (held-out loss falls, not only training loss) and the result is
    the adapter with the best held-out loss."""
    pre, sft = tmp_path / "pretrain", tmp_path / "sft"
    result = subprocess.run(TRAIN + ["--stage", "pretrain", "--out", str(pre)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [loss for _, loss in losses(pre)]
    assert len(curve) == 100 and sum(curve[-10:]) / 10 < 0.7 * sum(curve[:10]) / 10  # clearly learned
    held = [loss for _, loss in evals(pre)]
    assert [s for s, _ in evals(pre)] == [0, 20, 40, 60, 80, 100]
    assert all(b < a for a, b in zip(held, held[1:])), held  # held-out loss falls at every evaluation
    assert (pre / "loss.png").stat().st_size > 1000 and (pre / "adapter" / "tokenizer.model").exists()
    assert "vocabulary: +300 pieces (260 -> 560)" in result.stdout
    assert "best 3.8" in result.stdout and "(the adapter of step 100, best on held-out data)" in result.stdout
    result = subprocess.run(TRAIN + ["--stage", "sft", "--init", str(pre), "--out", str(sft)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    held = [loss for _, loss in evals(sft)]
    assert len(losses(sft)) == 60 and min(held[1:]) < held[0] - 0.05 and held[-1] < held[0]
    assert "warning" not in result.stdout
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(sft), "--prompt", "臺灣最高的山是哪一座？",
                             "--temperature", "0", "--max-new-tokens", "30"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_bfloat16_autocast_with_activation_checkpointing_trains(tmp_path):
    """What a GPU run does by default (bf16 weights and autocast, recomputed layers), on the CPU."""
    out = tmp_path / "bf16"
    result = subprocess.run(TRAIN + ["--precision", "bf16", "--checkpointing", "on", "--steps", "30",
                                     "--eval-every", "30", "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [loss for _, loss in losses(out)]
    assert sum(curve[-10:]) / 10 < 0.8 * sum(curve[:10]) / 10
    from safetensors.torch import load_file
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for k, t in saved.items() if "lora_" in k)  # LoRA kept in fp32


def wait_for_step(out, step, process):
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").exists() and any(s >= step for s, _ in losses(out)):
            return
        time.sleep(0.01)
    raise AssertionError(f"the run never reached step {step}")


def test_resume_after_sigkill_or_ctrl_c_is_bit_exact(tmp_path):
    """With LoRA dropout on, a run killed (SIGKILL) or interrupted (Ctrl-C) and resumed logs the same loss
    at every step, and the same held-out losses, as a run that never stopped."""
    args = ["--steps", "40", "--save-every", "10", "--eval-every", "10", "--new-pieces", "100",
            "--lora-dropout", "0.1"]
    whole, killed, interrupted = tmp_path / "whole", tmp_path / "killed", tmp_path / "interrupted"
    assert subprocess.run(TRAIN + args + ["--out", str(whole)], capture_output=True, timeout=600).returncode == 0
    process = subprocess.Popen(TRAIN + args + ["--out", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_step(killed, 25, process)  # somewhere after its second checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest_checkpoint(killed).name in ("step-0000020", "step-0000030")
    process = subprocess.Popen(TRAIN + args + ["--out", str(interrupted)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(interrupted, 13, process)  # between checkpoints: the interrupted step's dropout is drawn
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "stopping after this step" in stderr and "interrupted after step" in stdout
    stopped_at = int(stdout.split("interrupted after step ")[1].split(":")[0])
    assert 13 <= stopped_at < 40 and stopped_at % 10 and latest_checkpoint(interrupted).name == f"step-{stopped_at:07d}"
    for out in (killed, interrupted):
        again = subprocess.run(TRAIN + args + ["--out", str(out), "--resume"], capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "resumed from" in again.stdout
        assert losses(out) == losses(whole) and evals(out) == evals(whole)  # every step, to the last bit


def run_train(capsys, *argv, code=0):
    """train.py in this process (seconds faster than a new one): its exit code checked, its output returned."""
    import train
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, list(map(str, argv)))
    captured = capsys.readouterr()
    assert exit_.value.code == code, captured.err[-2000:]
    return captured.out, captured.err


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    from bailong import checkpoints
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def save(obj, path, *args, **kwargs):  # the second checkpoint meets a full disk
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save)
    args = ["--steps", "10", "--save-every", "5", "--eval-every", "5", "--new-pieces", "50", "--out", out]
    _, err = run_train(capsys, *args, code=1)
    assert err.strip().splitlines()[-1] == (f"error: {out}/checkpoints/step-0000010: could not write (No space left "
                                            f"on device); step 10 was not saved, {out}/checkpoints/step-0000005 "
                                            "is intact")
    assert latest_checkpoint(out).name == "step-0000005" and not list((out / "checkpoints").glob(".*"))
    monkeypatch.undo()
    stdout, _ = run_train(capsys, *args, "--resume")
    assert "resumed from" in stdout and latest_checkpoint(out).name == "step-0000010"


def test_the_8bit_optimizer_trains_and_resumes_exactly(tmp_path, capsys):
    """--optimizer adamw8bit: the checkpoints hold the moments' uint8 codes, a resumed run logs the same losses as
    one that never stopped, the losses stay within 1% of a run with float32 moments, and another optimizer cannot
    resume the run."""
    args = ["--save-every", "4", "--eval-every", "4", "--new-pieces", "50", "--lora-r", "64"]  # r x 64 >= 4096 values
    whole, resumed, float32 = tmp_path / "whole", tmp_path / "resumed", tmp_path / "float32"
    run_train(capsys, *args, "--steps", "12", "--optimizer", "adamw8bit", "--out", whole)
    run_train(capsys, *args, "--steps", "8", "--optimizer", "adamw8bit", "--out", resumed)
    run_train(capsys, *args, "--steps", "12", "--optimizer", "adamw8bit", "--out", resumed, "--resume")
    assert losses(resumed) == losses(whole)
    state = torch.load(resumed / "checkpoints" / "step-0000012" / "state.pt", weights_only=True)["optimizer"]
    codes = [s["exp_avg"] for s in state["state"].values() if "exp_avg_absmax" in s]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
    run_train(capsys, *args, "--steps", "12", "--out", float32)
    apart = [abs(a - b) / b for (_, a), (_, b) in zip(losses(whole), losses(float32))]
    assert 0 < max(apart) < 0.01  # rounded moments: another run, the same training
    _, err = run_train(capsys, *args, "--steps", "16", "--out", resumed, "--resume", code=2)
    assert "--optimizer was 'adamw8bit', now 'adamw'" in err


def test_keep_dequantized_trains_the_same_run_with_fewer_dequantizations(tmp_path, capsys, monkeypatch):
    """--keep-dequantized (bailong.recompute), activation checkpointing on: the losses of a run without it, fewer
    NF4 dequantizations, and a run continues with or without it (it changes nothing the run computes)."""
    from bailong.nf4 import NF4Tensor
    calls, dequantize = [], NF4Tensor.dequantize
    monkeypatch.setattr(NF4Tensor, "dequantize", lambda q, *a, **k: calls.append(q) or dequantize(q, *a, **k))
    args, counts = ["--checkpointing", "on", "--eval-every", "4", "--save-every", "4"], {}
    for name, keep in [("plain", []), ("kept", ["--keep-dequantized"])]:
        calls.clear()
        run_train(capsys, *args, *keep, "--steps", "4", "--out", tmp_path / name)
        counts[name] = len(calls)
    assert losses(tmp_path / "kept") == losses(tmp_path / "plain")
    assert counts["kept"] < 0.8 * counts["plain"]
    run_train(capsys, *args, "--steps", "8", "--keep-dequantized", "--resume", "--out", tmp_path / "plain")
    assert [step for step, _ in losses(tmp_path / "plain")] == list(range(1, 9))


def test_resume_falls_back_to_the_newest_checkpoint_that_reads(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--save-every", "5", "--eval-every", "5", "--new-pieces", "50", "--out", out]
    run_train(capsys, *args, "--steps", "10")
    whole = losses(out)
    weights = out / "checkpoints" / "step-0000010" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: a crash, or a disk that filled up
    stdout, _ = run_train(capsys, *args, "--steps", "12", "--resume")
    assert f"warning: {weights}: not a valid safetensors file" in stdout
    assert "resuming from step-0000005 instead" in stdout
    assert losses(out)[:10] == whole  # steps 6-10 again, exactly as before
    state = out / "checkpoints" / "step-0000012" / "state.pt"
    state.write_bytes(state.read_bytes()[:500])
    (out / "checkpoints" / "LATEST").write_text("step-0000099")  # names a checkpoint that is gone
    stdout, _ = run_train(capsys, *args, "--steps", "14", "--resume")
    assert "step-0000099: missing" in stdout and f"{state}: unreadable" in stdout
    assert "resuming from step-0000010 instead" in stdout
    for folder in (out / "checkpoints").glob("step-*"):
        (folder / "state.pt").write_bytes(b"")
    _, err = run_train(capsys, *args, "--steps", "16", "--resume", code=1)
    assert err.startswith(f"error: {out}/checkpoints: no checkpoint can be read (") and err.count("\n") == 1


def test_the_result_is_the_best_held_out_adapter_and_patience_stops_a_run_that_memorises(tmp_path, capsys):
    """A run that overfits (the pre-training rate for 300 steps) stops once held-out loss has not improved
    for --patience evaluations; adapter/ holds the best evaluated step, the checkpoint the last."""
    import bailong
    from bailong.data import tokenize
    from bailong.data import data_paths, read_corpus
    out = tmp_path / "run"
    stdout, _ = run_train(capsys, "--steps", "300", "--eval-every", "25", "--patience", "2", "--out", out)
    record = evals(out)
    best_step, best = min(record[1:], key=lambda r: r[1])
    last_step = record[-1][0]
    assert f"stopped early after step {last_step}: held-out loss has not improved for 2 evaluations" in stdout
    assert last_step < 300 and record[-1][1] > best and record[-2][1] > best and best_step == last_step - 50
    assert f"(the adapter of step {best_step}, best on held-out data)" in stdout
    assert latest_checkpoint(out).name == f"step-{last_step:07d}"
    # the result, loaded as chat.py loads it, has exactly the best held-out loss
    model, tokenizer = bailong.load(out, device="cpu", quantize="nf4")
    config = TrainConfig()
    _, held = split(read_corpus(data_paths(config.data)), config.held_out, config.seed)
    data = TokenData(*tokenize(tokenizer, held, tmp_path / "cache", 1), config.seq_len, tokenizer.eos_id)
    examples = list(range(data.n))
    total = []
    with torch.no_grad():
        for i in range(0, len(examples), config.batch_size):
            inputs, targets = data.batch(examples[i:i + config.batch_size])
            logits = model(inputs)
            total.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    assert sum(total[:config.eval_batches]) / len(total[:config.eval_batches]) == pytest.approx(best, abs=1e-5)


def test_no_held_out_data_keeps_the_last_step_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    stdout, _ = run_train(capsys, "--steps", "6", "--held-out", "0", "--new-pieces", "50", "--out", out)
    assert "no held-out data (--held-out 0)" in stdout and "(the adapter of the last step, 6)" in stdout
    assert (out / "loss.png").stat().st_size > 1000 and (out / "adapter" / "adapter_model.safetensors").exists()
    import bailong  # a checkpoint folder loads like the run itself (its base is found two folders up)
    model, tokenizer = bailong.load(latest_checkpoint(out), device="cpu")
    assert tokenizer.vocab_size == model.config.vocab_size == 260 + 50


def test_the_folder_is_locked_while_training_and_free_once_train_returns_or_fails(tmp_path, capsys, monkeypatch):
    """Another process may not train in a folder in use; once train.main returns (or fails), it may, and so may
    this process again (a notebook)."""
    from bailong import checkpoints, runs
    out, real_save, seen = tmp_path / "run", checkpoints.save_checkpoint, []

    def save_checkpoint(*args, fail=False, **kwargs):  # mid-run: is the folder free to others?
        seen.append(runs._lock_free(out))
        if fail:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint)
    run_train(capsys, "--steps", "2", "--held-out", "0", "--out", out)
    assert seen == [False] and runs._lock_free(out) and runs._HELD == {}
    import fcntl
    with open(out / ".lock") as probe:  # another process's probe at the same moment (torchrun's) is no run
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert runs._lock_free(out)
    monkeypatch.setattr(checkpoints, "save_checkpoint", partial(save_checkpoint, fail=True))
    _, err = run_train(capsys, "--steps", "4", "--held-out", "0", "--out", out, "--resume", code=1)
    assert "No space left on device" in err and seen == [False, False] and runs._lock_free(out) and runs._HELD == {}


def test_a_run_is_known_by_its_options_not_by_how_out_is_spelled(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--steps", "4", "--eval-every", "2", "--new-pieces", "50"]
    run_train(capsys, *args, "--out", "run")
    _, err = run_train(capsys, *args, "--out", "run/", code=2)
    assert "error: run: already holds this run (4 of 4 steps done); pass --resume to continue it, or choose another " \
           "--out" in err and "--overwrite" not in err
    _, err = run_train(capsys, *args, "--out", "run/../run", "--resume", code=2)
    assert "the run has done 4 steps; pass --steps above 4 to continue it" in err
    shutil.copytree(tmp_path / "run", tmp_path / "copy")  # a copied (or moved) run continues where it was
    stdout, _ = run_train(capsys, *args[2:], "--steps", "6", "--eval-every", "2", "--out", "copy", "--resume")
    assert "continuing to step 6 (the run was started for 4)" in stdout and "resumed from" in stdout
    assert [s for s, _ in losses(tmp_path / "copy")] == [1, 2, 3, 4, 5, 6]
    _, err = run_train(capsys, *args, "--lr", "1e-3", "--out", "run", code=2)
    assert "holds a different run (--lr was 0.002, now 0.001); choose another --out" in err


def test_older_runs_resume_and_a_fine_tuning_run_keeps_its_own_base(tmp_path, capsys, monkeypatch):
    import hashlib
    monkeypatch.chdir(tmp_path)
    args = ["--eval-every", "2", "--new-pieces", "20"]
    run_train(capsys, *args, "--steps", "4", "--out", "pre")
    options = json.loads((tmp_path / "pre" / "run.json").read_text())["options"]
    del options["processes"]  # what the previous version wrote: every option, as typed
    older = {**options, "out": "pre", "steps": 4, "model": "", "init": "", "data": TrainConfig().data,
             "eval_every": 2, "eval_batches": 4, "save_every": 50}
    (tmp_path / "pre" / "run.json").write_text(json.dumps(older))
    stdout, _ = run_train(capsys, *args, "--steps", "5", "--out", "pre", "--resume")
    assert "resumed from" in stdout and [s for s, _ in losses(tmp_path / "pre")] == [1, 2, 3, 4, 5]
    sft = ["--stage", "sft", "--init", "pre", "--out", "sft", "--eval-every", "1"]
    run_train(capsys, *sft, "--steps", "2")
    base = tmp_path / "sft" / "base" / "model.safetensors"
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    run_train(capsys, *args, "--steps", "7", "--out", "pre", "--resume")  # --init changes under the SFT run
    stdout, _ = run_train(capsys, *sft, "--steps", "3", "--resume")
    assert "resumed from" in stdout and hashlib.sha256(base.read_bytes()).hexdigest() == before
    assert [s for s, _ in losses(tmp_path / "sft")] == [1, 2, 3]


def test_overwrite_replaces_only_a_run_and_never_an_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((SAMPLES / "zh_tw_sample.txt").read_text())
    args = ["--steps", "2", "--eval-every", "2", "--new-pieces", "20", "--data", corpus]
    for out in (".", tmp_path, "corpus.txt"):  # the working folder holds the corpus; the corpus itself
        _, err = run_train(capsys, *args, "--out", out, "--overwrite", code=2)
        assert "choose an --out apart from the run's inputs" in err or "is a file" in err
    assert corpus.read_text() == (SAMPLES / "zh_tw_sample.txt").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own file")
    _, err = run_train(capsys, *args, "--out", mine, "--overwrite", code=2)
    assert "holds files that are not a training run (notes.txt); choose another --out" in err
    run_train(capsys, *args, "--out", "run")
    stdout, _ = run_train(capsys, *args, "--lr", "1e-3", "--out", "run", "--overwrite")
    assert "--overwrite: removing the run in run (2 steps done): adapter/, base/, checkpoints/, loss.png, " \
           "metrics.jsonl, run.json" in stdout  # the token arrays of the same data and vocabulary are kept
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    (tmp_path / "short.txt").write_text("太短了。\n還是太短。\n")
    _, err = run_train(capsys, *args[:-2], "--new-pieces", "4", "--seq-len", "200", "--data", "short.txt", "--out",
                       "run", "--overwrite", code=1)
    assert "make no example of 200 tokens" in err  # found before the old run is removed: it is whole
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before.items() <= after.items() and {p.parent.name for p in after.keys() - before.keys()} == {"cache"}
    stdout, _ = run_train(capsys, *args, "--new-pieces", "10", "--out", "run", "--overwrite")
    assert "--overwrite: removing the run in run (2 steps done): adapter/, base/, cache/tokens-" in stdout
    assert len(list((tmp_path / "run" / "cache").iterdir())) == 4  # this run's ids and offsets, both parts
    (tmp_path / "run" / "notes.txt").write_text("put here later")
    _, err = run_train(capsys, *args, "--out", "run", "--overwrite", code=2)
    assert "run: holds notes.txt, which is not part of a run; nothing was removed" in err
    assert (tmp_path / "run" / "adapter").exists() and (mine / "notes.txt").exists()


def test_files_the_user_put_inside_a_run_are_never_removed(tmp_path, capsys, monkeypatch):
    """A file inside the run's own folders, which training replaces whole (adapter/) or prunes (checkpoints/), stops
    --overwrite and --resume alike; a checkpoint's name is exactly its step's; a folder left holding only the lock
    (a run stopped before it wrote run.json) is a new folder."""
    from bailong.runs import RunFolder, _not_a_runs
    monkeypatch.chdir(tmp_path)
    args = ["--steps", "4", "--save-every", "2", "--held-out", "0", "--new-pieces", "20"]
    run_train(capsys, *args, "--out", "run")
    assert _not_a_runs(tmp_path / "run") == []  # everything a run writes is in the layout
    for mine in ("adapter/README.md", "checkpoints/step-0000004-good/notes.txt", "base/generation_config.json"):
        (tmp_path / "run" / mine).parent.mkdir(exist_ok=True)
        (tmp_path / "run" / mine).write_text("the user's")
        for more in (["--overwrite"], ["--resume", "--steps", "6"]):
            _, err = run_train(capsys, *args, *more, "--out", "run", code=2)
            assert f"run: holds {mine.split('/')[0]}/{mine.split('/')[1]}" in err and "not part of a run" in err, err
        assert (tmp_path / "run" / mine).read_text() == "the user's"
        (tmp_path / "run" / mine).unlink()
    (tmp_path / "run" / "checkpoints" / "step-0000004-good").rmdir()
    adapter = tmp_path / "run" / "adapter"  # a link where the run writes a folder: the writes would go through it
    adapter.rename(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "notes.txt").write_text("the user's")
    adapter.symlink_to(tmp_path / "elsewhere")
    _, err = run_train(capsys, *args, "--resume", "--steps", "6", "--out", "run", code=2)
    assert "run: holds adapter/, which is not part of a run" in err and (tmp_path / "elsewhere" / "notes.txt").exists()
    adapter.unlink()
    (tmp_path / "elsewhere").rename(adapter)
    (adapter / "notes.txt").unlink()
    shutil.copytree(tmp_path / "run", tmp_path / "no-record")  # a run without its run.json is no new folder
    (tmp_path / "no-record" / "run.json").unlink()
    _, err = run_train(capsys, *args, "--out", "no-record", code=2)
    assert "no-record: holds files that are not a training run (a run without its run.json)" in err
    from bailong import checkpoints
    real_save = checkpoints.save_checkpoint

    def save_checkpoint(out, step, *args):  # a backup made while the run trains: not one of the run's checkpoints
        saved = real_save(out, step, *args)
        if step == 1:
            (RunFolder(out).checkpoints / "step-0000001-mine").mkdir()
        return saved

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint)
    run_train(capsys, *args, "--save-every", "1", "--out", "busy")
    assert sorted(p.name for p in RunFolder(tmp_path / "busy").checkpoints.iterdir()) == \
        ["LATEST", "step-0000001-mine", "step-0000003", "step-0000004"]
    left = tmp_path / "stopped"
    left.mkdir()
    (left / ".lock").write_text("")
    run_train(capsys, *args, "--out", left)


@pytest.mark.parametrize("chunked", [[], ["chunked"], ["checkpointed"]])
def test_two_processes_give_the_gradients_of_one_over_the_combined_batch(tmp_path, chunked):
    """Also (``chunked``) with the fused LoRA and the MLP in chunks, whose node hands DDP the summed gradients,
    and (``checkpointed``) with each layer checkpointed as a node of its own, which does too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_step.py"), str(tmp_path), "8", *chunked],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "tests" / "ddp_step.py"), str(tmp_path), "4", *chunked],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    single, double = torch.load(tmp_path / "grads-1.pt"), torch.load(tmp_path / "grads-2.pt")
    for name, grad in single.items():
        torch.testing.assert_close(double[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_schedule_and_config():
    config = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, config) == pytest.approx(1e-4) and lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(99, config) == pytest.approx(1e-4, rel=1e-2) and lr_at(55, config) == pytest.approx(5.5e-4, rel=1e-2)
    assert parse_config(["--stage", "sft", "--lora-r", "8"]).init == "out/pretrain"
    with pytest.raises(UsageError, match="--seed must be from 0 to 4294967295"):  # past any float, too
        parse_config(["--seed", str(10**400)])
    assert parse_config([]).out == "out/pretrain" and parse_config(["--no-rslora"]).rslora is False
    sft = parse_config(["--stage", "sft"])  # fine-tuning has its own defaults; what is given still wins
    assert (sft.lr, sft.steps, parse_config([]).lr) == (1e-4, 60, 2e-3)
    assert parse_config(["--stage", "sft", "--lr", "3e-4"]).lr == 3e-4


def test_sigterm_during_training_stops_as_ctrl_c_does():
    """The first SIGTERM (a job scheduler's stop) lets the step finish and the run save; a second stops at once."""
    from bailong.training import GracefulStop
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), GracefulStop(lambda *a, **k: None) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.code == 143  # the exit status train.py gives after saving
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_config_files_home_folder_is_the_users(tmp_path):
    """A "~" the shell did not expand (in a config file) is the home folder, not a folder named "~"."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"stage": "sft", "out": "~/runs/zh", "init": "~/runs/pretrain"}))
    parsed = parse_config(["--config", str(config)])
    assert (parsed.out, parsed.init) == (str(Path.home() / "runs/zh"), str(Path.home() / "runs/pretrain"))


def test_torchrun_two_processes_train_and_rank_zero_writes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "train.py"),
                             "--steps", "4", "--new-pieces", "50", "--eval-every", "2", "--out", str(tmp_path / "ddp")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and [s for s, _ in losses(tmp_path / "ddp")] == [1, 2, 3, 4]
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()


def test_a_non_finite_loss_stops(tmp_path):
    result = subprocess.run(TRAIN + ["--steps", "5", "--new-pieces", "50", "--lr", "1e30", "--min-lr", "0",
                                     "--warmup", "1", "--grad-clip", "1e30", "--out", str(tmp_path / "nan")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "error: the loss is" in result.stderr and "stopped" in result.stderr, \
        result.stderr[-2000:]


def test_a_real_checkpoint_and_tokenizer_through_both_stages(tmp_path):
    """The path a real run takes: a Hugging Face folder with the Llama 2 tokenizer, quantized while loading;
    the adapter carries the grown vocabulary and loading resizes the base to fit."""

    from hf_models import write_hf

    import bailong
    from conftest import asset
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32000, hidden_size=64, intermediate_size=128,
                         max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), folder / "tokenizer.model")
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    for argv in (["--model", folder, "--new-pieces", "200", "--out", pre],
                 ["--stage", "sft", "--init", pre, "--out", sft]):
        argv += ["--steps", "12", "--eval-every", "6", "--batch-size", "2"]
        result = subprocess.run(TRAIN + list(map(str, argv)),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (pre / "base").exists()  # the base is the user's folder, named in the adapter config
    assert json.loads((pre / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    model, tokenizer = bailong.load(pre, device="cpu")
    assert model.config.vocab_size == tokenizer.vocab_size == 32200
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.abs().sum() > 0
    model, tokenizer = bailong.load(sft, device="cpu")
    assert tokenizer.vocab_size == 32200 and (sft / "base" / "model.safetensors").exists()


def test_the_init_methods_offered_are_those_zip_tie_knows():
    from bailong.zip_tie import METHODS
    assert CHOICES["init_method"] == METHODS
