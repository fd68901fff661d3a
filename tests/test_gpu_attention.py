"""Attention on CUDA in training: kept for the backward (``train.py --keep-attention``) by the kernel SDPA takes,
flash's or, asked first (``--cudnn-attention``), cuDNN's (skipped without a GPU)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_on_cuda_attention_kept_trains_as_recomputed(monkeypatch):
    """``Llama.keep_attention`` (``train.py --keep-attention``): SDPA's flash kernel called by hand as SDPA calls it,
    its backward from the kept output and log-sum-exp, a bf16 model under bf16 autocast as train.py runs it: as
    on the CPU (tests/test_layer_fused.py)."""
    from test_layer_fused import check_attention_kept
    check_attention_kept(monkeypatch, "cuda", torch.bfloat16, autocast=True)


@pytest.mark.parametrize("cudnn_first", [False, True])
def test_on_cuda_attention_kept_by_sdpas_kernel_matches_sdpa(cudnn_first):
    """``bailong.layer_fused._kept_attention`` (``--keep-attention``; ``--cudnn-attention``: cuDNN's kernel asked
    first), at a 7B layer's heads (32 of 128, 1,024 positions, bf16, q/k/v views of one output): the kernel SDPA
    takes in training, called by hand, gives SDPA's output bit for bit and its gradients to the rounding of the
    kernel's backward (which may add in another order from call to call); with cuDNN's first, where SDPA takes it
    here, that kernel is the one called."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from bailong.layer_fused import _kept_attention, _kept_backward, attention_kernels
    T = 1024
    qkv = torch.randn(1, T, 3 * 4096, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.view(1, T, 32, 128).transpose(1, 2) for t in qkv.split(4096, -1))
    grad = torch.randn(1, T, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    wanting = [t.detach().requires_grad_() for t in (q, k, v)]
    with attention_kernels(cudnn_first):
        choice = torch._fused_sdp_choice(*wanting, is_causal=True)
        out = F.scaled_dot_product_attention(*wanting, is_causal=True)
        grads = torch.autograd.grad(out, wanting, grad)
    if cudnn_first and choice != int(SDPBackend.CUDNN_ATTENTION):
        pytest.skip(f"SDPA takes no cuDNN kernel on this machine (its choice: {choice}; cuDNN "
                    f"{torch.backends.cudnn.version()})")
    with CalledOps() as called:
        kept = _kept_attention(q, k, v, cudnn_first)
        assert kept is not None
        kept_grads = _kept_backward(q, k, v, *kept, grad.transpose(1, 2).reshape(1, T, -1))
    kernel = "cudnn" if choice == int(SDPBackend.CUDNN_ATTENTION) else "flash"
    assert [op for op in called.ops if "attention" in op] == [f"aten._scaled_dot_product_{kernel}_attention.default",
                                                              f"aten._scaled_dot_product_{kernel}_attention_backward."
                                                              "default"]
    assert torch.equal(kept[0], out), (kept[0] - out).abs().max()
    for name, a, b in zip("qkv", grads, kept_grads):
        torch.testing.assert_close(b, a.transpose(1, 2).reshape(1, T, -1), rtol=1e-2, atol=1e-3, msg=name)


class CalledOps(TorchDispatchMode):
    """Within: the name of every aten operation called, in ``ops``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
