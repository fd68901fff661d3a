"""Writing without losing anything: outputs checked against inputs, and written whole or not at all.

Two rules hold for every file a command writes:

1. Nothing the user had is overwritten unless it is what the command itself
   writes (a tokenizer for ``vocab extend``, conversations for ``chat.py
   --output``, a training run for ``train.py --out``) and the user asked for it
   with ``--overwrite``; an output that is one of the command's inputs, or lies
   inside an input folder, is refused outright.
2. A file or folder is written under a temporary name beside its target and
   renamed into place when complete, so Ctrl-C or a full disk mid-write leaves
   the previous version whole, and the error names the target, not the
   temporary file.
"""
import contextlib
import glob
import json
import os
import re
import shutil
import traceback
from contextlib import contextmanager
from pathlib import Path

from bailong.errors import BailongError, UsageError
from bailong.run_folder import runs_own


def overlaps(a, b) -> bool:
    """``a`` and ``b`` are the same path, or one lies inside the other (``~``, symlinks and ``..`` resolved)."""
    a, b = Path(os.path.expanduser(a)).resolve(), Path(os.path.expanduser(b)).resolve()
    return within(a, b) or within(b, a)


def within(a: Path, b: Path) -> bool:
    """Resolved path ``a`` is ``b`` or lies inside it: by their names, or where ``b`` exists by its identity, so
    that a folder spelt two ways is one (a file system that ignores case, macOS's and Windows', or a bind mount)."""
    if a == b or b in a.parents:
        return True
    try:
        folder = b.stat()
        return any(os.path.samestat(p.stat(), folder) for p in (a, *a.parents) if p.exists())
    except OSError:
        return False


# the key of each conversation chat.py --output, /save and eval bench write that names the model that answered: only
# such files (or empty ones) are replaced; a user's fine-tuning set or questions, of the same layout, never
ANSWERED_BY = "answered_by"
ANSWERS = (f"file of answers (each line's \"{ANSWERED_BY}\" names the model that wrote it; one written without it, "
           "by an earlier version, is replaced only by hand)")


def is_answers(path) -> bool:
    """Whether ``path`` is a jsonl of {"messages": [...], "answered_by": ...} objects, what chat.py --output,
    /save and eval bench write, or empty."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]  # as written
        return all(isinstance((row := json.loads(line)).get("messages"), list) and ANSWERED_BY in row
                   for line in lines)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_output_file(path, inputs: dict, overwrite=False, ours=lambda path: False, kind="file", flag="--out"):
    """Refuse ``path`` as an output file before anything is read or written (also where it cannot be written).

    ``inputs`` maps a description to a path ("the corpus": "zh/"): an output that
    is an input, or inside an input folder, is refused. An existing file is
    replaced only with ``overwrite`` and when ``ours(path)`` says it is a ``kind``
    this command writes. Returns the check (``as_checked``) for the write that ends the command's work.
    """
    if str(path).endswith(("/", os.sep)):
        raise UsageError(f"{path}: names a folder; {flag} names the file to write")
    path = Path(path)
    for what, source in inputs.items():
        source = Path(source) if source else None
        if source and source.exists() and within(path.resolve(), source.resolve()):
            where = "is" if path.exists() and path.samefile(source) else "lies inside"
            raise UsageError(f"{path}: {where} {what}; {flag} must name a file apart from the inputs")
    check_not_in_a_run(path, flag)
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; {flag} names the file to write")
    if path.exists():
        if not path.is_file():  # (before ``ours`` reads it: a pipe would wait for a writer)
            raise UsageError(not_a_file(path))
        if not ours(path):
            raise UsageError(f"{path}: already exists and is not a {kind}; nothing was written "
                             f"(choose another {flag})")
        if not overwrite:
            raise UsageError(f"{path}: already exists; choose another {flag}, or pass --overwrite to replace it")
    check_writable(path)
    return as_checked(path, ours, flag)


def check_not_in_a_run(path, flag="--out"):
    """Refuse an output among a training run's own files and folders, which training replaces whole."""
    if run := runs_own(path):
        raise UsageError(f"{path}: lies among the training run {run}'s own files, which training replaces; "
                         f"{flag} must name a file elsewhere")


def as_checked(path, ours=lambda path: False, flag="--out"):
    """For ``atomic_write`` and ``atomic_folder``'s ``check``, made as ``check_output_file`` allows ``path``: just
    before the rename, refuse what was made at ``path`` while the command worked (a user's file or folder,
    another command's output), or what is there now that ``ours`` does not take."""
    there = Path(path).is_file()

    def check(target):
        target = _through_link(target)  # (a link given as the output is written through)
        if os.path.lexists(target) and not (there and Path(target).is_file() and ours(target)):
            raise BailongError(f"{path}: was made while this command worked, and is left as it is; nothing was "
                               f"written (choose another {flag})")
    return check


def not_a_file(path) -> str:
    """The error for writing over what is not a file: /dev/null, a pipe, a socket. A rename would put a file in
    its place (as root, in place of the system's /dev/null)."""
    return f"{path}: is not a regular file (a device, a pipe or a socket); nothing was written"


def own_file(path) -> Path:
    """``path``, a model folder's file that a command copies into its output; refused where it is a link out of
    the folder (a link to ~/.cache/huggingface/token would go into an export, and be uploaded with it). A Hub
    snapshot's links, into its repo's blobs, are its own."""
    path = Path(path)
    folder = path.parent.resolve()
    hub = folder.parent.name == "snapshots" and folder.parents[1].name.startswith("models--")
    if not any(p in path.resolve().parents for p in [folder] + ([folder.parents[1] / "blobs"] if hub else [])):
        raise BailongError(f"{path}: is a link to {path.resolve()}, outside its folder, and is not copied from it (put "
                           "the file itself in the folder)")
    return path


def check_writable(path: Path):
    """Refuse now, not after the work, a new file or folder ``path`` whose nearest existing folder (where it,
    or the folders above it, will be made) cannot be written."""
    folder = next(p for p in path.absolute().parents if p.exists())
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise BailongError(f"{path}: could not write ({folder} is not writable)")


def write_failed(target, error) -> BailongError:
    """The one-line error for a write to ``target`` that the machine refused (full disk, permissions)."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    blocking = next((p for p in Path(target).parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # the system says "File exists" or "Not a directory"
        reason = f"{blocking} is a file, not a folder"
    return BailongError(f"{target}: could not write ({reason})")


def _refusal(target, error) -> OSError | None:
    """The machine's refusal behind a failed write to ``target`` (a full disk, a quota, a file-size limit), or
    None for a bug: an OSError, raised or chained (torch.save into a file object), or named in a writer's message
    (safetensors: "I/O error: File too large (os error 27)"); where none says, a full disk is what tells
    (torch.save into a path reports one as a RuntimeError, "unexpected pos")."""
    if not isinstance(error, Exception) or isinstance(error, BailongError):  # (Ctrl-C, SIGTERM, a mistake met
        return None  # while writing, as a chat template that fails: what they are)
    chained = error
    while chained is not None:
        if isinstance(chained, OSError):
            if re.fullmatch(r"\d+ requested and \d+ written", str(chained)):  # numpy's, without errno
                return OSError("only part written: a full disk, or a limit on a file's size")
            return chained
        if found := re.search(r"\(os error (\d+)\)", str(chained)):
            return OSError(int(found[1]), os.strerror(int(found[1])))
        chained = chained.__cause__ or chained.__context__
    with contextlib.suppress(OSError):
        if shutil.disk_usage(Path(target).parent).free < 1 << 20:
            return OSError(28, "No space left on device")
    return None


def _failed(target, error, clean_up):
    """After a failed write to ``target``: remove the temporary copy, then raise the machine's refusal as
    one line, or the error as it was (a bug)."""
    refused = _refusal(target, error)
    with contextlib.suppress(OSError):
        clean_up()
    if refused:
        chained = error  # the writer's frames (torch.save's) hold the deleted file open, its disk space taken,
        while chained is not None:  # until a garbage collection
            traceback.clear_frames(chained.__traceback__)
            chained = chained.__context__
        raise write_failed(target, refused) from None
    raise error


def _beside(path: Path, suffix) -> Path:
    """A hidden name beside ``path`` for this process (files made under it get the usual permissions,
    which tempfile's private 0600 files and 0700 folders would not), within the 255-byte name limit."""
    name = path.name.encode()[:200].decode(errors="ignore")
    return path.with_name(f".{name}.{os.getpid()}{suffix}")


def remove_left_behind(folder, prefix: str):
    """The temporary files ``atomic_write`` made in ``folder`` for names beginning ``prefix`` that a process
    killed mid-write left behind (the process no longer running), removed."""
    for tmp in Path(folder).glob(f".{glob.escape(prefix)}*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdecimal() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def _usual_mode(path):
    """The permissions ``open()`` gives a new file (0644 under the usual umask), where a library's writer made its
    file private (safetensors' ``save_file``: 0600, unreadable to the other users of a shared model folder)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _through_link(path) -> Path:
    """Where a write to ``path`` goes: a link's target (the link stays, pointing at the new version), else
    ``path``; renaming a new version onto the link itself would replace the link."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def atomic_write(path, data, check=None):
    """Write ``data`` (bytes, str, or a function that writes a file at the path it is given) to ``path``
    through a temporary file in the same folder, renamed into place only when complete; a file it replaces
    keeps its permissions. ``check(path)``, where given, may refuse just before the rename (``as_checked``)."""
    path = _through_link(path)
    if path.exists() and not path.is_file():
        raise BailongError(not_a_file(path))
    tmp = _beside(path, ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        if callable(data):
            data(tmp)
            _usual_mode(tmp)
        else:
            Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        if check:
            check(path)
        if path.exists():  # a private file (0600) stays private
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _failed(path, e, lambda: Path(tmp).unlink(missing_ok=True))


@contextmanager
def atomic_folder(path, check=None):
    """``with atomic_folder(path) as tmp:`` fill ``tmp``, a new folder beside ``path``; when the block
    completes it replaces ``path`` (unless ``check(path)`` then refuses: ``as_checked``), and when it fails it is
    removed and ``path`` is left as it was."""
    path = _through_link(path)
    tmp, old = _beside(path, ".tmp"), _beside(path, ".old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process of the same number
        tmp.mkdir(parents=True)
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        yield tmp
        if check:
            check(path)
        if path.exists():  # the old version goes only once the new one is whole
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the old version back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if isinstance(e, BailongError) and str(tmp) in str(e):  # a write inside it: named as in its place
            e = BailongError(str(e).replace(str(tmp), str(path)))
        _failed(path, e, lambda: shutil.rmtree(tmp, ignore_errors=True))
