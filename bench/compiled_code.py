"""Reading what Triton compiled for an NVIDIA GPU, on a machine without one: a driver that only compiles
(``CompileOnly``), and readers of the compiled code (the cubin through the bundled cuobjdump, the PTX, the
TTGIR). bench/check_kernels_compile.py and bench/bench_host.py use them."""
import os
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def require_nvidia_tools():
    """Exit with one line where this Triton build has no NVIDIA backend tools (ptxas, cuobjdump)."""
    if not CUOBJDUMP.exists():
        sys.exit(f"{CUOBJDUMP}: missing; this Triton build has no NVIDIA backend tools")


class CompileOnly:
    """What Triton asks of the CUDA driver before it launches: enough to compile, nothing to run."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What ``cuobjdump flag`` prints for a cubin."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"check_kernels_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        return subprocess.run([str(CUOBJDUMP), flag, str(path)], capture_output=True, text=True, check=True).stdout
    finally:
        path.unlink()


def resources(cubin: bytes):
    """(registers, stack bytes per thread: spills) from cuobjdump's resource usage of a cubin."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)  # spilled registers live on the stack
    return int(regs.group(1)), int(stack.group(1))


def pdl_order(ptx: str, expected: int) -> str:
    """For a kernel compiled with programmatic dependent launch: the global loads its PTX makes before its first
    wait (``_pdl_wait``), against the ``expected`` count, and any store before it (none may be). The first wait only:
    the q/k/v kernel's other branches (the same code for another weight) each have their own, later in the
    text, after stores of the branches before."""
    if "griddepcontrol.wait" not in ptx or "griddepcontrol.launch_dependents" not in ptx:
        return "NO WAIT"
    before = ptx[:ptx.index("griddepcontrol.wait")]
    loads, stores = len(re.findall(r"\bld\.global", before)), len(re.findall(r"\bst\.global", before))
    return f"{loads} loads, then the wait" + (f"; {stores} STORES" if stores else "") + \
        ("" if loads == expected else f"; NOT THE {expected} EXPECTED")


def instructions(cubin: bytes) -> int:
    """SASS instructions of a kernel without loops, NOPs left out."""
    return len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?!NOP)[^;]*;", cuobjdump(cubin, "-sass")))


def loop_bodies(cubin: bytes) -> list[list[str]]:
    """The SASS instructions in the body of each of the kernel's loops (a branch back to an earlier address)."""
    sass = cuobjdump(cubin, "-sass")
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(target, 16), int(at, 16)) for at, target in
             re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", sass)]
    return [[op for a, op in code if start <= a <= end] for start, end in loops if start < end]


def tables_stay_in_their_lanes(ttgir: str) -> bool:
    """Whether every shuffle of the GEMV (``_code``) gets its table straight from the %laneid it was made from:
    a layout conversion on the way would move values to other lanes, and the shuffles would copy wrong codes
    without any error. Walks the TTGIR back from each shuffle's table operand to the %laneid; True if it gets
    there every time without a ``ttg.convert_layout``."""
    defs = {}  # value -> (its operation's name, its operands, the whole line)
    for line in ttgir.splitlines():
        if m := re.match(r"\s*(%[\w.]+)(?::\d+)? = ([\w.]+)(.*)$", line):
            bare = re.sub(r"\{[^{}]*\}", "", re.sub(r'"[^"]*"', "", m.group(3))).split(" : ")[0]  # no strings
            defs[m.group(1)] = (m.group(2), [v.split("#")[0] for v in re.findall(r"%[\w.#]+", bare)], line)

    def reaches_lane(value, seen):
        op, operands, line = defs.get(value, ("", [], ""))
        if "%laneid" in line:
            return True
        if not op or op == "ttg.convert_layout" or value in seen:
            return False
        seen.add(value)
        return any(reaches_lane(v, seen) for v in operands)
    tables = [operands[0] for _, operands, line in defs.values() if "shfl.sync" in line]
    return bool(tables) and all(reaches_lane(t, set()) for t in tables)
