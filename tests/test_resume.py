"""Resuming a training run: bit-exact after a kill or Ctrl-C, a full disk while saving, damaged or foreign
checkpoints passed over for the one before, the random states of each device."""
import shutil
import signal
import subprocess
import sys
import time

import torch

from bailong.run_folder import latest_checkpoint
from conftest import ROOT
from train_runs import evals, losses, run_train

TRAIN = [sys.executable, str(ROOT / "train.py")]


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
    assert "note: --warmup 20 is not below --steps 10: the learning rate rises toward --lr 0.002 for the whole " \
           "run" in stdout  # a short trial's schedule, said


def test_a_gpus_random_state_is_saved_and_restored_on_the_training_device(monkeypatch):
    """The saving process's GPU state, restored by each process on its own GPU (a run's processes are seeded alike
    and draw alike; each restored every visible GPU's, rank 0's snapshot of GPU k onto rank k's); a checkpoint of
    before, every visible GPU's, by the GPU's index, and where fewer were visible than now (it failed)."""
    from bailong.checkpoints import rng_state, set_rng_state
    states, restored = [torch.tensor([5], dtype=torch.uint8), torch.tensor([7], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[torch.device(device).index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: restored.append((torch.device(device).index, state.item())))
    saved = rng_state("cuda:1")
    set_rng_state(saved, "cuda:0")
    set_rng_state(saved, "cuda:3")
    before = dict(saved, cuda=states)
    set_rng_state(before, "cuda:1")
    set_rng_state(before, "cuda:5")
    assert restored == [(0, 7), (3, 7), (1, 7), (5, 5)]
    set_rng_state(saved, "cpu")  # nothing of a GPU's on the CPU, nor saved from it
    assert len(restored) == 4 and "cuda" not in rng_state("cpu")


def test_resume_passes_over_a_state_that_reads_but_is_not_a_checkpoints(tmp_path, capsys):
    """A state.pt that unpickles (safely) but holds other values: passed over with a warning, as a damaged one
    (each ended in a traceback)."""
    out = tmp_path / "run"
    args = ["--save-every", "2", "--eval-every", "2", "--out", out]
    run_train(capsys, *args, "--steps", "4")
    shutil.copytree(out, tmp_path / "as-it-was")
    state_file = out / "checkpoints" / "step-0000004" / "state.pt"
    good = torch.load(state_file, weights_only=True)
    for changed, said in [({"step": "4"}, "not a checkpoint's state"), ({"optimizer": {}}, "not a checkpoint's state"),
                          ({"rng": {}}, "does not fit this run (KeyError: 'torch')"),
                          ({"rng": {**good["rng"], "torch": torch.zeros(3)}}, "does not fit this run (TypeError")]:
        torch.save({**good, **changed}, state_file)
        stdout, _ = run_train(capsys, *args, "--steps", "5", "--resume")
        assert f"warning: {state_file}: {said}" in stdout and "resuming from step-0000002 instead" in stdout, stdout
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "as-it-was", out)
    from torch import serialization  # a run trained on a GPU goes on on the CPU (it was refused as unreadable)
    tag = serialization.location_tag
    try:
        serialization.location_tag = lambda storage: "cuda:0"  # as torch.save writes a GPU's tensors
        torch.save(good, state_file)
    finally:
        serialization.location_tag = tag
    assert b"cuda:0" in state_file.read_bytes()
    stdout, _ = run_train(capsys, *args, "--steps", "5", "--resume")
    assert "step-0000004 at step 4" in stdout and "warning" not in stdout, stdout


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


def test_sft_counts_its_real_tokens_and_a_resumed_run_goes_on_counting(tmp_path, capsys):
    """SFT's tokens/s and metrics.jsonl's tokens counted padding (17% of the default's positions): they count
    each step's real input tokens now, and a resumed run goes on from what the steps before it fed."""
    import json
    run_train(capsys, "--steps", "2", "--held-out", "0", "--out", tmp_path / "pre")
    sft = ["--stage", "sft", "--init", tmp_path / "pre", "--batch-size", "3", "--grad-accum", "2", "--held-out", "0"]
    stdout, _ = run_train(capsys, *sft, "--steps", "4", "--out", tmp_path / "whole")
    run_train(capsys, *sft, "--steps", "2", "--out", tmp_path / "part")
    run_train(capsys, *sft, "--steps", "4", "--resume", "--out", tmp_path / "part")

    def tokens(out):
        return [json.loads(line).get("tokens") for line in (out / "metrics.jsonl").read_text().splitlines()]
    counted = tokens(tmp_path / "whole")
    assert counted == tokens(tmp_path / "part") and len(counted) == 4, counted
    steps = [b - a for a, b in zip([0] + counted, counted)]
    assert all(0 < s < 3 * 2 * 128 for s in steps) and len(set(steps)) > 1, steps  # padding left out
    assert "% of them padding)" in stdout


def test_resume_onto_a_base_whose_weights_changed_is_refused(tmp_path, capsys):
    """The run's fingerprint of its base holds the files' names and sizes; other weights of the same size (a
    folder updated in place, another model copied over it) were resumed onto, the adapter trained on one base
    going on with another. Its checkpoints say which base they were trained on."""
    import bailong
    from bailong.tokenizer import byte_tokenizer
    base, out = tmp_path / "base", tmp_path / "run"
    for seed in (0, 1, 0):
        bailong.save(bailong.load_preset("tiny", device="cpu", seed=seed)[0], base)
        byte_tokenizer().save(base)
        args = ["--model", base, "--new-pieces", "0", "--save-every", "2", "--eval-every", "2", "--out", out]
        if seed == 0 and not out.exists():
            run_train(capsys, *args, "--steps", "2")
        elif seed == 1:
            _, err = run_train(capsys, *args, "--steps", "4", "--resume", code=1)
            assert err.splitlines()[-1] == f"error: {out}: its checkpoints were trained on another base than the " \
                "one loaded now (its weights changed since the run began, or another was named): resuming would go " \
                "on training them on other weights; restore the base, or start again with another --out"
        else:
            stdout, _ = run_train(capsys, *args, "--steps", "4", "--resume")
            assert f"resumed from {out / 'checkpoints' / 'step-0000002'} at step 2" in stdout
