"""Out-of-bounds reads and writes of interpreted Triton kernels, which the interpreter itself lets pass.

On the CPU a kernel that reads past a tensor's end still gives the right answer when
the bytes it read are thrown away (masked later, or rows never stored); on a GPU the
same read can fault. Inside ``checked_bounds()`` every load and store a kernel makes
under the Triton interpreter must land inside one of the tensors passed to that
launch (tuples of tensors included), else the block fails, naming the first addresses.
This hooks the interpreter's internals (Triton 3.x); where they have moved, the
tests that use it skip rather than check nothing.
"""
import contextlib

import numpy as np
import pytest
import torch


def _extent(t: torch.Tensor):
    """(first byte, one past the last byte) of a tensor's elements."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _tensors(args):
    for a in args:
        if isinstance(a, (tuple, list)):
            yield from _tensors(a)
        elif isinstance(a, torch.Tensor) and a.numel():
            yield a


@contextlib.contextmanager
def checked_bounds():
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    executor, builder = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpreterBuilder", None)
    if not all(hasattr(c, n) for c, n in [(executor, "_init_args_hst"), (builder, "create_masked_load"),
                                          (builder, "create_masked_store")]):
        pytest.skip("the Triton interpreter's internals moved: bounds cannot be checked")
    extents, outside = [], []

    def init_args(self, args, kwargs):  # each launch: the tensors it was given
        extents[:] = [_extent(t) for t in _tensors([*args, *(kwargs or {}).values()])]
        return init_args.original(self, args, kwargs)

    def check(ptrs, mask, itemsize, what):
        addresses = np.asarray(ptrs).astype(np.uint64)
        addresses = addresses[np.broadcast_to(np.asarray(mask, dtype=bool), addresses.shape)]
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in extents:
            inside |= (addresses >= start) & (addresses + itemsize <= end)
        if not inside.all():
            outside.append(f"{what} of {(~inside).sum()} elements outside every tensor given, first at "
                           + ", ".join(hex(int(a)) for a in addresses[~inside][:3]))

    def load(self, ptrs, mask, other, *rest):
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        check(ptrs.data, mask.data, itemsize, "load")
        return load.original(self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        check(ptrs.data, mask.data, value.data.dtype.itemsize, "store")
        return store.original(self, ptrs, value, mask, *rest)

    init_args.original, load.original = executor._init_args_hst, builder.create_masked_load
    store.original = builder.create_masked_store
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(executor, "_init_args_hst", init_args)
        patch.setattr(builder, "create_masked_load", load)
        patch.setattr(builder, "create_masked_store", store)
        yield
    assert not outside, outside[:3]
