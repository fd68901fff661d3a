"""The model on CUDA, against transformers on the same device; NF4, its kernels and decoding on CUDA (skipped
without a GPU; training: tests/test_gpu_training.py)."""
import pytest
import torch
from hf_models import write_hf

import bailong
from bailong.generation import Sampling, generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)


@pytest.mark.parametrize("kind", ["mha", "gqa", "tied"])
def test_bfloat16_logits_match_transformers_on_cuda(tmp_path, kind):
    from transformers import LlamaForCausalLM
    folder, _ = write_hf(tmp_path, kind)
    model, _ = bailong.load(folder)  # cuda and bfloat16 by default
    assert model.lm_head.weight.is_cuda and model.lm_head.weight.dtype == torch.bfloat16
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 300, (2, 64), device="cuda")
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    assert (ours - theirs).norm() / theirs.norm() < 1e-2  # bf16 rounding of different kernels


def test_cuda_decoding_with_cache_equals_without(tmp_path):
    folder, _ = write_hf(tmp_path, "gqa")
    model, _ = bailong.load(folder, dtype=torch.float32)
    prompt = list(range(3, 20))
    from test_generate import without_cache
    assert generate(model, prompt, 40, GREEDY, stop_ids=[]) == without_cache(model, prompt, 40, GREEDY)


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, True), (64, False)])
def test_nf4_quantize_on_cuda_writes_the_cpu_bits(blocksize, double_quant):
    from bailong.nf4 import quantize
    torch.manual_seed(0)
    for shape in [(4096, 4096), (11008, 4096), (33, 65)]:
        w = (torch.randn(shape) * 0.02).bfloat16()
        on_cpu, on_cuda = quantize(w, blocksize, double_quant), quantize(w.cuda(), blocksize, double_quant)
        for name, t in on_cuda.tensors().items():
            assert torch.equal(t.cpu(), on_cpu.tensors()[name]), (shape, name)
        assert torch.equal(on_cuda.dequantize().cpu(), on_cpu.dequantize())


def test_nf4_reads_what_bitsandbytes_writes_on_cuda():
    bnb = pytest.importorskip("bitsandbytes.functional")
    from bailong.nf4 import NF4Tensor
    for shape, double_quant in [((4096, 11008), True), ((64, 96), True), ((33, 65), False)]:
        w = (torch.randn(shape, device="cuda") * 0.02).bfloat16()
        packed, state = bnb.quantize_4bit(w, compress_statistics=double_quant, quant_type="nf4")
        saved = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        assert torch.equal(NF4Tensor.from_bnb_dict(saved).dequantize(), bnb.dequantize_4bit(packed, state))


@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("M", [1, 4, 8, 16, 512])
def test_nf4_matmul_kernels_in_bfloat16_at_llama_shapes(M, N, K, monkeypatch):
    from bailong.nf4 import quantize
    from bailong_kernels import nf4_gemv as g, nf4_matmul as m
    torch.manual_seed(M)
    q = quantize((torch.randn(N, K, device="cuda") * 0.02).bfloat16())
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = m.nf4_matmul(x, q)  # the GEMV kernel up to GEMV_MAX_M rows, else dequantize + cuBLAS
    dy = torch.randn_like(y)
    y.backward(dy)
    w = q.dequantize(torch.float32)
    results = [(y, x.detach().float() @ w.T), (x.grad, dy.float() @ w)]
    if M <= 16:  # and every tile the benchmark tries (both loops; the at-end loop's codes by shuffles, and not)
        tiles = {tile: g.gemv(x.detach(), q, tile) for tile in g.gemv_tiles(M)}
        results += [(y, results[0][1]) for y in tiles.values()]
        monkeypatch.setattr(g, "SHUFFLES", False)
        for tile in [t for t in tiles if t[3]]:  # the same arithmetic on the same codes, value by value
            loaded = g.gemv(x.detach(), q, tile)
            torch.testing.assert_close(tiles[tile], loaded, msg=f"{tile}: shuffled codes against loaded ones")
            results.append((loaded, results[0][1]))
    for ours, ref in results:
        assert ours.dtype == torch.bfloat16
        assert ((ours.float() - ref).norm() / ref.norm()).item() < 1e-2  # bf16 operands and output


@pytest.mark.parametrize("M", [1, 2, 4])
def test_dense_gemv_in_bfloat16_at_llama_shapes(M):
    """The GEMV's dense loop on bf16 weights (the fused decoding step of a bf16 model, the head): every tile the
    benchmark tries, q, k, v in one launch, gate and up with SwiGLU, the residual added; value by value against
    float32 on the same bits, to a bf16 rounding (and a thousandth of the largest output)."""
    import torch.nn.functional as F

    from bailong_kernels import dense_gemv as d, nf4_gemv as g
    torch.manual_seed(M)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    ws = {n: (torch.randn(n, 4096, device="cuda") * 0.02).bfloat16() for n in (4096, 1024, 11008, 32000)}
    up = (torch.randn(11008, 4096, device="cuda") * 0.02).bfloat16()
    ref = {n: x.float() @ w.float().T for n, w in ws.items()}
    pairs = [(g.gemv(x, w, tile), ref[n]) for n, w in ws.items() for tile in d.dense_tiles(M) + [None]]
    pairs += list(zip(g.gemv_group(x, [ws[4096], ws[1024], ws[1024]]), [ref[4096], ref[1024], ref[1024]]))
    pairs.append((g.gemv_swiglu(x, ws[11008], up), F.silu(ref[11008]) * (x.float() @ up.float().T)))
    for ours, expected in pairs:
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), expected, rtol=2e-2, atol=1e-3 * expected.abs().max().item())
    # with the residual: the product rounded to bf16 first, as F.linear's is, then the sum; where the residual
    # cancels the product the first rounding (up to a bf16 ulp of the product, 2^-7 of it) is what is left
    residual = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    expected = residual.float() + ref[4096]
    bound = 2e-2 * expected.abs() + 1e-3 * expected.abs().max() + 2 ** -7 * ref[4096].abs()
    assert ((g.gemv(x, ws[4096], residual=residual).float() - expected).abs() <= bound).all()


@pytest.mark.parametrize("M", [1, 2, 4])
def test_projections_in_one_launch_in_bfloat16_at_llama_shapes(M):
    """q, k, v (GQA widths) in one launch, gate, up with SwiGLU in one, o with the residual added, against float32
    on the same bits."""
    import torch.nn.functional as F

    from bailong.nf4 import quantize
    from bailong_kernels import nf4_gemv as m
    torch.manual_seed(M)
    qkv = [quantize((torch.randn(n, 4096, device="cuda") * 0.02).bfloat16()) for n in (4096, 1024, 1024)]
    gate, up = (quantize((torch.randn(11008, 4096, device="cuda") * 0.02).bfloat16()) for _ in range(2))
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    for tile in [None, (1, 1024, 1, True), (2, 1024, 1, True), (2, 2048, 2, True)]:
        pairs = list(zip(m.gemv_group(x, qkv, tile), [x.float() @ w.dequantize(torch.float32).T for w in qkv]))
        pairs.append((m.gemv_swiglu(x, gate, up, tile), F.silu(x.float() @ gate.dequantize(torch.float32).T)
                      * (x.float() @ up.dequantize(torch.float32).T)))
        residual = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
        pairs.append((m.gemv(x, qkv[0], tile, residual=residual), residual.float() + pairs[0][1]))
        for ours, ref in pairs:
            assert ours.dtype == torch.bfloat16
            assert ((ours.float() - ref).norm() / ref.norm()).item() < 1e-2, tile


@pytest.mark.parametrize("by_words", [False, True])
def test_nf4_dequantize_kernel_exact_in_bfloat16(by_words):
    """Both kernels give the reference's bits on the GPU, in bf16 (which the interpreter rounds otherwise) and
    the other dtypes, with and without double quantization, a partial last program; q, k and v in one launch."""
    from bailong.nf4 import quantize
    from bailong_kernels.nf4_dequant import nf4_dequantize, nf4_dequantize_group
    for shape, blocksize, double_quant in [((4096, 11008), 64, True), ((35, 104), 64, True), ((96, 256), 128, False)]:
        q = quantize(torch.randn(*shape, device="cuda").bfloat16(), blocksize, double_quant)
        for dtype in [torch.bfloat16, torch.float16, torch.float32]:
            assert torch.equal(nf4_dequantize(q, dtype, by_words=by_words), q.dequantize(dtype)), (shape, dtype)
    qkv = [quantize(torch.randn(n, 4096, device="cuda").bfloat16()) for n in (4096, 1024, 1024)]
    assert torch.equal(nf4_dequantize_group(qkv, torch.bfloat16, by_words=by_words).view(-1, 4096),
                       torch.cat([q.dequantize(torch.bfloat16) for q in qkv]))


def test_quantized_model_runs_the_kernels_on_cuda(tmp_path):
    import bailong_kernels
    from hf_models import write_hf
    folder, _ = write_hf(tmp_path, "gqa", hidden_size=128, intermediate_size=192, num_attention_heads=4,
                         num_key_value_heads=2)
    model, _ = bailong.load(folder, quantize="nf4")  # bf16 on cuda
    ids = torch.randint(0, 300, (2, 40), device="cuda")
    with torch.no_grad():
        fused = model(ids).float()  # the kernels are on by default
        previous = bailong_kernels.use_kernels(False)
        try:
            reference = model(ids).float()
        finally:
            bailong_kernels.use_kernels(previous)
    assert ((fused - reference).norm() / reference.norm()).item() < 1e-2
    from bailong.quantized import nf4_linear
    x = torch.randn(3, 128, device="cuda")  # float32 under bf16 autocast: computed in bf16, as F.linear is
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert nf4_linear(x, model.model.layers[0].mlp.up_proj.weight).dtype == torch.bfloat16


def test_cuda_graph_decoding_equals_eager_and_is_reused(tmp_path, monkeypatch):
    from bailong import generation
    from bailong.generation import _decoders
    monkeypatch.setattr(generation, "WINDOW", 16)  # steps cross windows, each its own graph
    folder, _ = write_hf(tmp_path, "gqa")
    model, _ = bailong.load(folder, dtype=torch.float32)
    model.eval()
    prompt = list(range(3, 20))
    eager = generate(model, prompt, 40, GREEDY, stop_ids=[], cuda_graph=False)
    assert generate(model, prompt, 40, GREEDY, stop_ids=[], cuda_graph=True) == eager
    first = _decoders[model]
    assert set(first.graphs) == {32, 64}  # 17 + 40 positions: the windows the steps reached
    assert generate(model, prompt[:5], 40, GREEDY, stop_ids=[]) == \
        generate(model, prompt[:5], 40, GREEDY, stop_ids=[], cuda_graph=False)
    assert _decoders[model] is first  # a shorter conversation replays the same graphs (and captures one more)
    assert set(first.graphs) == {16, 32, 64}
    from bailong.quantized import quantize_model
    quantize_model(model)  # new weights: the old graph must not be replayed
    assert generate(model, prompt, 40, GREEDY, stop_ids=[]) == \
        generate(model, prompt, 40, GREEDY, stop_ids=[], cuda_graph=False)
    assert _decoders[model] is not first


@pytest.mark.parametrize("p", [0, 100, 4095])
def test_fused_decode_kernels_in_bfloat16_at_llama_shapes(p):
    import torch.nn.functional as F

    from bailong.config import preset
    from bailong.model import RMSNorm, apply_rope, rope_cos_sin
    from bailong_kernels.decode import decode_attention, rms_norm, swiglu
    torch.manual_seed(p)
    bf16, close = torch.bfloat16, lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    norm = RMSNorm(4096, 1e-5).to("cuda", bf16)
    x = torch.randn(1, 1, 4096, device="cuda", dtype=bf16)
    with torch.no_grad():
        assert close(rms_norm(x, norm.weight, 1e-5), norm(x))
    gate, up = torch.randn(2, 11008, device="cuda", dtype=bf16), torch.randn(2, 11008, device="cuda", dtype=bf16)
    assert close(swiglu(gate, up), F.silu(gate) * up)
    config = preset("llama2-7b")
    H, KV, D, S = 32, 8, 128, 4096  # grouped-query attention, as Llama-2-70B and Llama 3
    k_cache, v_cache = (torch.randn(1, KV, S, D, device="cuda", dtype=bf16) for _ in range(2))
    q, k, v = (torch.randn(1, 1, n * D, device="cuda", dtype=bf16) for n in (H, KV, KV))
    positions = torch.tensor([p], device="cuda")
    cos, sin = rope_cos_sin(config, positions, bf16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_ref[:, :, p] = apply_rope(k.view(1, 1, KV, D).transpose(1, 2), cos, sin)[:, :, 0]
    v_ref[:, :, p] = v.view(1, KV, D)
    q_ref = apply_rope(q.view(1, 1, H, D).transpose(1, 2), cos, sin)
    ref = F.scaled_dot_product_attention(q_ref, k_ref[:, :, :p + 1], v_ref[:, :, :p + 1], enable_gqa=True)
    y = decode_attention(q, k, v, cos, sin, positions, k_cache, v_cache)
    assert close(y, ref.transpose(1, 2).reshape(1, 1, -1))
    assert close(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("quantize", ["nf4", None])  # NF4 projections, or float16 ones (the GEMV's dense loop)
def test_cuda_graph_with_the_fused_step_decodes_as_without_and_is_recaptured(tmp_path, quantize):
    import bailong_kernels
    from bailong.generation import _decoders
    folder, _ = write_hf(tmp_path, "gqa")
    model, _ = bailong.load(folder, dtype=torch.float32 if quantize else torch.float16, quantize=quantize)
    model.eval()
    # a prompt whose greedy path has no near-tie: the two paths round float16 apart, and from range(3, 20) its top
    # two logits came within 0.002 (4 units of float16's last place); from here within 0.03 at the least (0.024
    # for the float32 NF4 model), computed on the CPU
    prompt = list(range(200, 217))
    previous = bailong_kernels.use_decode_kernels(False)  # the unfused step first (the fused one is the default)
    try:
        plain = generate(model, prompt, 40, GREEDY, stop_ids=[])
        first = _decoders[model]
        bailong_kernels.use_decode_kernels(True)
        assert generate(model, prompt, 40, GREEDY, stop_ids=[]) == plain
        assert _decoders[model] is not first  # the switch changed: the graph is captured again
        assert generate(model, prompt, 40, GREEDY, stop_ids=[], cuda_graph=False) == plain
    finally:
        bailong_kernels.use_decode_kernels(previous)


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_programmatic_dependent_launch_decodes_the_same_bits(tmp_path, quantize, monkeypatch):
    """With PDL (Hopper and later) each kernel of the fused step starts while the one before ends and reads its
    first weights early: the logits of 40 steps replayed from a CUDA graph are the same bits as without, with
    the GEMV at many programs (hidden 1024, MLP 2816)."""
    import bailong_kernels
    from bailong.generation import GraphDecoder
    from bailong_kernels import nf4_dequant
    if not nf4_dequant.pdl_possible(torch.empty(1, device="cuda")):
        pytest.skip("programmatic dependent launch needs an NVIDIA GPU of the Hopper generation or later, Triton 3.5+")
    launched = []  # the launches that used PDL: none would make the two runs trivially alike
    pdl = nf4_dequant.pdl
    monkeypatch.setattr(nf4_dequant, "pdl", lambda t: launched.append(pdl(t)) or launched[-1])
    folder, _ = write_hf(tmp_path, "gqa", hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                         num_key_value_heads=4)
    model, _ = bailong.load(folder, dtype=torch.bfloat16, quantize=quantize)
    model.eval()
    runs = []
    for on in (False, True):
        previous = bailong_kernels.use_pdl(on)
        try:
            decoder = GraphDecoder(model, 64)
            with torch.inference_mode():
                logits = [decoder.prefill(torch.tensor([list(range(3, 20))], device="cuda")).clone()]
                for _ in range(40):  # (a step's logits live in the graphs' memory until the next step)
                    logits.append(decoder.step(logits[-1].argmax(-1)).clone())
            assert decoder.graphs
            runs.append(torch.stack(logits))
        finally:
            bailong_kernels.use_pdl(previous)
        assert any(launched) == on
        launched.clear()
    assert torch.equal(*runs)


def test_sampling_on_cuda_is_reproducible_and_a_batch_decodes_as_each_sequence(tmp_path):
    from bailong.generation import GraphDecoder, Sampling
    folder, _ = write_hf(tmp_path, "gqa")
    model, _ = bailong.load(folder, dtype=torch.float32, quantize="nf4")
    model.eval()
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=5)
    sampled = generate(model, [1, 5, 9], 40, s, stop_ids=[])
    assert generate(model, [1, 5, 9], 40, s, stop_ids=[]) == sampled  # the replayed graph
    assert generate(model, [1, 5, 9], 40, s, stop_ids=[], cuda_graph=False) == sampled
    prompts = [list(range(3, 20)), list(range(30, 47))]
    expected = [generate(model, p, 12, GREEDY, stop_ids=[]) for p in prompts]
    decoder = GraphDecoder(model, 64, batch=2)
    with torch.inference_mode():
        logits, ids = decoder.prefill(torch.tensor(prompts, device="cuda")), []
        for _ in range(12):
            ids.append(logits.argmax(-1))
            logits = decoder.step(ids[-1])
    assert decoder.graphs and torch.stack(ids, 1).tolist() == expected
