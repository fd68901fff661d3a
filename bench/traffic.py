"""What a step's kernels other than the matrix multiplications and attention read and write: ``Traffic``,
which ``bench/bench_memory.py --traffic`` runs over the same fake training step it counts the memory of. The
bytes of a memory-bound kernel over a copy's rate are a floor for its time; the matmuls' time is their FLOPs'
(``bench/bench_train.py --count``)."""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# operations a GPU runs as matrix multiplications (time by FLOPs, not bytes), and those that launch nothing
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")
ALLOCATIONS = ("aten::empty", "aten::new_empty", "aten::lift_fresh")
WRITE_ONLY = ("aten::copy_", "aten::_foreach_copy_", "aten::zero_", "aten::fill_")  # what they write is not read
# their schema marks the gradients written; the kernels write them only with a grad_scale (unscaled in place),
# which bf16 training does not pass
FUSED_ADAM = ("aten::_fused_adam_", "aten::_fused_adamw_")


def _tensors(value):
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


class Traffic(TorchDispatchMode):
    """The bytes each kernel of a step reads and writes, by operation: an aten operation that writes new
    memory or in place (tests/launch_count.py's rule; views and allocations launch nothing) reads its tensor
    arguments and writes its new outputs and the arguments its schema marks written (an in-place operation's,
    ``_fused_adamw_``'s weights and moments); a Triton launch (``launch``) moves its tensor arguments once.
    Matrix multiplications and attention are counted apart (``matmuls``: their time is their FLOPs'). The
    embedding reads only the rows it writes, not its whole table; other gathers and broadcast inputs count
    whole (none of them large in a step)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.kernels, self.matmuls = collections.Counter(), collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.name()
        if name.startswith(ALLOCATIONS):
            return out
        ins = _tensors((args, kwargs))
        storages = {id(t.untyped_storage()) for t in ins}
        new = [t for t in _tensors(out) if id(t.untyped_storage()) not in storages]
        if not func._schema.is_mutable and not new:
            return out  # a view
        if name.startswith(MATMULS):
            self.matmuls[name.split(".")[0]] += 1
            return out
        schema = func._schema.arguments
        values = [*args, *(kwargs.get(a.name) for a in schema[len(args):])]
        written = []
        for i, (argument, value) in enumerate(zip(schema, values)):
            unscaled = name in FUSED_ADAM and i == 1 and kwargs.get("grad_scale") is None  # gradients left alone
            if argument.alias_info is not None and argument.alias_info.is_write and not unscaled:
                written += _tensors(value)
        read = 0 if name == "aten::embedding" else sum(t.nbytes for t in ins)
        if name.startswith(WRITE_ONLY):
            read -= sum(t.nbytes for t in _tensors(args[0]))
        wrote = sum(t.nbytes for t in new + written) * (2 if name == "aten::embedding" else 1)
        self.record(name.split(".")[0], read + wrote)
        return out

    def record(self, name, n):
        self.bytes[name] += n
        self.kernels[name] += 1

    def launch(self, name):
        """Stands in for the Triton kernel ``name``: ``kernel[grid](...)`` records its launch and bytes."""
        return Launch(self, name)


class Launch:
    """A Triton kernel's stand-in for ``Traffic``."""

    def __init__(self, traffic, name):
        self.traffic, self.name = traffic, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.traffic.record(self.name, sum(t.nbytes for t in _tensors((args, kwargs))))
