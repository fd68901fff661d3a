"""4-bit NormalFloat (NF4) quantization with double quantization, in plain PyTorch.

The same bits as bitsandbytes (checked against ``quantize_4bit`` / ``dequantize_4bit``
on the CPU), so checkpoints move between this project and the rest of the
ecosystem. This file is the reference the Triton kernels are tested against.

The code table
--------------
QLoRA's NF4 stores each weight as one of 16 values that are quantiles of
N(0, 1), scaled into [-1, 1]: the levels are dense where normally distributed
weights are dense. (That is the design; rounding each weight to the nearest
level, a block scaled by its absmax, does not use them equally: of 4 million
N(0, 1) weights in blocks of 64, 1.7-1.9% take 1 or -1, and from 8.1% to 9.3%
each of the three levels nearest 0.) To keep an exact zero the table is
asymmetric, 8 positive and 7 negative levels plus 0:

    positive: Phi^-1(p) for p = linspace(1 - d, 1/2, 9)[:-1]     (8 values)
    negative: -Phi^-1(p) for p = linspace(1 - d, 1/2, 8)[:-1]    (7 values)
    table = sorted(positive + negative + [0]) / max                with d = (1/32 + 1/30) / 2

(d is the mean of 1/32 and 1/30, half the quantile spacings of 16 and 15 levels,
so that the extreme codes do not sit at Phi^-1(1) = inf). ``NF4_CODE`` holds the
values exactly as bitsandbytes hard-codes them; tests re-derive them with ``ndtri``.

Blockwise quantization
----------------------
The flattened weight is cut into blocks of ``blocksize`` (default 64) values.
Each block stores its absolute maximum (absmax, float32) and each value becomes
the index of the nearest code to ``value / absmax``, found against the midpoints
between codes (a value exactly on a midpoint takes the lower code). Two indices
share a byte, the first in the high nibble.

Double quantization
-------------------
The fp32 absmax per 64 weights costs 0.5 bit per weight, so QLoRA quantizes it
again: subtract its mean (the offset, positive since absmax is), then store each
in 8 bits with bitsandbytes' signed "dynamic" code (a float-like table, dense
near 0), in blocks of 256 with one fp32 absmax each. The bit budget per weight:

    4                  the NF4 index
    + 8 / 64           the 8-bit absmax code, one per block of 64
    + 32 / (64 * 256)  the fp32 absmax of each block of 256 absmax codes
    = 4.127 bits       (plus one fp32 offset and two small tables per matrix)

instead of 4.5 without double quantization, and 16 in bfloat16.
"""
import functools
import json
import math
from dataclasses import dataclass, replace

import torch

from bailong.errors import BailongError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def dynamic_code(signed=True) -> torch.Tensor:
    """bitsandbytes' 8-bit "dynamic" code (256 values), built the same way.

    For exponent e = 0..6 it places 2**e evenly spaced fractions in [0.1, 1], scaled
    by 10**(e - 6), on both signs; with 0 and 1 that makes 256 values in [-1, 1],
    dense near 0. Unsigned, the sign's bit goes to the fractions instead (2**(e + 1)
    of them, all in [0, 1]): the code of values that are never negative.
    """
    data = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, (2 ** e if signed else 2 ** (e + 1)) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (e - 6) * means).tolist() + ((-(10 ** (e - 6)) * means).tolist() if signed else [])
    return torch.tensor(sorted(data + [0, 1.0]), dtype=torch.float32)


@functools.cache
def _dynamic_lut(device) -> torch.Tensor:
    """The dynamic code's index for each of 65,536 evenly spaced values in [-1, 1].

    bitsandbytes' CPU quantizer finds the nearest 8-bit code through this table
    rather than by search: value v maps to bin trunc(((v + 1) * 0.5) * 65535 + 0.5),
    and the bin to the number of code midpoints below its centre. A bin is 3e-5
    wide, but near 0 the dynamic code's levels lie 5.5e-7 apart, so a bin there
    spans several midpoints and its values may land a few codes from the nearest (of
    a million values drawn evenly from [-1, 1], about 1,000, by up to 4 codes); we
    follow it bit for bit so that our absmax codes equal those bitsandbytes writes
    on the CPU (its CUDA kernel takes the exact nearest code: docs/BENCHMARKS.md
    compares).
    """
    code = dynamic_code()
    midpoints = 0.5 * (code[:-1] + code[1:])
    centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    return torch.searchsorted(midpoints, centres, right=False).to(torch.uint8).to(device)


def quantize_8bit(x, blocksize=NESTED_BLOCKSIZE):
    """Blockwise 8-bit quantization of a 1-D float32 tensor with the dynamic code:
    (uint8 codes, float32 absmax per block)."""
    n = x.numel()
    padded = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().nan_to_num(0.0, posinf=torch.inf).amax(dim=1)  # (blocks,); NaN skipped, as bitsandbytes
    scaled = (padded * (1.0 / absmax)[:, None]).clamp(-1, 1)  # reciprocal, then multiply
    bins = ((scaled + 1.0) * 0.5 * 65535 + 0.5).to(torch.int64)  # truncates, as a C cast does
    q = torch.where(absmax[:, None] == 0, 0, _dynamic_lut(x.device)[bins.clamp(0, 65535)])
    return q.reshape(-1)[:n], absmax


@dataclass
class NF4Tensor:
    """A weight in NF4: packed 4-bit codes plus what it takes to expand them again.

    Field names follow what bitsandbytes serializes next to a quantized weight.
    With double quantization ``absmax`` holds uint8 codes and the nested fields are set.
    """
    data: torch.Tensor  # uint8 ((n + 1) // 2, 1): two codes a byte, first in the high nibble
    absmax: torch.Tensor  # float32 (blocks,), or uint8 (blocks,) when double-quantized
    shape: torch.Size  # of the original weight, (out_features, in_features)
    dtype: torch.dtype  # of the original weight: what dequantize() returns by default
    blocksize: int = 64
    quant_map: torch.Tensor = None  # float32 (16,): the code table
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(blocks / 256),)
    nested_quant_map: torch.Tensor | None = None  # float32 (256,)
    offset: torch.Tensor | None = None  # float32 scalar: mean absmax, subtracted before 8-bit coding

    def __post_init__(self):  # the kernels read each tensor as one flat array: a strided view would read others'
        for name, t in self.tensors().items():  # bytes (a view of a state dict's, say); free where already whole
            setattr(self, name, t.contiguous())

    @property
    def double_quant(self):
        return self.nested_absmax is not None

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        """Bytes of everything stored for this weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict:
        names = ["data", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset"]
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def to(self, device) -> "NF4Tensor":
        return replace(self, **{k: t.to(device) for k, t in self.tensors().items()})

    def block_absmax(self) -> torch.Tensor:
        """float32 absmax of every block, expanding the 8-bit codes if double-quantized."""
        if not self.double_quant:
            return self.absmax
        blocks = self.absmax.numel()
        scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:blocks]
        return self.nested_quant_map[self.absmax.long()] * scale + self.offset  # two roundings, as bnb

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight as ``dtype`` (default: its original dtype): code[index] * absmax of its block."""
        n, bs = self.numel, self.blocksize
        values = torch.index_select(code_pairs(self.quant_map), 0, self.data.view(-1).int()).view(-1)[:n]  # (n,)
        if n % bs:
            values = torch.nn.functional.pad(values, (0, -n % bs))
        values = values.view(-1, bs).mul_(self.block_absmax()[:, None])  # (blocks, bs)
        return values.view(-1)[:n].view(self.shape).to(dtype or self.dtype)

    def to_bnb_dict(self, prefix="") -> dict:
        """The tensors bitsandbytes (through transformers) saves for a quantized ``{prefix}weight``."""
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                 "shape": list(self.shape)}
        out = {f"{prefix}weight": self.data, f"{prefix}weight.absmax": self.absmax,
               f"{prefix}weight.quant_map": self.quant_map}
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                         nested_offset=self.offset.item())
            out.update({f"{prefix}weight.nested_absmax": self.nested_absmax,
                        f"{prefix}weight.nested_quant_map": self.nested_quant_map})
        packed = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
        out[f"{prefix}weight.quant_state.bitsandbytes__nf4"] = packed
        return out

    @classmethod
    def from_bnb_dict(cls, tensors: dict, prefix="", source="checkpoint") -> "NF4Tensor":
        """Read a quantized weight saved by bitsandbytes, checking that its parts agree."""
        name = f"{prefix}weight"

        def bad(problem):
            return BailongError(f"{source}: {name}: {problem}")

        state_keys = [k for k in tensors if k.startswith(f"{name}.quant_state.")]
        if not state_keys:
            raise bad("missing quant_state")
        if state_keys != [f"{name}.quant_state.bitsandbytes__nf4"]:
            kinds = [k.rsplit("__", 1)[-1] for k in state_keys]
            raise bad(f"quant_state {', '.join(kinds)} is not supported (only nf4)")
        try:
            state = json.loads(bytes(tensors[state_keys[0]].tolist()).decode())
            shape, blocksize, dtype = torch.Size(state["shape"]), int(state["blocksize"]), state["dtype"]
            offset = float(state["nested_offset"]) if "nested_offset" in state else None
        except (ValueError, KeyError, TypeError) as e:
            raise bad(f"unreadable quant_state ({type(e).__name__}: {e})") from None
        if state.get("quant_type") != "nf4":
            raise bad(f"quant_type {state.get('quant_type')!r} is not supported (only nf4)")
        if blocksize not in BLOCKSIZES or dtype not in ("float16", "bfloat16", "float32"):
            raise bad(f"quant_state has blocksize {blocksize} and dtype {dtype!r}")
        if offset is not None and not math.isfinite(offset):
            raise bad(f"quant_state has nested_offset {offset}")
        q = cls(data=tensors.get(name), absmax=tensors.get(f"{name}.absmax"), shape=shape,
                dtype=getattr(torch, dtype), blocksize=blocksize, quant_map=tensors.get(f"{name}.quant_map"))
        n, blocks = q.numel, -(-q.numel // blocksize)
        nested = offset is not None
        if nested:
            if state.get("nested_blocksize") != NESTED_BLOCKSIZE:
                raise bad(f"nested_blocksize {state.get('nested_blocksize')!r} is not supported (only 256)")
            q.offset = torch.tensor(offset, dtype=torch.float32)
            q.nested_absmax = tensors.get(f"{name}.nested_absmax")
            q.nested_quant_map = tensors.get(f"{name}.nested_quant_map")
        expect = {"weight": (q.data, torch.uint8, [(n + 1) // 2, 1]),
                  "absmax": (q.absmax, torch.uint8 if nested else torch.float32, [blocks]),
                  "quant_map": (q.quant_map, torch.float32, [16])}
        if nested:
            expect.update(nested_absmax=(q.nested_absmax, torch.float32, [-(-blocks // NESTED_BLOCKSIZE)]),
                          nested_quant_map=(q.nested_quant_map, torch.float32, [256]))
        for part, (t, dtype_, shape_) in expect.items():
            if t is None:
                raise bad(f"missing {part}")
            if t.dtype != dtype_ or list(t.shape) != shape_:
                raise bad(f"{part} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, but quant_state "
                          f"(shape {list(shape)}, blocksize {blocksize}) implies "
                          f"{str(dtype_).removeprefix('torch.')} {shape_}")
        return q


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def code_pairs(quant_map: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: the codes of the two weights each byte value holds, high nibble first."""
    byte = torch.arange(256, device=quant_map.device)
    return quant_map[torch.stack([byte >> 4, byte & 0xF], dim=1)]


def quantize(weight: torch.Tensor, blocksize=64, double_quant=True) -> NF4Tensor:
    """NF4-quantize a float weight, bit for bit as ``bitsandbytes.functional.quantize_4bit``
    (quant_type="nf4", compress_statistics=double_quant) does on the CPU."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if not weight.is_floating_point():
        raise ValueError(f"only float weights can be quantized, got {weight.dtype}")
    x = weight.detach().reshape(-1).float()
    n = x.numel()
    code = NF4_CODE.to(x.device)
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = torch.linalg.vector_norm(blocks, float("inf"), dim=1)  # (blocks,) max |x|, no temporary
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)  # reciprocal, then multiply
    if full < n:  # bitsandbytes divides in the short last block, and stores its clamped absmax
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, x[full:] / tail_max])
    del x
    scaled = torch.nn.functional.pad(scaled.clamp_(-1, 1), (0, n % 2))  # pad value 0 codes as 7
    midpoints = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)  # x <= midpoint: lower code
    packed = (idx[0::2] << 4 | idx[1::2]).unsqueeze(1)
    q = NF4Tensor(packed, absmax, weight.shape, weight.dtype, blocksize, code.clone())
    if double_quant:
        # the mean on the CPU, whatever the device: a GPU sums in another order, and one
        # ulp of offset can move an absmax code; this way CPU and CUDA write the same bits
        q.offset = absmax.cpu().mean().to(absmax.device)
        q.absmax, q.nested_absmax = quantize_8bit(absmax - q.offset)
        q.nested_quant_map = dynamic_code().to(weight.device)
    return q
