"""Whether a run may use a folder, and how a run is recognised (bailong/runs.py): by what it computes, not
by how its paths are spelled; another process's run, a run begun otherwise or by an earlier version, refused."""
import json
import shutil
from functools import partial

import pytest
import torch

from bailong.training import SAMPLES, TrainConfig
from train_runs import losses, run_train


def test_a_run_made_in_the_folder_while_this_one_loaded_is_left_whole(tmp_path, capsys, monkeypatch):
    """Two runs begun in one folder before either took its lock: the one that loaded last replaced the run the
    other had finished meanwhile (its metrics, adapter and run.json, under other options), and a --resume then
    went on from the other's checkpoint. The folder is checked again once its lock is held."""
    import train
    from bailong import runs
    from bailong.errors import run_cli
    out, real, meanwhile = tmp_path / "run", runs.prepare_output, []

    def prepare_output(*args, other=(), **kwargs):
        if not meanwhile:  # the other run, begun later, trains while this one loads
            meanwhile.append(True)
            with pytest.raises(SystemExit) as exit_:
                run_cli(train.main, ["--held-out", "0", "--out", str(out), *other])
            assert exit_.value.code == 0
        return real(*args, **kwargs)

    for mine, other, expected in [
            (["--steps", "2", "--lr", "5e-4"], ["--steps", "2"], "holds a different run (--lr was 0.002, now 0.0005)"),
            (["--steps", "8", "--resume"], ["--steps", "6", "--resume"],
             "another process trained in this folder while this one was loading (6 steps done now, 2 before)"),
            (["--steps", "6", "--lr", "1e-3", "--overwrite"], ["--steps", "6", "--lr", "5e-4", "--overwrite"],
             "another process trained in this folder while this one was loading (6 steps done now, 6 before)")]:
        before = {p.name: p.read_bytes() for p in out.glob("*") if p.is_file()}
        meanwhile.clear()
        monkeypatch.setattr(train, "prepare_output", partial(prepare_output, other=other))
        _, err = run_train(capsys, "--held-out", "0", "--out", out, *mine, code=1 if "another" in expected else 2)
        assert f"error: {out}: {expected}" in err, err
        after = {p.name: p.read_bytes() for p in out.glob("*") if p.is_file()}
        assert after != before and json.loads(after["run.json"])["options"]["lr"] == float(
            other[other.index("--lr") + 1] if "--lr" in other else 2e-3)  # the other's, whole
        assert json.loads(after["run.json"])["steps"] == int(other[1])
        assert [step for step, _ in losses(out)] == list(range(1, int(other[1]) + 1))


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


def test_the_memory_and_speed_switches_do_not_make_another_run():
    """A run may continue with any of the memory and speed switches added or dropped (they change how a step is
    computed, not what; --cudnn-attention another attention kernel, the same to rounding, as torch's own choice
    may differ between machines); --bf16-grads, which rounds the sum of several micro-batches, --optimizer and
    --eval-batches (the held-out loss another measure) do make another run."""
    from bailong.runs import options
    for name in ("offload_activations", "keep_dequantized", "cuda_graph", "keep_attention", "casts_by_layer",
                 "offload_embedding", "cudnn_attention"):
        assert options(TrainConfig(**{name: True})) == options(TrainConfig()), name
    for checkpointing in ("on", "off"):  # activation checkpointing recomputes the same (test below)
        assert options(TrainConfig(checkpointing=checkpointing)) == options(TrainConfig())
    assert options(TrainConfig(bf16_grads=True)) != options(TrainConfig())
    assert options(TrainConfig(optimizer="adamw8bit")) != options(TrainConfig())
    assert options(TrainConfig(eval_batches=2)) != options(TrainConfig())  # the best kept: of one measure
    sft = options(TrainConfig(stage="sft"))  # the vocabulary's options are pre-training's (an SFT run of before
    assert "new_pieces" not in sft and "init_method" not in sft  # recorded them, and may have any value there)


def test_a_run_goes_on_with_activation_checkpointing_switched(tmp_path, capsys):
    """--checkpointing is a memory switch (a run out of memory goes on with it on; one with memory to spare, off):
    the recomputation draws the same LoRA dropout masks, so the losses and the adapter are those of a run without
    it, bit for bit on the CPU."""
    args = ["--steps", "4", "--eval-every", "2", "--lora-dropout", "0.1"]
    run_train(capsys, *args, "--out", tmp_path / "straight")
    run_train(capsys, *args[2:], "--steps", "2", "--checkpointing", "on", "--out", tmp_path / "switched")
    stdout, _ = run_train(capsys, *args, "--checkpointing", "off", "--out", tmp_path / "switched", "--resume")
    assert "resumed from" in stdout
    assert losses(tmp_path / "switched") == losses(tmp_path / "straight")
    from safetensors.torch import load_file  # (tensors compared: the header's metadata comes in any order)
    switched, straight = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors")
                          for run in ("switched", "straight"))
    assert switched.keys() == straight.keys() and all(torch.equal(switched[k], straight[k]) for k in switched)


def test_older_runs_resume_and_a_fine_tuning_run_keeps_its_own_base(tmp_path, capsys, monkeypatch):
    import hashlib
    monkeypatch.chdir(tmp_path)
    args = ["--eval-every", "2", "--new-pieces", "0"]  # with new pieces, below: older runs learned other ones
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
    shutil.rmtree(tmp_path / "pre")  # and --init gone
    stdout, _ = run_train(capsys, *sft, "--steps", "4", "--resume")
    assert "resumed from" in stdout and [s for s, _ in losses(tmp_path / "sft")] == [1, 2, 3, 4]


def test_a_run_resumes_with_the_vocabulary_its_checkpoints_learned(tmp_path, capsys, monkeypatch):
    """The adapter's new embedding rows belong to the pieces its checkpoints were trained with: a resumed run goes
    on with those, whatever this version would learn from the same data (another set of CJK characters, another
    tokenizer library: the run was refused, a long pre-training lost to an upgrade), and learns none; the newest
    checkpoint's tokenizer gone, the one before's."""
    from bailong.run_folder import RunFolder
    from bailong.tokenizer import byte_tokenizer, open_tokenizer
    from bailong.vocab import extend_tokenizer
    monkeypatch.chdir(tmp_path)
    args = ["--eval-every", "2", "--new-pieces", "20", "--out", "run"]
    run_train(capsys, *args, "--steps", "2")
    checkpoint = RunFolder(RunFolder(tmp_path / "run").saved()[-1]).result
    learned = open_tokenizer(checkpoint)
    other = extend_tokenizer(byte_tokenizer(), ["此前的版本學到了別的字"] * 20, 20)[0]  # as another version might
    other.save(checkpoint)
    assert other.serialized() != learned.serialized() and other.vocab_size == learned.vocab_size
    stdout, _ = run_train(capsys, *args, "--steps", "3", "--resume")
    assert "vocabulary: learning" not in stdout and "vocabulary: +20 pieces (260 -> 280)" in stdout
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3]
    assert open_tokenizer(tmp_path / "run" / "adapter").serialized() == other.serialized()
    (RunFolder(RunFolder(tmp_path / "run").saved()[-1]).result / "tokenizer.model").unlink()  # the newest's gone:
    stdout, _ = run_train(capsys, *args, "--steps", "4", "--resume")  # the one before's (it was learned anew)
    assert "vocabulary: learning" not in stdout and "resumed from run/checkpoints/step-0000003" in stdout
    assert open_tokenizer(tmp_path / "run" / "adapter").serialized() == other.serialized()


def test_a_pretraining_run_resumes_only_with_its_documents_tokenized_as_it_began(tmp_path, capsys, monkeypatch):
    """Earlier versions began no document with bos (recorded nothing), or one with every tokenizer's (recorded
    "bos text eos"): such a run would go on with other examples and another held-out measure, so it is not
    continued, before anything loads; a run of this version is."""
    from bailong.runs import DOCUMENTS
    monkeypatch.chdir(tmp_path)
    args = ["--eval-every", "2", "--new-pieces", "0", "--out", "run"]
    run_train(capsys, *args, "--steps", "2")
    run_json = tmp_path / "run" / "run.json"
    now = json.loads(run_json.read_text())
    assert now["inputs"]["documents"] == DOCUMENTS
    for began, recorded in [("text, eos", {k: v for k, v in now["inputs"].items() if k != "documents"}),
                            ("bos text eos", {**now["inputs"], "documents": "bos text eos"})]:
        run_json.write_text(json.dumps({**now, "inputs": recorded}))
        _, err = run_train(capsys, *args, "--steps", "3", "--resume", code=2)
        assert f"error: run: the run was started by an earlier Bailong, which tokenized its documents otherwise " \
               f"({began}; now {DOCUMENTS}): it cannot go on with other examples; choose another --out" in err
    run_json.write_text(json.dumps(now))
    run_train(capsys, *args, "--steps", "3", "--resume")
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3]


def test_an_input_spelled_with_a_tilde_is_still_an_input(tmp_path, capsys, monkeypatch):
    """"~/zh" quoted on the command line, or in a config file, reaches train.py unexpanded: the run was written
    into the data folder (and the next run read its metrics.jsonl as a document), or into the model's."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "zh").mkdir()
    shutil.copy(SAMPLES / "zh_tw_sample.txt", tmp_path / "zh")
    for args, what in [(["--data", "~/zh", "--out", "~/zh/run"], "the data ~/zh"),
                       (["--model", "~/zh", "--out", "~/zh/run"], "the base model"),
                       (["--data", "~/zh/zh_tw_sample.txt", "--out", "~"], "the data ~/zh/zh_tw_sample.txt")]:
        _, err = run_train(capsys, "--steps", "2", *args, code=2)
        assert f"holds or lies inside {what}; choose an --out apart from the run's inputs" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zh"] and len(list((tmp_path / "zh").iterdir())) == 1


def test_a_folder_that_cannot_be_written_is_refused_before_anything_loads(tmp_path, capsys):
    """An --out on a read-only disk, new or a run to resume, was found only when the lock was taken: after the
    data were read, the vocabulary learned and the model loaded (minutes at 7B), and said "cannot create the
    folder" of a folder that was there."""
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        args = ["--eval-every", "2", "--new-pieces", "20"]
        run_train(capsys, *args, "--steps", "2", "--out", disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for out, more, where in [(disk / "run", ["--resume"], disk / "run"), (disk / "new", [], disk),
                                 (disk / "new" / "deeper", [], disk)]:
            said, err = run_train(capsys, *args, "--steps", "4", "--out", out, *more, code=1)
            assert err == f"error: {out}/run.json: could not write ({where} is not writable)\n" and not said
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_run_an_earlier_version_began_goes_on_as_it_began_or_not_at_all(tmp_path, capsys, monkeypatch):
    """This version reads data otherwise (lines end only at line feeds; some files, texts and conversations are
    left out): a run an earlier one began, which recorded no reading, is refused where its data now read
    otherwise, naming why; where they read the same, an SFT run goes on with the conversations it began with,
    those with nothing to learn within --seq-len too (leaving them out moved every example after them)."""
    monkeypatch.chdir(tmp_path)
    run_train(capsys, "--steps", "2", "--new-pieces", "0", "--eval-every", "2", "--out", "pre")
    args = ["--stage", "sft", "--init", "pre", "--seq-len", "48", "--eval-every", "2", "--out", "sft"]
    out, _ = run_train(capsys, *args, "--steps", "2")
    assert "whose answers all begin past them are left out" in out
    kept = int(out.split("data: ")[1].split()[0])
    run_json = tmp_path / "sft" / "run.json"
    began = json.loads(run_json.read_text())
    del began["inputs"]["reading"]
    run_json.write_text(json.dumps({**began, "inputs": {**began["inputs"], "data": "0" * 16}}))
    _, err = run_train(capsys, *args, "--steps", "3", "--resume", code=2)
    assert "error: sft: the data differ from those the run started with, or the earlier Bailong that started it " \
           "read them otherwise (now: lines end at line feeds;" in err
    run_json.write_text(json.dumps(began))
    out, _ = run_train(capsys, *args, "--steps", "3", "--resume")
    assert int(out.split("data: ")[1].split()[0]) > kept and "left out" not in out
    assert "reading" not in json.loads(run_json.read_text())["inputs"]  # and so on, each time it goes on
    assert [s for s, _ in losses(tmp_path / "sft")] == [1, 2, 3]


def test_a_run_begun_with_precision_auto_goes_on_with_the_precision_named(tmp_path, capsys):
    """--precision auto takes the device's (float32 here): naming it on resuming was refused as another run. The
    precision named is then the run's: two precisions named are still two runs, and a run begun with one named
    does not go on with auto (nor, through auto, with another)."""
    run_train(capsys, "--steps", "2", "--held-out", "0", "--out", tmp_path / "auto")
    stdout, _ = run_train(capsys, "--steps", "3", "--held-out", "0", "--precision", "fp32", "--resume", "--out",
                          tmp_path / "auto")
    assert "resumed from" in stdout
    _, stderr = run_train(capsys, "--steps", "4", "--held-out", "0", "--resume", "--out", tmp_path / "auto", code=2)
    assert "holds a different run (--precision was 'fp32', now 'auto')" in stderr
    run_train(capsys, "--steps", "2", "--held-out", "0", "--precision", "bf16", "--out", tmp_path / "bf16")
    _, stderr = run_train(capsys, "--steps", "3", "--held-out", "0", "--precision", "fp32", "--resume", "--out",
                          tmp_path / "bf16", code=2)
    assert "holds a different run (--precision was 'bf16', now 'fp32')" in stderr


def test_a_run_whose_data_an_earlier_reading_read_otherwise_is_refused_saying_so(tmp_path, capsys):
    """Since suffixes are read in any case and a byte-order mark at any line's start is dropped, a folder with a
    NOTES.TXT reads as other data: a run begun before says that an earlier reading may be why."""
    from bailong.runs import READING
    (corpus := tmp_path / "corpus").mkdir()
    (corpus / "a.txt").write_text((SAMPLES / "zh_tw_sample.txt").read_text())
    args = ["--data", corpus, "--new-pieces", "0", "--eval-every", "2", "--out", tmp_path / "run"]
    run_train(capsys, *args, "--steps", "2")
    run_json = tmp_path / "run" / "run.json"
    began = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**began, "inputs": {**began["inputs"], "reading": "as an earlier version read"}}))
    (corpus / "NOTES.TXT").write_text("read now, left out before\n")
    _, err = run_train(capsys, *args, "--steps", "3", "--resume", code=2)
    assert err == f"error: {tmp_path / 'run'}: the data differ from those the run started with, or the earlier " \
        f"Bailong that started it read them otherwise (then: as an earlier version read; now: {READING}); choose " \
        "another --out\n"


def test_a_run_without_new_pieces_goes_on_whatever_it_said_of_them(tmp_path, capsys):
    """--all-pieces and --init-method with --new-pieces 0 are refused now (they set nothing); a run begun with them
    before goes on without them, as the run it is."""
    run_train(capsys, "--steps", "2", "--held-out", "0", "--new-pieces", "0", "--out", tmp_path / "run")
    run_json = tmp_path / "run" / "run.json"
    began = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**began, "options": {**began["options"], "all_pieces": True,
                                                         "init_method": "random"}}))  # as an earlier version wrote
    stdout, _ = run_train(capsys, "--steps", "3", "--held-out", "0", "--new-pieces", "0", "--resume", "--out",
                          tmp_path / "run")
    assert "resumed from" in stdout
