"""A training run's folder (bailong/run_folder.py) as train.py uses it: the lock, and what --overwrite and
--resume may remove or put back: never a user's file, never an input."""
import json
import shutil
from functools import partial

import pytest

from bailong.training import SAMPLES, TrainConfig
from train_runs import run_train


def test_the_folder_is_locked_while_training_and_free_once_train_returns_or_fails(tmp_path, capsys, monkeypatch):
    """Another process may not train in a folder in use; once train.main returns (or fails), it may, and so may
    this process again (a notebook)."""
    from bailong import checkpoints, run_folder
    out, real_save, seen = tmp_path / "run", checkpoints.save_checkpoint, []

    def save_checkpoint(*args, fail=False, **kwargs):  # mid-run: is the folder free to others?
        seen.append(run_folder.lock_free(out))
        if fail:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_checkpoint)
    run_train(capsys, "--steps", "2", "--held-out", "0", "--out", out)
    assert seen == [False] and run_folder.lock_free(out) and run_folder._HELD == {}
    import fcntl
    with open(out / ".lock") as probe:  # another process's probe at the same moment (torchrun's) is no run
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert run_folder.lock_free(out)
    monkeypatch.setattr(checkpoints, "save_checkpoint", partial(save_checkpoint, fail=True))
    _, err = run_train(capsys, "--steps", "4", "--held-out", "0", "--out", out, "--resume", code=1)
    assert "No space left on device" in err and seen == [False, False]
    assert run_folder.lock_free(out) and run_folder._HELD == {}


def test_a_fine_tuning_run_copies_no_file_linked_from_elsewhere(tmp_path, capsys):
    """--init's chat template linked to the user's Hub token: refused before the work (it would be copied into the
    run's base, and shared with it)."""
    import os

    import train
    from bailong.generation import GENERATION_CONFIG
    from bailong.tokenizer import CHAT_TEMPLATE_FILE
    assert {GENERATION_CONFIG, CHAT_TEMPLATE_FILE} <= set(train.SFT_KEPT)
    run_train(capsys, "--steps", "1", "--held-out", "0", "--out", tmp_path / "pre")
    (tmp_path / "token").write_text("hf_secret")
    os.symlink(tmp_path / "token", tmp_path / "pre" / "base" / CHAT_TEMPLATE_FILE)
    _, err = run_train(capsys, "--stage", "sft", "--init", tmp_path / "pre", "--out", tmp_path / "sft", code=1)
    assert f"{CHAT_TEMPLATE_FILE}: is a link to {tmp_path / 'token'}, outside its folder" in err
    assert not (tmp_path / "sft").exists()


def test_a_replacement_stopped_between_its_two_renames_is_finished_on_resuming(tmp_path, capsys):
    """A process stopped after the adapter was renamed away and before its new version took its place left no
    adapter/ (chat.py found no model), and resuming removed both copies as unfinished writes."""
    out = tmp_path / "run"
    args = ["--eval-every", "2", "--new-pieces", "20", "--out", out]
    run_train(capsys, *args, "--steps", "2")
    shutil.copytree(out / "adapter", out / ".adapter.4242.tmp")  # the new version, complete
    (out / "adapter").rename(out / ".adapter.4242.old")
    said, _ = run_train(capsys, *args, "--steps", "3", "--resume")
    assert f"{out}/adapter: put in place (a stopped process had left it under a temporary name)" in said
    assert f"removing what a stopped process left unfinished in {out}: .adapter.4242.old/" in said
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not list(out.glob(".adapter*"))


def test_a_replacement_stopped_between_its_renames_is_finished_where_the_run_writes(tmp_path):
    """atomic_folder renames its target away, then the new version into place: stopped between the two, the new
    version (whole by then) is put in place, or the old one back where there is no new one; in checkpoints/ too
    (a step saved again after resuming past a damaged one), and never a folder of the user's."""
    from bailong.run_folder import _finish_replacing
    step = tmp_path / "checkpoints" / "step-0000002"
    for pid, versions, kept in [(12, ("old", "tmp"), "tmp"), (34, ("old",), "old")]:
        for folder in (tmp_path, step.parent):
            name = "adapter" if folder == tmp_path else step.name
            for version in versions:
                (folder / f".{name}.{pid}.{version}").mkdir(parents=True)
                (folder / f".{name}.{pid}.{version}" / "w").write_text(version)
        assert _finish_replacing(tmp_path) == [tmp_path / "adapter", step]
        assert (tmp_path / "adapter" / "w").read_text() == kept == (step / "w").read_text()
        assert _finish_replacing(tmp_path) == []  # the targets are there: nothing is touched
        for p in tmp_path.iterdir():
            shutil.rmtree(p)
    (tmp_path / ".notes.5.old").mkdir()  # a user's folder: not a name the run writes
    (tmp_path / ".notes.txt.5.old").write_text("a user's file")
    assert _finish_replacing(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == [".notes.5.old",
                                                                                             ".notes.txt.5.old"]


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
    from bailong.run_folder import RunFolder, not_a_runs
    monkeypatch.chdir(tmp_path)
    args = ["--steps", "4", "--save-every", "2", "--held-out", "0", "--new-pieces", "20"]
    run_train(capsys, *args, "--out", "run")
    assert not_a_runs(tmp_path / "run") == []  # everything a run writes is in the layout
    for mine in ("adapter/README.md", "checkpoints/step-0000004-good/notes.txt", "base/README.md"):
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


def test_what_a_killed_save_left_goes_on_resume_and_hidden_files_of_the_user_s_stay(tmp_path, capsys):
    """A save killed half way left its temporary folder (a checkpoint: gigabytes at 7B) for good, as each later
    kill left its own; --overwrite took any hidden name ending in .tmp or .old for one and removed it."""
    out = tmp_path / "run"
    args = ["--held-out", "0", "--save-every", "1", "--out", out]
    run_train(capsys, "--steps", "2", *args)
    shutil.copytree(out / "checkpoints" / "step-0000002", out / "checkpoints" / ".step-0000003.4242.tmp")
    shutil.copytree(out / "adapter", out / ".adapter.4242.old")  # killed in the adapter's swap
    (out / ".metrics.jsonl.77.tmp").write_text('{"step"')
    said, _ = run_train(capsys, "--steps", "3", "--resume", *args)
    assert f"removing what a stopped process left unfinished in {out}: .adapter.4242.old/, .metrics.jsonl.77.tmp, " \
           "checkpoints/.step-0000003.4242.tmp/\n" in said
    assert not list(out.glob(".*.*")) and sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "LATEST", "step-0000002", "step-0000003"]
    stopped = tmp_path / "stopped"  # killed as it wrote its run.json: a run's folder, not the user's
    stopped.mkdir()
    (stopped / ".lock").write_text("")
    (stopped / ".run.json.4242.tmp").write_text('{"opt')
    said, _ = run_train(capsys, "--steps", "1", "--held-out", "0", "--out", stopped)
    assert f"removing what a stopped process left unfinished in {stopped}: .run.json.4242.tmp\n" in said
    for mine in (".adapter.old", "checkpoints/.notes.2024.old", ".adapter.4242.bak.tmp"):  # the user's
        (out / mine).write_text("the user's")
        _, err = run_train(capsys, "--steps", "3", "--overwrite", *args, code=2)
        assert f"{out}: holds {mine}, which is not part of a run; nothing was removed" in err, err
        (out / mine).unlink()


def test_a_model_s_files_are_found_under_a_home_folder_too(tmp_path, monkeypatch):
    """A --config file's "init": "~/run" loads (paths are expanded there); the files SFT copies from it were
    looked for in a folder named "~"."""
    from bailong.outputs import model_file
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "generation_config.json").write_text("{}")
    assert model_file("~/model", "generation_config.json") == tmp_path / "model" / "generation_config.json"
    assert model_file("~/model", "tokenizer_config.json") is None


def test_a_training_output_whose_base_is_gone_is_still_told_apart_from_a_model(tmp_path):
    """Where a training output is given as a model, the refusal says so; that its base has moved since is for
    when it is loaded."""
    from bailong.errors import BailongError, UsageError
    from bailong.outputs import check_model, check_not_a_run
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(UsageError, match="run: is a training output; fine-tune it with --stage sft"):
        check_model(TrainConfig(model=str(tmp_path / "run"), new_pieces=0))
    with pytest.raises(BailongError, match=r"adapter: an adapter, not a model folder: give the training output it"):
        check_not_a_run(tmp_path / "run" / "adapter")


def test_an_overwrite_that_cannot_remove_all_of_the_old_run_says_where_and_keeps_run_json(tmp_path, capsys,
                                                                                           monkeypatch):
    """A part that could not be removed (a read-only checkpoint) stopped --overwrite with "error: adapter:
    Permission denied", run.json already gone: the folder then read as not a run to --overwrite and --resume alike,
    to be cleaned by hand."""
    args = ["--steps", "2", "--eval-every", "2", "--new-pieces", "0", "--out", tmp_path / "run"]
    run_train(capsys, *args)
    rmtree = shutil.rmtree

    def refused(path, *a, **k):
        if path.name == "checkpoints":
            raise PermissionError(13, "Permission denied", "step-0000002")
        rmtree(path, *a, **k)
    monkeypatch.setattr(shutil, "rmtree", refused)
    _, err = run_train(capsys, *args, "--overwrite", code=1)
    assert err.splitlines()[-1] == f"error: {tmp_path / 'run' / 'checkpoints'}: could not be removed (Permission " \
        f"denied); the run in {tmp_path / 'run'} is removed in part (run.json kept): mend that and run again"
    assert (tmp_path / "run" / "run.json").exists()
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    stdout, _ = run_train(capsys, *args, "--overwrite")
    assert "--overwrite: removing the run in" in stdout


def test_fine_tuning_a_run_another_process_still_trains_is_refused(tmp_path, capsys):
    """SFT merged the adapter a run held midway and went on from it, without a word; the run then ended with
    another."""
    import fcntl
    run_train(capsys, "--steps", "2", "--held-out", "0", "--out", tmp_path / "pt")
    with open(tmp_path / "pt" / ".lock") as training:  # as the process training it holds it
        fcntl.flock(training, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _, err = run_train(capsys, "--stage", "sft", "--init", tmp_path / "pt", "--steps", "1", "--out",
                           tmp_path / "sft", code=1)
    assert err == f"error: {tmp_path / 'pt'}: another process is still training it, and the adapter it holds is " \
        "not yet its last; wait for it to end, or export this one (python -m bailong.export) and --init that\n"
    run_train(capsys, "--stage", "sft", "--init", tmp_path / "pt", "--steps", "1", "--out", tmp_path / "sft")
