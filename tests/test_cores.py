"""The cores a process may use: its affinity, and a container's CPU quota read from control-group trees written
here as Linux shows them (v2's one tree, v1's per controller); the commands' PyTorch threads fitted to them."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from bailong import cores
from conftest import ROOT


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine of 8 cores whose control groups are files under tmp_path: ``machine(own, mounts, files)`` writes
    /proc/self/cgroup's lines ``own``, mountinfo's ``mounts`` (``{sys}`` for the folder that stands for
    /sys/fs/cgroup) and each {path under it: text}."""
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(cores, "OWN_GROUPS", tmp_path / "proc-self-cgroup")
    monkeypatch.setattr(cores, "MOUNTS", tmp_path / "proc-self-mountinfo")
    monkeypatch.setattr(cores, "_mount_at", lambda point: None)  # which mount a path leads to: not told

    def write(own, mounts, files):
        (tmp_path / "proc-self-cgroup").write_bytes(os.fsencode(own))  # a path's bytes, as Linux gives them
        (tmp_path / "proc-self-mountinfo").write_bytes(os.fsencode(mounts.replace("{sys}", str(tmp_path / "sys"))))
        for path, text in files.items():
            (tmp_path / "sys" / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "sys" / path).write_text(text)
    return write


def v2(root="/", point="", ids="30 23"):
    """A mountinfo line: the v2 tree's group ``root`` mounted at /sys/fs/cgroup/``point``, ``ids`` its mount ID and
    its parent's (the mount its point lies on)."""
    return f"{ids} 0:26 {root} {{sys}}/{point} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def v1(root="/", point="cpu", controllers="cpu", ids="32 31"):  # v1's tree of ``controllers``
    return f"{ids} 0:29 {root} {{sys}}/{point} rw,nosuid shared:9 - cgroup cgroup rw,{controllers}\n"


TMPFS = "31 23 0:28 / {sys} rw - tmpfs tmpfs rw\n"  # /sys/fs/cgroup, where v1's trees are mounted


HYBRID = "4:cpu,cpuacct:/user.slice/job\n3:cpuset:/\n0::/user.slice/job\n"  # v1 controllers, v2's tree beside
HYBRID_MOUNTS = TMPFS + v1(point="cpu,cpuacct", controllers="cpu,cpuacct") + \
    v1(point="cpuset", controllers="cpuset", ids="33 31") + v2(point="unified", ids="34 31")
CPU = "cpu,cpuacct/user.slice"
QUOTA_1_5 = {f"{CPU}/cpu.cfs_quota_us": "150000\n", f"{CPU}/cpu.cfs_period_us": "100000\n",
             f"{CPU}/job/cpu.cfs_quota_us": "-1\n", f"{CPU}/job/cpu.cfs_period_us": "100000\n",
             "unified/user.slice/job/cpu.max": "max 100000\n", "cpuset/cpu.cfs_quota_us": "100000\n",
             "cpuset/cpu.cfs_period_us": "100000\n"}


@pytest.mark.parametrize("own, mounts, files, quota, usable", [
    ("0::/\n", v2(), {"cpu.max": "max 100000\n"}, None, 8),  # a container without a limit
    ("0::/\n", v2(), {"cpu.max": "250000 100000\n"}, 2.5, 3),  # docker --cpus 2.5: rounded up
    ("0::/\n", v2(), {"cpu.max": "1600000 100000\n"}, 16.0, 8),  # more than the affinity's cores: those
    ("0::/\n", v2(), {"cpu.max": "50000 100000\n"}, 0.5, 1),
    # the host's tree: the limit of a group above this one binds it; the root has no cpu.max
    ("0::/kubepods/pod1/c1\n", v2(), {"kubepods/pod1/cpu.max": "400000 100000", "kubepods/pod1/c1/cpu.max":
                                      "max 100000", "kubepods/cpu.max": "max 100000"}, 4.0, 4),
    ("0::/a/b\n", v2(), {"a/cpu.max": "300000 100000", "a/b/cpu.max": "200000 100000"}, 2.0, 2),  # the least
    # a container without its own cgroup namespace: /proc names the host's path, its own group is mounted as root
    ("0::/docker/0123abcd\n", v2("/docker/0123abcd"), {"cpu.max": "200000 100000"}, 2.0, 2),
    ("0::/docker/0123abcd/inner\n", v2("/docker/0123abcd"), {"cpu.max": "200000 100000",
                                                              "inner/cpu.max": "100000 100000"}, 1.0, 1),
    ("4:cpu,cpuacct:/docker/0123abcd\n", v1("/docker/0123abcd", "cpu,cpuacct", "cpu,cpuacct"),
     {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 3.0, 3),  # v1
    (HYBRID, HYBRID_MOUNTS, QUOTA_1_5, 1.5, 2),  # v1's cpu controller decides; cpuset's tree is not read
    (HYBRID, HYBRID_MOUNTS, {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     None, 8),  # no limit
    ("0::/mine\n", v2("/theirs"), {"cpu.max": "100000 100000"}, None, 8),  # another group's mount: not ours
    ("0::/\n", v2(point="my\\040groups"), {"my groups/cpu.max": "200000 100000"}, 2.0, 2),  # a space, escaped
    # a name not in UTF-8 (Latin-1's é, one byte: Python holds it as \udce9), in a mount point or a group
    ("0::/\n", v2(point="caf\udce9"), {"caf\udce9/cpu.max": "200000 100000"}, 2.0, 2),
    ("0::/caf\udce9\n", v2(), {"caf\udce9/cpu.max": "200000 100000"}, 2.0, 2),
    # a group outside this cgroup namespace's root (/proc names it by ".."): not under a mount of that root, and
    # under one made outside the namespace (the kernel names its root "/..")
    ("1:cpu:/../b\n", v1(), {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, None, 8),
    ("0::/../b\n", v2(), {"b/cpu.max": "100000 100000", "cpu.max": "100000 100000"}, None, 8),
    ("0::/../b\n", v2("/.."), {"b/cpu.max": "100000 100000"}, 1.0, 1),
    ("0::/\n", v2(point="a\x0cb"), {"a\x0cb/cpu.max": "100000 100000"}, 1.0, 1),  # a line break to Python, not Linux
    ("0::/\n", v2(), {"cpu.max": "a lot\n"}, None, 8),  # a file of another form: not guessed at
    ("0::/\n", v2(), {"cpu.max": "0 100000\n"}, None, 8),
    ("0::/\n", v2(), {}, None, 8),  # the host's root, or no cpu controller
    ("0::/\n", "", {"cpu.max": "100000 100000"}, None, 8),  # not mounted
    ("0::/\n", "30 23 0:26 / {sys}\n2 - cgroup2\n" + v2(), {"cpu.max": "100000 100000"}, 1.0, 1),  # lines cut short
    ("", v2(), {"cpu.max": "100000 100000"}, None, 8),
])
def test_the_usable_cores_are_the_affinity_s_or_the_cpu_quota_rounded_up(machine, own, mounts, files, quota, usable):
    machine(own, mounts, files)
    assert cores.cpu_quota() == quota and cores.usable_cores() == usable


def test_without_control_groups_the_affinity_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "OWN_GROUPS", tmp_path / "absent")  # not Linux, or /proc not mounted
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert cores.cpu_quota() is None and cores.usable_cores() == 3


FITTED = """
import os, sys
from bailong import cores
from bailong.errors import run_cli
if sys.argv[1] == "torch first":
    import torch
cores.os.sched_getaffinity = lambda pid: set(range(4))
group = __import__("pathlib").Path(sys.argv[2])
cores.OWN_GROUPS, cores.MOUNTS = group / "self", group / "mountinfo"
cores._mount_at = lambda point: "30"  # the mount below, as if it were one
cores.OWN_GROUPS.write_text("0::/\\n")
cores.MOUNTS.write_text(f"30 23 0:26 / {group} rw - cgroup2 cgroup2 rw\\n")
group.joinpath("cpu.max").write_text(sys.argv[3])

def main(argv):
    import torch
    print(os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())
before = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
try:
    run_cli(main, [])
except SystemExit:  # the caller's process goes on
    print(os.environ.get("OMP_NUM_THREADS"), sys.modules["torch"].get_num_threads(), before)
"""


@pytest.mark.parametrize("torch_first", ["torch first", "torch after"])
def test_a_command_runs_as_many_pytorch_threads_as_a_cpu_quota_gives_it(tmp_path, torch_first):
    """Under a quota of fewer CPUs than the cores it sees, PyTorch's threads spend the quota spinning (the quick
    start on two cores under a one-CPU quota: 12.7-13.6 s with two threads, 7.7-8.0 s with one). A command
    fits them to the quota, loaded before it or after; where OMP_NUM_THREADS is set, or there is no quota, or
    it is the cores seen, they stay as they were. After the command, the caller's process has its own again."""
    group = tmp_path / "group"
    group.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    def threads(quota, **more):
        run = subprocess.run([sys.executable, "-c", FITTED, torch_first, str(group), quota], cwd=ROOT, text=True,
                             capture_output=True, env={**env, **more}, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        during, after = run.stdout.split()[:2], run.stdout.split()[2:]
        assert after[0] == more.get("OMP_NUM_THREADS", "None")  # as the caller had it
        assert after[1] == after[2] if torch_first == "torch first" else after[2] == "None"
        return during

    assert threads("100000 100000") == ["1", "1"]
    assert threads("150000 100000")[0] == "2"  # PyTorch's threads at most the machine's cores where it reads it
    assert threads("150000 100000", OMP_NUM_THREADS="1") == ["1", "1"]
    assert threads("max 100000")[0] == threads("400000 100000")[0] == "None"


OVER_MOUNTED = """
import json, sys
from pathlib import Path
from bailong import cores
point, files, group = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
ids = [line.split()[0] for line in open("/proc/self/mountinfo") if line.split()[4] == point]  # in the order made
cores.OWN_GROUPS, cores.MOUNTS = files / "cgroup", files / "mountinfo"
cores.OWN_GROUPS.write_text(f"0::{group}\\n")
quotas = {}
for mount in ids:  # each as if it were the v2 tree, alone
    cores.MOUNTS.write_text(f"{mount} 1 0:99 / {point} rw - cgroup2 cgroup2 rw\\n")
    quotas[mount] = cores.cpu_quota()
print(json.dumps([quotas, cores._mount_at(Path(point))]))
"""


def _mounts_allowed(folder) -> bool:  # a tmpfs mounted as a user, in namespaces of its own
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs none "$1"', "sh", folder],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_folder_another_mount_hides_is_passed_over_as_the_kernel_says(tmp_path):
    """Made real in a mount namespace of the test's own: on folder b a mount X, and Y over it (as a bind mount over
    a container's group); then a mount over the process's group's folder g in Y (another group's files there);
    then a mount over b's parent (the whole tree hidden). Only the folders that lead to the mount read are read."""
    if not _mounts_allowed(tmp_path):
        pytest.skip("mounts need unshare, and user and mount namespaces allowed")
    b, files = tmp_path / "a" / "b", tmp_path / "files"
    b.mkdir(parents=True)
    files.mkdir()
    check = f"{shlex.quote(sys.executable)} -c {shlex.quote(OVER_MOUNTED)} {shlex.quote(str(b))} {files}"
    run = subprocess.run(["unshare", "-rm", "sh", "-ec", f"""a={shlex.quote(str(b.parent))}
        mount -t tmpfs none "$a"/b; mount -t tmpfs none "$a"/b; echo 100000 100000 > "$a"/b/cpu.max; {check} /
        mkdir "$a"/b/g; echo 200000 100000 > "$a"/b/g/cpu.max; mount -t tmpfs none "$a"/b/g
        echo 50000 100000 > "$a"/b/g/cpu.max; {check} /g
        mount -t tmpfs none "$a"; mkdir "$a"/b; echo 100000 100000 > "$a"/b/cpu.max; {check} /"""],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    (first, at), (below, at_below), (above, at_above) = map(json.loads, run.stdout.splitlines())
    (x, x_quota), (y, y_quota) = first.items()
    assert x_quota is None and y_quota == 1.0 and at == y  # Y hides X
    assert below == first and at_below == y  # g's folder in Y hidden by a mount whose quota is 0.5: Y's 1.0
    assert above == {x: None, y: None} and at_above not in (x, y)
