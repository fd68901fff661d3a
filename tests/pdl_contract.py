"""Programmatic dependent launch (PDL) checked under the Triton interpreter, which runs neither PDL nor its PTX.

With PDL on a GPU, a decoding kernel may start while the kernel before it still
runs (and kernels before that one), so each program must keep to one order
(``bailong_kernels.nf4_dequant.pdl``): ``_pdl_start`` first; then reads of the
weights only (the arguments named in ``WEIGHTS``: what no kernel writes while decoding); then
``_pdl_wait``; only then other reads and any write. Inside ``pdl_contract()`` the
kernels run with PDL on (``pdl`` forced true, the two GDC calls replaced by
markers), and every load and store an interpreted program of a kernel launched
with PDL makes is checked against that order (the context gives the list of
those kernels' names, in launch order); the block fails, naming the kernel and what it did, if a
program reads anything but a weight before its wait, writes before it, or never
starts or waits. This hooks the interpreter's internals as tests/bounds.py does
(Triton 3.x); where they have moved, the tests that use it skip.
"""
import contextlib
import math

import numpy as np
import pytest

from bounds import _extent, _tensors

WEIGHTS = {"weights", "gate", "up", "w_ptr"}  # the kernels' arguments that hold only weights and tables


@contextlib.contextmanager
def pdl_contract():
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    executor, builder = getattr(interpreter, "GridExecutor", None), getattr(interpreter, "InterpreterBuilder", None)
    if not all(hasattr(c, n) for c, n in [(executor, "__call__"), (builder, "set_grid_idx"),
                                          (builder, "create_masked_load"), (builder, "create_masked_store")]):
        pytest.skip("the Triton interpreter's internals moved: the PDL order cannot be checked")
    from bailong_kernels import nf4_dequant
    state = dict(kernel=None, weights=[], phase=None, programs=0, waited=True)
    broken, launched = [], []  # what broke the order; the kernels launched with PDL, in order

    def fail(what):
        broken.append(f"{state['kernel']}: {what}")

    def call(self, *args, **kwargs):  # a launch: with PDL or not, and which of its tensors are weights
        pdl = kwargs.get("launch_pdl", False)
        if kwargs.get("PDL", False) != pdl:
            broken.append(f"{self.fn.__name__}: PDL={kwargs.get('PDL')} launched with launch_pdl={pdl}")
        if not pdl:
            state.update(kernel=None, phase=None, waited=True)
            return call.original(self, *args, **kwargs)
        launched.append(self.fn.__name__)
        named = [*zip(self.arg_names, args), *kwargs.items()]
        state.update(kernel=self.fn.__name__, programs=0, waited=True,
                     weights=[_extent(t) for name, a in named if name in WEIGHTS for t in _tensors([a])])
        call.original(self, *args, **kwargs)
        if not state["waited"]:
            fail("a program ended without waiting")
        grid = self.grid if isinstance(self.grid, tuple) else None
        if grid is not None and state["programs"] != math.prod(grid):
            fail(f"{state['programs']} of {math.prod(grid)} programs called _pdl_start")
        state.update(kernel=None, phase=None)

    def program(self, x, y, z):  # a program begins
        if state["kernel"] is not None:
            if not state["waited"]:
                fail("a program ended without waiting")
            state.update(phase="fresh", waited=False)
        return program.original(self, x, y, z)

    def start():
        if state["phase"] == "fresh":
            state["phase"], state["programs"] = "started", state["programs"] + 1

    def wait():
        if state["phase"] == "fresh":
            fail("waited before _pdl_start")
        state["phase"], state["waited"] = "waited", True

    def load(self, ptrs, mask, other, *rest):
        if state["phase"] == "fresh":
            fail("read before _pdl_start")
        elif state["phase"] == "started":
            addresses = np.asarray(ptrs.data).astype(np.uint64)
            addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
            weight = np.zeros(addresses.shape, dtype=bool)
            for first, end in state["weights"]:
                weight |= (addresses >= first) & (addresses < end)
            if not weight.all():
                fail("read something other than a weight before waiting")
        return load.original(self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        if state["kernel"] is not None and state["phase"] != "waited":
            fail("wrote before waiting")
        return store.original(self, ptrs, value, mask, *rest)

    call.original, program.original = executor.__call__, builder.set_grid_idx
    load.original, store.original = builder.create_masked_load, builder.create_masked_store
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(executor, "__call__", call)
        patch.setattr(builder, "set_grid_idx", program)
        patch.setattr(builder, "create_masked_load", load)
        patch.setattr(builder, "create_masked_store", store)
        patch.setattr(nf4_dequant, "pdl", lambda t: True)
        patch.setattr(nf4_dequant, "gdc_launch_dependents", start)
        patch.setattr(nf4_dequant, "gdc_wait", wait)
        yield launched
    assert not broken, sorted(set(broken))[:5]
