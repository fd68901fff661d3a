import gc
import os
import subprocess
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # bitsandbytes' PyTorch paths would compile on every new shape

import torch

from bailong.switches import triton_installed

if not torch.cuda.is_available():  # Triton kernels run under the interpreter; it must be set before they import
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


def patch_the_language_once_a_launch():
    """The Triton interpreter patches the language modules a @triton.jit function sees (triton.language, or
    triton.language.core, as Triton's own helpers see it) for a launch, and again at every call of a helper inside
    it (``inspect.getmembers`` over each), where a module patched already in that launch changes nothing: a third
    of the interpreted tests' time. Here a helper's call patches only where it sees a module the launch has not
    patched yet. Where this interpreter has other internals, nothing changes."""
    import triton.language as tl
    from triton.runtime import interpreter
    try:
        launch, patch, Scope = interpreter.GridExecutor.__call__, interpreter._patch_lang, interpreter._LangPatchScope
    except AttributeError:
        return
    launches = []  # for a launch in progress, the language modules patched in it

    def patch_lang(fn):
        seen = {v.__name__ for v in fn.__globals__.values() if v is tl or v is tl.core}
        if launches and seen <= launches[-1]:
            return Scope()
        if launches:
            launches[-1] |= seen
        return patch(fn)

    def launch_once_patched(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()
    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, launch_once_patched


TRITON = triton_installed()  # not on macOS: requirements.txt installs it on Linux alone
WITHOUT_TRITON = "Triton is not installed (it ships for Linux alone)"
needs_triton = pytest.mark.skipif(not TRITON, reason=WITHOUT_TRITON)
if TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    patch_the_language_once_a_launch()


def allocator_peak(run, folder):
    """The most the CPU's allocator held at once while ``run()`` ran, and what it held at the end, both over
    what it held before: the profiler's allocations and frees, added up in time order (trace in ``folder``)."""
    import json

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        run()
    p.export_chrome_trace(str(folder / "trace.json"))
    events = json.loads((folder / "trace.json").read_text())["traceEvents"]
    held = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        held += e["args"]["Bytes"]
        peak = max(peak, held)
    return peak, held


def asset(name):
    """Path of a shared test asset, or skip the test with the reason."""
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared test assets are not in this checkout)")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB filesystem, where the machine allows mounting one (root on Linux); else skip."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root on Linux)")
    yield disk
    gc.collect()  # (whatever the test left open there)
    subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset's random model on the CPU, one per test module."""
    import bailong
    return bailong.load_preset("tiny", device="cpu")[0]
