import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # bitsandbytes' PyTorch paths would compile on every new shape

import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter; it must be set before they import
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


def asset(name):
    """Path of a shared test asset, or skip the test with the reason."""
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared test assets are not in this checkout)")
    return path


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset's random model on the CPU, one per test module."""
    import bailong
    return bailong.load_preset("tiny", device="cpu")[0]
