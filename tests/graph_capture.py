"""CUDA graph capture and replay emulated on the CPU, faithfully enough to test code that is captured.

A CUDA graph records the kernels a stretch of code launches, with the memory and the
host's numbers each was launched with, and runs none of them; a replay launches the same
kernels on the same memory, whatever the Python around them would do now. So code that
caches work on the host, decides on the host, or reads the device's values there
behaves otherwise captured. Here a capture records every aten operation below autograd
(``TorchDispatchMode``) and every Triton launch, with the tensors and numbers given, and
runs them, so that the code goes on with real values; at its end every tensor that
existed before and was written in it is put back, and every one made in it is filled
with garbage (NaN in float32 and bf16): capturing runs nothing, so what it made holds
nothing until a replay. A replay runs the recorded operations again, in order, on the
recorded tensors, writing each result into the tensor the capture handed out. What
makes the host read a device value raises, as it does in a capture on CUDA (``.item()``
and the like, ``.tolist()``, ``.numpy()``, ``.cpu()``, indexing by a boolean mask, ``nonzero``).
Random kernels as CUDA's generator runs them in graphs: a capture draws nothing (the CPU
generator's state is put back at its end), and each replay draws anew, after what came
before it (CUDA's generator is advanced at each replay), so a replayed step draws what
an eager one would. Not emulated: streams (one here), the allocator (nothing made in a
capture is freed before its end), reading or setting CUDA's random state (refused in a
capture), and whatever runs only where a tensor is on CUDA.
"""
import contextlib
import functools

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from launch_count import triton_kernels

HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero",
              "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim")
MASKS_READ = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")  # a boolean index
ALLOCATIONS = ("aten::empty", "aten::new_empty", "aten::empty_strided", "aten::empty_like")


def _host_read(name):
    raise RuntimeError(f"{name}: the host reads a device value, not permitted when a stream is capturing")


def _tensors(tree):
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()]


class Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.steps = []  # (run, outputs): what a replay does, in order
        self.made = {}  # the storages allocated inside the capture, as bytes
        self.saved = {}  # the storages written inside it that existed before: their bytes before it

    def keep(self, tensors):
        """Before a write: the bytes of the written storages that existed before the capture."""
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.made and storage.data_ptr() not in self.saved:
                data = torch.empty(0, dtype=torch.uint8).set_(storage)
                self.saved[storage.data_ptr()] = data, data.clone()

    def put_back(self):
        """At the capture's end: memory as before it, and what it made holding garbage."""
        for data, before in self.saved.values():
            data.copy_(before)
        for data in self.made.values():
            data.fill_(255)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if name.split(".")[0] in HOST_READS or name.split(".")[0] in MASKS_READ and any(
                t.dtype == torch.bool for t in _tensors(args[1:2] if len(args) > 1 else kwargs.get("indices"))):
            _host_read(name)
        written = [t for i, a in enumerate(func._schema.arguments) if a.alias_info and a.alias_info.is_write
                   for t in _tensors(args[i] if i < len(args) else kwargs.get(a.name))]
        self.keep(written)
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        new = [t for t in outputs if t.untyped_storage().data_ptr() not in inputs]
        self.made.update((t.untyped_storage().data_ptr(), torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()))
                         for t in new)
        if (written or new) and not name.startswith(ALLOCATIONS):  # views and allocations launch nothing
            self.steps.append((functools.partial(func, *args, **kwargs), outputs))
        return out

    def replay(self):
        with torch.no_grad(), _disable_current_modes():
            for run, outputs in self.steps:
                for result, out in zip(_tensors(run()), outputs):
                    if (result.data_ptr(), result.stride()) != (out.data_ptr(), out.stride()):
                        out.copy_(result)


class Graph:
    """Stands in for ``torch.cuda.CUDAGraph``."""
    recording = None

    def replay(self):
        self.recording.replay()


class RecordedKernel:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches it, and inside a capture records the launch
    (every tensor it was given counted as written)."""

    def __init__(self, kernel, capturing):
        self.kernel, self.capturing = kernel, capturing

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            run = functools.partial(self.kernel[grid], *args, **kwargs)
            with _disable_current_modes():  # the interpreter's own operations are the kernel's, not ours
                if self.capturing:
                    self.capturing[0].keep(_tensors((args, kwargs)))
                    self.capturing[0].steps.append((run, []))
                return run()
        return launch


@contextlib.contextmanager
def emulated_cuda_graphs(monkeypatch):
    """Within: ``torch.cuda``'s streams, graphs and capture emulated on the CPU (above); Triton's kernels
    recorded. Yields the list of graphs captured."""
    capturing, graphs = [], []

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        g.recording = Recording()
        capturing.append(g.recording)
        random = torch.get_rng_state()
        try:
            with g.recording:
                yield
        finally:
            capturing.clear()
            g.recording.put_back()
            torch.set_rng_state(random)
        graphs.append(g)

    Stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    current = Stream()

    def read_on_host(method):
        def read(self, *args, **kwargs):
            if capturing:
                _host_read(f"Tensor.{method.__name__}")
            return method(self, *args, **kwargs)
        return read
    with monkeypatch.context() as patch:
        for name in ("tolist", "numpy", "__array__", "cpu"):  # .cpu(): a copy to the host, which waits
            patch.setattr(torch.Tensor, name, read_on_host(getattr(torch.Tensor, name)))
        for module, name, kernel in triton_kernels():
            patch.setattr(module, name, RecordedKernel(kernel, capturing))
        for name, value in dict(device=lambda d=None: contextlib.nullcontext(), Stream=Stream,
                                current_stream=lambda device=None: current,
                                stream=lambda s: contextlib.nullcontext(), CUDAGraph=Graph, graph=graph,
                                set_stream=lambda s: None, graph_pool_handle=object,
                                is_current_stream_capturing=lambda: bool(capturing)).items():
            patch.setattr(torch.cuda, name, value)
        yield graphs
