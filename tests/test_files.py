"""bailong/files.py: outputs checked against inputs, and written whole or not at all (a real full disk too)."""
import contextlib
import os
import resource
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from bailong.errors import BailongError, UsageError
from bailong.files import atomic_folder, atomic_write, check_output_file, overlaps, own_file


def test_overlaps_resolves_spellings_and_links(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "link")
    assert overlaps(tmp_path / "data/../data/", tmp_path / "link")
    assert overlaps(tmp_path, tmp_path / "link" / "x.txt") and overlaps(tmp_path / "link" / "x", tmp_path / "data")
    assert not overlaps(tmp_path / "data2", tmp_path / "data")


def test_a_folder_spelt_two_ways_is_one(tmp_path):
    """On a file system that ignores case (macOS's, Windows'), corpus/ and Corpus/ are one folder; a bind mount stands
    in for it here. Known only by name, an output went into an input folder so spelt (a tokenizer or answers into
    the corpus, read with it next time), and an SFT run's --out that was its --init met its own lock, said as
    "another process is still training it"."""
    corpus, other = tmp_path / "corpus", tmp_path / "Corpus"
    corpus.mkdir(), other.mkdir()
    (corpus / "a.txt").write_text("text")
    if subprocess.run(["mount", "--bind", str(corpus), str(other)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root on Linux)")
    try:
        assert overlaps(other, corpus) and overlaps(corpus / "new", other) and overlaps(other / "x" / "y", corpus)
        assert not overlaps(tmp_path / "other", corpus)
        with pytest.raises(UsageError, match="Corpus/tok.model: lies inside the corpus; --out must name a file apart"):
            check_output_file(other / "tok.model", {"the corpus": corpus})
        with pytest.raises(UsageError, match="Corpus/a.txt: is the corpus"):
            check_output_file(other / "a.txt", {"the corpus": corpus / "a.txt"})
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_an_output_file_is_never_an_input_a_folder_or_a_file_of_another_kind(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    ours = tmp_path / "old.model"
    ours.write_text("a tokenizer")
    base = tmp_path / "base.model"
    base.write_text("the base tokenizer")
    is_ours = lambda p: p.name.endswith(".model")  # noqa: E731
    inputs = {"the corpus": corpus, "the base tokenizer": base}
    cases = [(base, "is the base tokenizer"), (corpus / "new.model", "lies inside the corpus"),
             (tmp_path, "is a folder"), (notes, "already exists and is not a tokenizer"),
             (ours, "already exists; choose another --out, or pass --overwrite")]
    for path, message in cases:
        with pytest.raises(UsageError, match=message):
            check_output_file(path, inputs, overwrite=path == base, ours=is_ours, kind="tokenizer")
    with pytest.raises(UsageError, match="not a tokenizer"):
        check_output_file(notes, {}, overwrite=True, ours=is_ours, kind="tokenizer")
    pipe = tmp_path / "pipe"  # as /dev/null would be, as root: a rename would put a file in its place
    os.mkfifo(pipe)
    with pytest.raises(UsageError, match="pipe: is not a regular file"):  # refused before reading it (a wait)
        check_output_file(pipe, {}, overwrite=True, ours=lambda p: pytest.fail("read the pipe"))
    with pytest.raises(BailongError, match="pipe: is not a regular file"):
        atomic_write(pipe, "x")
    assert pipe.is_fifo()
    check_output_file(ours, inputs, overwrite=True, ours=is_ours)(ours)  # allowed, and allowed again at the end
    check_output_file(tmp_path / "new.model", inputs)(tmp_path / "new.model")


def test_what_was_made_at_an_output_while_the_command_worked_is_kept(tmp_path):
    """The output was checked only before the work (minutes of an export, of learning pieces, of answers), then
    written blindly: a folder a user made there meanwhile was removed, a file replaced, two exports to one folder
    both said "wrote", one lost. Checked again just before the rename: left as it is, nothing written there."""
    from bailong.conversation import save_answers
    out, folder, answers = tmp_path / "new.model", tmp_path / "export", tmp_path / "a.jsonl"
    check = check_output_file(out, {})
    out.write_text("notes")
    with pytest.raises(BailongError, match="new.model: was made while this command worked, and is left as it is"):
        atomic_write(out, "a tokenizer", check)
    folder_check = check_output_file(folder, {})
    with pytest.raises(BailongError, match="export: was made while this command worked"):
        with atomic_folder(folder, folder_check) as tmp:
            (tmp / "model.safetensors").write_text("weights")
            folder.mkdir()
            (folder / "notes.txt").write_text("mine")
    assert out.read_text() == "notes" and os.listdir(folder) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == [
        "export", "new.model"]
    answers.write_text('{"messages": [], "answered_by": "m"}\n')  # an earlier answers file, --overwrite given
    answers_check = check_output_file(answers, {}, overwrite=True, ours=lambda p: "answered_by" in p.read_text())
    answers.write_text("my notes\n")  # replaced meanwhile by what is not answers: the new answers go beside it
    assert save_answers(answers, [{"messages": []}], check=answers_check) == f"{tmp_path / 'a.partial.jsonl'} " \
        f"({answers} is as it was)" and answers.read_text() == "my notes\n"
    answers.write_text('{"messages": [], "answered_by": "m"}\n')
    assert save_answers(answers, [{"messages": [1]}], check=answers_check) == str(answers)  # answers: replaced
    assert answers.read_text() == '{"messages": [1]}\n'
    os.symlink(tmp_path / "elsewhere.jsonl", tmp_path / "link.jsonl")  # a link to a file not yet there
    link_check = check_output_file(tmp_path / "link.jsonl", {})
    assert save_answers(tmp_path / "link.jsonl", [{"messages": []}], check=link_check) == str(tmp_path / "link.jsonl")
    assert (tmp_path / "elsewhere.jsonl").read_text() == '{"messages": []}\n'


def test_an_output_among_a_training_runs_own_files_is_refused(tmp_path):
    """Training replaces a run's adapter/, checkpoints/... whole: a file saved there (chat.py's /save or --output,
    an export's GGUF) was lost at its next save."""
    from bailong.conversation import Chat
    (run := tmp_path / "run").mkdir()
    (run / "run.json").write_text('{"experiment": "x"}')
    check_output_file(run / "adapter" / "talk.jsonl", {})  # another tool's run.json: no run of ours
    (run / "run.json").write_text('{"options": {}, "steps": 2}')  # (a copy of a run may lack its lock file)
    os.symlink(run / "adapter" / "linked.jsonl", tmp_path / "link.jsonl")  # a link given is written through
    check_output_file(run / "Adapter" / "talk.jsonl", {})  # another folder, on a disk that tells case apart
    os.link(run / "run.json", run / "RUN.JSON")  # a disk that does not (macOS's): Adapter/ is then adapter/
    for path in (run / "adapter" / "talk.jsonl", run / "checkpoints" / "a.gguf", run / "metrics.jsonl",
                 tmp_path / "link.jsonl", run / "Adapter" / "talk.jsonl"):
        with pytest.raises(UsageError, match="lies among the training run .*run's own files, which training "
                                             "replaces; --out must name a file elsewhere"):
            check_output_file(path, {})
    with pytest.raises(UsageError, match="/save must name a file elsewhere"):
        Chat.command(Chat.__new__(Chat), f"/save {run / 'adapter' / 'talk.jsonl'}")
    check_output_file(run / "talk.jsonl", {})  # beside the run's own files: kept by training


def test_writes_are_whole_or_absent_with_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, "first")
    atomic_write(target, b"second")
    assert target.read_text() == "second" and os.stat(target).st_mode & 0o777 == 0o666 & ~current_umask()
    weights = tmp_path / "sub" / "model.safetensors"  # safetensors' own writer makes a private file (0600)
    atomic_write(weights, lambda tmp: save_file({"w": torch.ones(2)}, tmp))
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~current_umask()
    for replaced in (target, weights):  # a file made private stays private when replaced
        os.chmod(replaced, 0o600)
        atomic_write(replaced, lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
        assert os.stat(replaced).st_mode & 0o777 == 0o600
    atomic_write(target, b"second")

    def fails(tmp):
        open(tmp, "w").write("half")
        raise ValueError("a bug, not the machine")

    with pytest.raises(ValueError):
        atomic_write(target, fails)
    assert target.read_text() == "second" and sorted(os.listdir(target.parent)) == ["file.txt", "model.safetensors"]
    folder = tmp_path / "folder"
    with atomic_folder(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_folder(folder) as tmp:
        (tmp / "b").write_text("2")
        raise KeyboardInterrupt
    assert os.listdir(folder) == ["a"] and sorted(os.listdir(tmp_path)) == ["folder", "sub"]
    with atomic_folder(folder) as tmp:
        (tmp / "c").write_text("3")
    assert os.listdir(folder) == ["c"] and os.stat(folder).st_mode & 0o777 == 0o777 & ~current_umask()
    with pytest.raises(BailongError, match="could not write"):
        atomic_write(target / "under-a-file", "x")


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_output_file_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    """chat.py --output, vocab extend --out, export --out: a read-only folder is found before minutes of work, not
    after them."""
    disk = tmp_path / "read-only"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root on Linux)")
    try:
        for target in (disk / "answers.jsonl", disk / "new" / "folder" / "answers.jsonl"):
            with pytest.raises(BailongError, match=f"{target}: could not write .{disk} is not writable"):
                check_output_file(target, {})
        check_output_file(tmp_path / "new" / "answers.jsonl", {})(tmp_path / "new" / "answers.jsonl")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_model_folders_file_linked_from_elsewhere_is_not_copied_out(tmp_path):
    """A cloned model folder's link to the user's Hub token went into an export; links within the folder, and a Hub
    snapshot's into its repo's blobs, are the folder's own."""
    (tmp_path / "token").write_text("hf_secret")
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text("{}")
    os.symlink("generation_config.json", model / "inner.json")
    os.symlink(tmp_path / "token", model / "special_tokens_map.json")
    assert own_file(model / "generation_config.json") and own_file(model / "inner.json")
    with pytest.raises(BailongError, match=f"special_tokens_map.json: is a link to {tmp_path / 'token'}, outside its "
                                           "folder, and is not copied from it"):
        own_file(model / "special_tokens_map.json")
    snapshot = tmp_path / "models--a--b" / "snapshots" / ("0" * 40)
    (tmp_path / "models--a--b" / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--a--b" / "blobs" / "1234").write_text("{}")
    os.symlink("../../blobs/1234", snapshot / "config.json")
    assert own_file(snapshot / "config.json")
    os.symlink("../../../token", snapshot / "tokenizer_config.json")  # elsewhere from a snapshot, or from a folder
    (tmp_path / "own" / "snapshots" / "m").mkdir(parents=True)  # that only looks like one
    (tmp_path / "own" / "secret").mkdir()
    (tmp_path / "own" / "secret" / "token").write_text("hf_secret")
    os.symlink(tmp_path / "own" / "secret" / "token", tmp_path / "own" / "snapshots" / "m" / "config.json")
    for outside in (snapshot / "tokenizer_config.json", tmp_path / "own" / "snapshots" / "m" / "config.json"):
        with pytest.raises(BailongError, match="outside its folder"):
            own_file(outside)


def test_a_write_to_a_link_goes_where_it_points_and_the_link_stays(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "old.txt").write_text("old")
    os.symlink(tmp_path / "disk", tmp_path / "out")  # an output folder kept on another disk
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "model.txt").write_text("new")
    os.symlink(tmp_path / "disk" / "model.txt", tmp_path / "model-link.txt")
    atomic_write(tmp_path / "model-link.txt", "newer")
    assert os.readlink(tmp_path / "out") == str(tmp_path / "disk") and os.path.islink(tmp_path / "model-link.txt")
    assert os.listdir(tmp_path / "disk") == ["model.txt"] and (tmp_path / "disk" / "model.txt").read_text() == "newer"
    assert sorted(os.listdir(tmp_path)) == ["disk", "model-link.txt", "out"]  # nothing left beside them


def test_sigterm_mid_write_leaves_the_old_version_and_no_temporary_copy(tmp_path):
    """``kill`` (SIGTERM) during a file's or a folder's write: the exit is clean (status 143), the old version
    whole, nothing left beside it; and a chat's Ctrl-C handling (which only ends a reply) does not stop it."""
    import signal

    from bailong.errors import run_cli
    (tmp_path / "model.txt").write_text("old")
    (tmp_path / "model").mkdir()

    def killed_midway(tmp):
        open(tmp, "w").write("half")
        os.kill(os.getpid(), signal.SIGTERM)

    def export(argv):
        try:
            if argv == ["file"]:
                atomic_write(tmp_path / "model.txt", killed_midway)
            with atomic_folder(tmp_path / "model") as tmp:
                killed_midway(tmp / "weights")
        except KeyboardInterrupt:  # as chat.py's reply does
            pass
        return 0

    before = signal.getsignal(signal.SIGTERM)
    for argv in (["file"], ["folder"]):
        with pytest.raises(SystemExit) as exit_:
            run_cli(export, argv)
        assert exit_.value.code == 143
    assert sorted(os.listdir(tmp_path)) == ["model", "model.txt"] and os.listdir(tmp_path / "model") == []
    assert (tmp_path / "model.txt").read_text() == "old" and signal.getsignal(signal.SIGTERM) == before


def test_a_file_size_limit_or_a_quota_is_one_line_too(tmp_path):
    """A quota or a file-size limit refuses a write with space left on the disk: safetensors names the error
    in its message, torch.save into a Python file chains it (as a checkpoint is saved); both read as the
    machine's refusal and leave nothing behind. (Python ignores SIGXFSZ, so the write fails with EFBIG.)"""
    big = {"a": torch.zeros(100_000)}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(BailongError, match=r"w.safetensors: could not write \(File too large\)$"):
            atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file(big, tmp))
        with pytest.raises(BailongError, match=r"step-0000002: could not write \(File too large\)$"):
            with atomic_folder(tmp_path / "step-0000002") as tmp, open(tmp / "state.pt", "wb") as f:
                torch.save(big, f)
        # a file written inside a folder's write is named in its place (it was named in the temporary folder)
        with pytest.raises(BailongError, match=f"^{tmp_path}/adapter/w.safetensors: could not write \\(File too"):
            with atomic_folder(tmp_path / "adapter") as tmp:
                atomic_write(tmp / "w.safetensors", lambda tmp: save_file(big, tmp))
        with pytest.raises(BailongError, match=r"m.gguf: could not write \(only part written: a full disk, or a "
                                               r"limit on a file's size\)$"):  # numpy's, without errno
            atomic_write(tmp_path / "m.gguf", lambda tmp: big["a"].numpy().tofile(tmp))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert os.listdir(tmp_path) == []


def test_a_real_full_disk_is_one_line_and_leaves_the_old_version(small_disk):
    """torch.save reports a full disk as a RuntimeError and safetensors as its own error; both must read as
    the machine's refusal, name the target, and leave what was there."""
    atomic_write(small_disk / "LATEST", "step-0000001")
    big = {"a": torch.zeros(100_000)}
    writes = [lambda: atomic_write(small_disk / "LATEST", "x" * 200_000),
              lambda: atomic_write(small_disk / "w.safetensors", lambda tmp: save_file(big, tmp))]

    def checkpoint():
        with atomic_folder(small_disk / "step-0000002") as tmp:
            torch.save(big, tmp / "state.pt")

    for write in writes + [checkpoint]:
        with pytest.raises(BailongError, match=r": could not write \(No space left on device\)$"):
            write()
    assert os.listdir(small_disk) == ["LATEST"] and (small_disk / "LATEST").read_text() == "step-0000001"
    held = []  # no file on the disk left open (torch.save's writer, kept by the error's frames, held its space)
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [f for f in held if f.startswith(str(small_disk))], held


def test_ctrl_c_in_a_writer_stays_ctrl_c_and_an_unknown_home_stays_as_written(tmp_path):
    """Ctrl-C met while a writer handles an OSError is Ctrl-C (exit 130), not the machine refusing the write; and
    "~nobody-here/run" names a folder of that name, as the shell and train.py's own options leave it."""
    def writer(tmp):
        try:
            open(tmp_path / "missing" / "x")
        except OSError:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "out.txt", writer)
    assert not overlaps("~nobody-here/run", tmp_path) and overlaps("~nobody-here/run", "~nobody-here")


def test_temporary_files_left_by_a_killed_writer_are_removed_and_a_running_ones_kept(tmp_path):
    import sys

    from bailong.files import remove_left_behind
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = [f".tokens-a.ids.npy.{gone.stdout.strip()}.tmp", f".tokens-a.ids.npy.{os.getpid()}.tmp",
             f".other.npy.{gone.stdout.strip()}.tmp", "tokens-a.ids.npy", ".tokens-a.ids.npy.x.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    remove_left_behind(tmp_path, "tokens-")
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(names[1:])


def test_a_mistake_met_while_writing_to_a_nearly_full_disk_is_said_as_it_is(small_disk):
    """A write that fails where less than a megabyte is free is taken for a full disk (torch.save says no more);
    a mistake of the user's met while writing (a chat template that fails, while the token cache is written) was
    said as "No space left on device"."""
    def fails(tmp):
        raise BailongError("the model's chat_template fails on the conversation whose first question begins 'q'")
    with pytest.raises(BailongError, match="chat_template fails"):
        atomic_write(small_disk / "tokens.ids.npy", fails)
    assert list(small_disk.iterdir()) == []
