"""The CPU cores this process may use (free of torch: the commands fit PyTorch's threads to them before it loads).

Two things limit them, and the operating system's count (os.cpu_count()) shows neither: the CPU affinity (a
job scheduler's share of a machine: 8 of a node's 128 cores), and a container's CPU quota (``docker --cpus 4``,
a Kubernetes pod's limit), which leaves the affinity at every core of the machine and stops the container's
processes for the rest of each period (a tenth of a second) once they have spent its CPUs' time in it.
PyTorch starts a thread per core of the affinity, and its threads wait for each other by spinning: under a quota
of fewer CPUs they spend the quota waiting. On two cores under a one-CPU quota the quick start took 12.7-13.6 s
with PyTorch's two threads, 7.7-8.1 s with one.
"""
import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

MOUNTS = Path("/proc/self/mountinfo")  # where each control-group tree is mounted, and which group is its root
OWN_GROUPS = Path("/proc/self/cgroup")  # this process's group in each tree: "0::/path" (v2), "4:cpu,cpuacct:/path"


def usable_cores() -> int:
    """The cores of this process's affinity, or its CPU quota rounded up where that is fewer."""
    quota = cpu_quota()
    return max(1, min(_affinity(), math.ceil(quota))) if quota else _affinity()


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_quota() -> float | None:
    """The CPUs' time this process's control groups allow it (quota / period), the least of its own group's and
    those above it that it can see (a limit on a parent binds its children); None where none is set, or on a
    system without them. Each tree's group is found under its mount point, relative to the group mounted there:
    a container mounts its own group as the root, and /proc names it by the host's path or, in a cgroup
    namespace, as the root. A folder that another mount hides (made over it, over a folder above it, or over the
    group's own) is passed over: the kernel says which mount a path leads to."""
    try:  # paths as bytes, not always UTF-8: kept as os.fsdecode keeps a file name, to be opened as they are
        mounts, own = (os.fsdecode(file.read_bytes()).split("\n") for file in (MOUNTS, OWN_GROUPS))
    except OSError:
        return None
    groups = {}  # "v2", or "cpu" for v1's cpu controller: this process's group's path in that tree
    for _, controllers, path in (line.split(":", 2) for line in own if line.count(":") >= 2):
        if controllers == "" or "cpu" in controllers.split(","):
            groups["v2" if controllers == "" else "cpu"] = PurePosixPath(path)
    quotas = []
    for line in mounts:  # "36 25 0:31 <root> <mount point> <options> ... - <type> <source> <super options>"
        fields, kind = (part.split(" ") for part in line.partition(" - ")[::2])  # (" " alone: \040 in a name)
        if len(fields) < 5 or len(kind) < 3:
            continue
        fstype, options = kind[0], kind[2].split(",")
        tree = "v2" if fstype == "cgroup2" else "cpu" if fstype == "cgroup" and "cpu" in options else None
        if tree not in groups:
            continue
        root, point = (PurePosixPath(_unescaped(f)) for f in fields[3:5])
        if groups[tree] != root and root not in groups[tree].parents:
            continue  # a group outside this mount's
        below = groups[tree].relative_to(root)
        if ".." in below.parts:  # a group outside a cgroup namespace's root ("/../b"), under a mount of its root
            continue
        for folder in (Path(point, g) for g in (below, *below.parents)):  # its group's and those above it
            if _mount_at(folder) in (fields[0], None):  # else mounted over (there, or above or below the point)
                quotas.append(_quota(folder, tree == "v2"))
    return min((q for q in quotas if q), default=None)


def _mount_at(path: Path) -> str | None:
    """The ID of the mount that ``path`` leads to now, as mountinfo numbers them (/proc/self/fdinfo's mnt_id of
    the folder opened); None where that cannot be told (a kernel before 3.15, a folder not there)."""
    try:
        folder = os.open(path, os.O_PATH)
    except (OSError, AttributeError):  # (O_PATH: Linux's)
        return None
    try:
        found = [line.split() for line in Path(f"/proc/self/fdinfo/{folder}").read_text().split("\n")]
    except OSError:
        return None
    finally:
        os.close(folder)
    return next((words[1] for words in found if words[:1] == ["mnt_id:"] and len(words) > 1), None)


def _unescaped(field: str) -> str:
    """A path as mountinfo writes it: a space, tab, newline or backslash as an octal escape (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _quota(group: Path, v2: bool) -> float | None:
    """A group's quota in CPUs: v2's cpu.max ("max 100000" where unlimited), v1's cfs_quota_us (-1 where
    unlimited) over cfs_period_us; None where it sets none or the files are not there."""
    try:
        if v2:
            quota, period = (group / "cpu.max").read_text().split()
        else:
            quota, period = ((group / f"cpu.cfs_{name}_us").read_text() for name in ("quota", "period"))
        return int(quota) / int(period) if int(quota) > 0 and int(period) > 0 else None
    except (OSError, ValueError):  # a group without the file (the host's root), "max", or a file of another form
        return None


@contextmanager
def fitted_threads():
    """PyTorch's threads, and OpenMP's in the processes this one starts, made as many as the usable cores where a
    CPU quota leaves fewer than the affinity's; OMP_NUM_THREADS, where set, decides instead (torchrun sets it to 1
    for several processes a machine). For a command's run: after it, as they were again (in a caller's process,
    PyTorch's where it was loaded before)."""
    if "OMP_NUM_THREADS" in os.environ or (cores := usable_cores()) >= _affinity():
        yield
        return
    torch = sys.modules.get("torch")  # loaded already (python -m bailong.vocab imports it before the command runs)
    before = torch.get_num_threads() if torch else None
    os.environ["OMP_NUM_THREADS"] = str(cores)  # read by PyTorch as it loads
    if torch:
        torch.set_num_threads(cores)
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if torch:
            torch.set_num_threads(before)
