"""NF4 quantization against bitsandbytes on the CPU: the same bytes, the same values."""
import itertools
import json
import re

import pytest
import torch

from bailong.errors import BailongError
from bailong.nf4 import BLOCKSIZES, NF4_CODE, NF4Tensor, dynamic_code, quantize

pytest.importorskip("bitsandbytes", reason="bitsandbytes, the oracle (requirements-test.txt), is not installed")
import bitsandbytes.functional as bnb  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402


def bnb_dequantize(packed, state, dtype=None):
    """bitsandbytes' own PyTorch dequantization.

    Its CPU library (0.50) expands blocks per row, which is wrong when a row's
    length is not a multiple of the blocksize (blocks are cut from the flattened
    weight); its PyTorch backend, like its CUDA kernel, is right, so that is the
    oracle for values. Where rows are whole blocks the two agree (checked below).
    """
    absmax = state.absmax
    if state.nested:
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.view(-1), absmax, state.code, state.blocksize, state.shape,
                                    dtype or state.dtype).view(state.shape)


def same(a, b):
    """Equal tensors, a NaN equal to a NaN (a weight that is not finite)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a.float(), b.float(), 0, 0, equal_nan=True)


def check_same_as_bnb(w, blocksize, double_quant):
    packed, state = bnb.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    q = quantize(w, blocksize, double_quant)
    assert same(q.data, packed) and same(q.absmax, state.absmax)
    assert same(q.quant_map, state.code) and q.dtype == w.dtype and q.shape == w.shape
    if double_quant:
        assert same(q.offset, state.offset) and same(q.nested_absmax, state.state2.absmax)
        assert same(q.nested_quant_map, state.state2.code)
    for dtype in [None, torch.float32, torch.bfloat16, torch.float16]:
        assert same(q.dequantize(dtype), bnb_dequantize(packed, state, dtype))
    if w.dim() == 2 and w.shape[1] % blocksize == 0:  # where bitsandbytes' CPU library is right
        assert same(q.dequantize(), bnb.dequantize_4bit(packed, state))
    return q


def test_code_tables_match_bitsandbytes_and_the_normal_quantiles():
    assert torch.equal(NF4_CODE, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_code(signed=False), bnb.create_dynamic_map(signed=False))  # 8-bit AdamW's second
    d = (1 / 32 + 1 / 30) / 2
    positive = torch.special.ndtri(torch.linspace(1 - d, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(1 - d, 0.5, 8, dtype=torch.float64)[:-1])
    table = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(table / table.max(), NF4_CODE.double(), atol=2e-7, rtol=0)


SHAPES = [(1,), (7,), (3, 5), (64, 64), (33, 64), (64, 96), (1, 4097), (130, 257)]


@pytest.mark.parametrize("blocksize,double_quant", list(itertools.product(BLOCKSIZES, [False, True])))
def test_random_weights_of_many_shapes(blocksize, double_quant):
    torch.manual_seed(blocksize + double_quant)
    for shape, dtype in itertools.product(SHAPES, [torch.float32, torch.bfloat16, torch.float16]):
        check_same_as_bnb(torch.randn(shape).to(dtype), blocksize, double_quant)
    check_same_as_bnb(torch.randn(300, 1000) * 0.02, blocksize, double_quant)  # many nested blocks


@pytest.mark.parametrize("double_quant", [False, True])
def test_special_values(double_quant):
    torch.manual_seed(0)
    w = torch.randn(40, 64)
    w[3:5] = 0  # whole blocks of zeros
    w[7, :10] = 0
    check_same_as_bnb(w, 64, double_quant)
    check_same_as_bnb(torch.zeros(10, 64), 64, double_quant)
    check_same_as_bnb(torch.zeros(3, 7), 64, double_quant)  # a short block of zeros
    # values exactly on the midpoints between codes, and on the codes: ties go to the lower code
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    on = torch.cat([midpoints, NF4_CODE, -midpoints, torch.ones(1)]).repeat(64)[:64 * 12].view(12, 64)
    q = check_same_as_bnb(on, 64, double_quant)
    if not double_quant:
        codes = torch.stack([q.data.view(-1) >> 4, q.data.view(-1) & 15], 1).view(-1)[:15]
        assert codes.tolist() == list(range(15))  # midpoint k lies between codes k and k+1
    for scale in [1e-30, 1e-8, 1e8, 1e30]:
        check_same_as_bnb(torch.randn(10, 70) * scale, 64, double_quant)
    check_same_as_bnb((torch.randn(16, 64).clamp(-4, 4) * 16000).half(), 64, double_quant)  # near fp16 max
    for bad in (float("nan"), float("inf"), -float("inf")):  # garbage either way, but bitsandbytes' garbage:
        w = torch.randn(4, 768)  # the block maximum of the double quantization skips NaN
        w[1, 3] = bad
        check_same_as_bnb(w, 64, double_quant)


def test_error_is_what_nf4_allows():
    torch.manual_seed(0)
    w = torch.randn(1024, 4096)
    absmax = w.view(-1, 64).abs().amax(1)
    for double_quant, bound, bits in [(False, 0.152, 4.5), (True, 0.16, 4.127)]:
        q = quantize(w, double_quant=double_quant)
        err = (q.dequantize() - w).abs()
        # the widest gap between NF4 codes is 0.304 (next to -1), so an error reaches at most half
        # of it times the block's absmax; double quantization rounds the absmax too
        assert (err.view(-1, 64).amax(1) <= bound * absmax).all()
        assert 0.07 < err.mean() < 0.075
        assert q.nbytes * 8 / w.numel() == pytest.approx(bits, abs=0.003)  # the bit budget, tables included


def test_bnb_dict_round_trip_and_format():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    q = quantize(w)
    d = q.to_bnb_dict("model.layers.0.mlp.down_proj.")
    assert sorted(d) == ["model.layers.0.mlp.down_proj.weight" + s for s in
                         ["", ".absmax", ".nested_absmax", ".nested_quant_map", ".quant_map",
                          ".quant_state.bitsandbytes__nf4"]]
    state = json.loads(bytes(d["model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert state == {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 96],
                     "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": q.offset.item()}
    back = NF4Tensor.from_bnb_dict(d, "model.layers.0.mlp.down_proj.")
    assert torch.equal(back.dequantize(), q.dequantize()) and back.double_quant
    # and bitsandbytes reads it back to the same values
    packed_state = {k.removeprefix("model.layers.0.mlp.down_proj.weight."): v for k, v in d.items()
                    if k != "model.layers.0.mlp.down_proj.weight"}
    state = bnb.QuantState.from_dict(packed_state, device="cpu")
    assert torch.equal(bnb_dequantize(d["model.layers.0.mlp.down_proj.weight"], state), q.dequantize())


def _state(d, **change):
    """``d`` with its quant_state's JSON changed."""
    key = "w.weight.quant_state.bitsandbytes__nf4"
    state = {**json.loads(bytes(d[key].tolist())), **change}
    d[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("w.weight.absmax"), "missing absmax"),
    (lambda d: d.update({"w.weight.absmax": d["w.weight.absmax"][:-1]}), "absmax is uint8 [127]"),
    (lambda d: d.update({"w.weight": d["w.weight"][:-2]}), "weight is uint8 [4094, 1]"),
    (lambda d: d.update({"w.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"),
                                                                              dtype=torch.uint8)}),
     "unreadable quant_state"),
    (lambda d: d.update({"w.weight.quant_state.bitsandbytes__fp4": d.pop("w.weight.quant_state.bitsandbytes__nf4")}),
     "quant_state fp4 is not supported"),
    (lambda d: d.pop("w.weight.quant_state.bitsandbytes__nf4"), "w.weight: missing quant_state"),
    (lambda d: _state(d, nested_offset="abc"), "unreadable quant_state (ValueError: could not convert"),
    (lambda d: _state(d, nested_offset=None), "unreadable quant_state (TypeError: "),
    (lambda d: _state(d, nested_offset="nan"), "quant_state has nested_offset nan"),
    (lambda d: _state(d, nested_blocksize="256"), "nested_blocksize '256' is not supported"),
    (lambda d: _state(d, dtype="int8"), "quant_state has blocksize 64 and dtype 'int8'"),
])
def test_inconsistent_quant_state_is_an_error(change, message):
    d = quantize(torch.randn(64, 128)).to_bnb_dict("w.")
    change(d)
    with pytest.raises(BailongError, match=re.escape(message)):
        NF4Tensor.from_bnb_dict(d, "w.", source="ckpt")


def test_rejects_what_cannot_be_quantized():
    with pytest.raises(ValueError, match="blocksize"):
        quantize(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="float"):
        quantize(torch.ones(64, dtype=torch.int32))
