"""The cores a process may use: its affinity, and a container's CPU quota read from control-group trees written
here as Linux shows them (v2's one tree, v1's per controller); the commands' PyTorch threads fitted to them."""
import os
import subprocess
import sys

import pytest

from bailong import cores
from conftest import ROOT


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine of 8 cores whose control groups are files under tmp_path: ``machine(own, files)`` writes
    /proc/self/cgroup's lines ``own`` and each {path under /sys/fs/cgroup: text}."""
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(cores, "CGROUPS", tmp_path / "sys")
    monkeypatch.setattr(cores, "OWN_GROUPS", tmp_path / "proc-self-cgroup")

    def write(own, files):
        (tmp_path / "proc-self-cgroup").write_text(own)
        for path, text in files.items():
            (tmp_path / "sys" / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "sys" / path).write_text(text)
    return write


V1_HOST = "12:memory:/user.slice\n4:cpu,cpuacct:/user.slice/job\n3:cpuset:/\n0::/user.slice/job\n"


@pytest.mark.parametrize("own, files, quota, usable", [
    ("0::/\n", {"cpu.max": "max 100000\n"}, None, 8),  # a container without a limit
    ("0::/\n", {"cpu.max": "250000 100000\n"}, 2.5, 3),  # docker --cpus 2.5: rounded up
    ("0::/\n", {"cpu.max": "1600000 100000\n"}, 16.0, 8),  # more than the affinity's cores: those
    ("0::/\n", {"cpu.max": "50000 100000\n"}, 0.5, 1),
    # the host's tree: the limit of a group above this one binds it; the root has no cpu.max
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/cpu.max": "400000 100000", "kubepods/pod1/c1/cpu.max": "max 100000",
                                "kubepods/cpu.max": "max 100000"}, 4.0, 4),
    ("0::/a/b\n", {"a/cpu.max": "300000 100000", "a/b/cpu.max": "200000 100000"}, 2.0, 2),  # the least
    # a container without its own cgroup namespace: /proc names the host's path, the mount is its own group
    ("0::/docker/0123abcd\n", {"cpu.max": "200000 100000"}, 2.0, 2),
    ("4:cpu,cpuacct:/docker/0123abcd\n", {"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"},
     3.0, 3),  # v1
    (V1_HOST, {"cpu/user.slice/job/cpu.cfs_quota_us": "-1\n", "cpu/user.slice/job/cpu.cfs_period_us": "100000\n",
               "cpu/user.slice/cpu.cfs_quota_us": "150000\n", "cpu/user.slice/cpu.cfs_period_us": "100000\n"}, 1.5, 2),
    (V1_HOST, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None, 8),  # no limit
    ("0::/\n", {"cpu.max": "a lot\n"}, None, 8),  # a file of another form: not guessed at
    ("0::/\n", {"cpu.max": "0 100000\n"}, None, 8),
    ("0::/\n", {}, None, 8),  # the host's root, or no cpu controller
    ("", {}, None, 8),
])
def test_the_usable_cores_are_the_affinity_s_or_the_cpu_quota_rounded_up(machine, own, files, quota, usable):
    machine(own, files)
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
cores.CGROUPS = __import__("pathlib").Path(sys.argv[2])
cores.OWN_GROUPS = cores.CGROUPS / "self"
cores.OWN_GROUPS.write_text("0::/\\n")
cores.CGROUPS.joinpath("cpu.max").write_text(sys.argv[3])

def main(argv):
    import torch
    print(os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())
run_cli(main, [])
"""


@pytest.mark.parametrize("torch_first", ["torch first", "torch after"])
def test_a_command_runs_as_many_pytorch_threads_as_a_cpu_quota_gives_it(tmp_path, torch_first):
    """Under a quota of fewer CPUs than the cores it sees, PyTorch's threads spend the quota spinning (the quick
    start on two cores under a one-CPU quota: 12.7-13.6 s with two threads, 7.7-8.0 s with one). A command
    fits them to the quota, loaded before it or after; where OMP_NUM_THREADS is set, or there is no quota, or
    it is the cores seen, they stay as they were."""
    group = tmp_path / "group"
    group.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}

    def threads(quota, **more):
        run = subprocess.run([sys.executable, "-c", FITTED, torch_first, str(group), quota], cwd=ROOT, text=True,
                             capture_output=True, env={**env, **more}, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.split()

    assert threads("100000 100000") == ["1", "1"]
    assert threads("150000 100000")[0] == "2"  # PyTorch's threads at most the machine's cores where it reads it
    assert threads("150000 100000", OMP_NUM_THREADS="1") == ["1", "1"]
    assert threads("max 100000")[0] == threads("400000 100000")[0] == "None"
