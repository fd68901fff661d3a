"""The generation loop: KV caches, stops, stepping ahead, chat formats, the CUDA-graph decoder."""
import re

import pytest
import torch

import bailong
from bailong.chat_template import fit_prompt, llama2_ids, llama2_turns, training_example
from bailong.generation import Sampling, generate, seen_mask
from bailong.tokenizer import byte_tokenizer
from conftest import asset, needs_triton

GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)


def without_cache(model, prompt, n, sampling):
    """What generate() should give: the whole sequence run again for each new token, no KV cache."""
    from bailong.generation import sample
    device = model.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(sampling.seed) if sampling.seed is not None else None
    ids = torch.tensor([prompt], device=device)
    for _ in range(n):
        with torch.no_grad():
            next_id = sample(model(ids)[:, -1], seen_mask(ids, model.config.vocab_size), sampling, generator)
        ids = torch.cat([ids, next_id[:, None]], dim=1)
    return ids[0, len(prompt):].tolist()


def test_kv_cache_decoding_equals_decoding_without_cache(tiny):
    prompt = list(range(5, 25))
    for s in [GREEDY, Sampling(temperature=1.0, top_k=0, top_p=1.0, seed=3)]:
        with_cache = generate(tiny, prompt, 40, s, stop_ids=[])
        assert with_cache == without_cache(tiny, prompt, 40, s) and len(with_cache) == 40


def test_seeded_sampling_is_reproducible(tiny):
    s = Sampling(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=7)
    first = generate(tiny, [1, 50, 60], 30, s, stop_ids=[])
    assert generate(tiny, [1, 50, 60], 30, s, stop_ids=[]) == first
    other = Sampling(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=8)
    assert generate(tiny, [1, 50, 60], 30, other, stop_ids=[]) != first
    top1 = Sampling(temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=1.0, seed=7)
    assert generate(tiny, [1, 50, 60], 30, top1, stop_ids=[]) == generate(tiny, [1, 50, 60], 30, GREEDY, stop_ids=[])


def test_stops_on_stop_id_max_tokens_and_context(tiny):
    greedy = generate(tiny, [1, 2, 3], 30, GREEDY, stop_ids=[])
    stop = greedy[9]
    cut = generate(tiny, [1, 2, 3], 30, GREEDY, stop_ids=[stop])
    assert cut == greedy[:greedy.index(stop) + 1]
    streamed = []
    assert generate(tiny, [1, 2, 3], 5, GREEDY, stop_ids=[], on_token=streamed.append) == greedy[:5] == streamed
    context = tiny.config.max_position_embeddings
    assert len(generate(tiny, [1] * (context - 4), 100, GREEDY, stop_ids=[])) == 4
    with pytest.raises(ValueError, match="no room"):
        generate(tiny, [1] * context, 10, GREEDY)



def test_generate_decodes_in_inference_mode(tiny, monkeypatch):
    """Every forward under torch.inference_mode: no autograd graph, and on CUDA the decoding kernels, which take
    no gradient, not training's (a helper put between generate and its decorator once took it)."""
    modes, forward = [], type(tiny).forward
    monkeypatch.setattr(type(tiny), "forward", lambda *a, **k: modes.append(torch.is_inference_mode_enabled()) or
                        forward(*a, **k))
    generate(tiny, [1, 2, 3], 3, GREEDY, stop_ids=[])
    assert modes and all(modes), modes


def test_a_prompt_that_is_not_token_ids_is_told_as_such(tiny):
    """From Python: an empty prompt was "0 tokens leave no room in a context of 5", a batch or an id past the
    vocabulary an indexing error from inside the model, a tensor "Boolean value of Tensor ... is ambiguous". A
    tensor of ids (1-D, or a batch of one) is taken as its list."""
    import numpy as np
    vocab = tiny.lm_head.weight.shape[0]
    expected = generate(tiny, [1, 2, 3], 5, GREEDY)
    for same in (torch.tensor([1, 2, 3]), torch.tensor([[1, 2, 3]]), np.array([1, 2, 3]), (1, 2, 3)):
        assert generate(tiny, same, 5, GREEDY) == expected
    for prompt, message in [([], "prompt_ids is empty"), ([[1, 2]], "one sequence of token ids .integers., not one "
                            r"holding \[1, 2\]"), ([1, 2.0], "not one holding 2.0"),
                            ([1, vocab], f"{vocab} is not a token id of this model .its vocabulary has {vocab}."),
                            ([-1], "-1 is not a token id"), (torch.ones(2, 3, dtype=torch.long), "shape \\[2, 3\\]"),
                            (torch.ones(3), "a torch.float32 tensor")]:
        with pytest.raises(ValueError, match=message):
            generate(tiny, prompt, 5, GREEDY)


def test_steps_queued_ahead_of_reading_their_token_give_the_same_tokens(tiny, monkeypatch):
    """generate() on CUDA queues each step before it reads the token the step follows; forced here on the CPU.
    The same ids, greedy and sampled, through a decoder and the eager cache, cut by a stop id or by the length;
    the step ahead has run when the token is streamed (none past the last token); a decoder whose step ahead was
    let go at a stop decodes the next prompt right; logits that are not finite raise FloatingPointError, not an
    index error where the faulty token (-1) would enter the embedding."""
    from bailong import generation
    from bailong.generation import GraphDecoder
    decoder = GraphDecoder(tiny, 64, graph=False)  # one decoder reused by every call, as on CUDA
    monkeypatch.setattr(generation, "graph_decoder", lambda model, n: decoder)
    calls = []
    hook = tiny.register_forward_pre_hook(lambda module, args: calls.append(1))

    def run(ahead):
        monkeypatch.setattr(generation, "steps_ahead", lambda device: ahead)
        out = []
        for s in [GREEDY, Sampling(temperature=1.0, seed=5)]:
            for graph in False, True:
                for stop_ids in [], [generate(tiny, [1, 2, 3], 30, s, stop_ids=[], cuda_graph=graph)[9]]:
                    calls.clear()
                    streamed = []
                    ids = generate(tiny, [1, 2, 3], 30, s, stop_ids=stop_ids, cuda_graph=graph,
                                   on_token=lambda i: streamed.append(len(calls)))  # steps run (and the prefill)
                    out.append(ids)
                    ahead_steps = [k + 1 + (ahead and k + 1 < 30) for k in range(len(ids))]
                    assert streamed == ahead_steps and len(calls) == ahead_steps[-1]
        return out
    try:
        plain = run(False)
        assert run(True) == plain and len(plain[0]) == 30 and len(plain[1]) <= 10
    finally:
        hook.remove()
    vocab = tiny.config.vocab_size
    monkeypatch.setattr(tiny.lm_head, "forward", lambda h: torch.full((*h.shape[:-1], vocab), float("nan")))
    for graph in False, True:  # still stepping ahead
        with pytest.raises(FloatingPointError, match=r"not finite \(NaN or infinity\) after 0 new tokens"):
            generate(tiny, [1, 2, 3], 5, GREEDY, cuda_graph=graph)

def test_llama2_chat_format_and_training_labels():
    tok = bailong.Tokenizer(asset("llama2-tokenizer/tokenizer.model"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好嗎？"},
                {"role": "assistant", "content": "很好，謝謝。"}]
    turns = llama2_turns(tok, messages)
    first_prompt = tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]", bos=True)
    assert turns == [(first_prompt, tok.encode("Hello!", eos=True)),
                     (tok.encode("[INST] 你好嗎？ [/INST]", bos=True), tok.encode("很好，謝謝。", eos=True))]
    # joined, it reads as Meta's format
    assert tok.decode([i for p, a in turns for i in p + a]) == \
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! [INST] 你好嗎？ [/INST] 很好，謝謝。"
    ids, labels = training_example(tok, messages)
    answers = [i for i, label in zip(ids, labels) if label != -100]
    assert answers == tok.encode("Hello!", eos=True) + tok.encode("很好，謝謝。", eos=True)
    assert all(label in (-100, i) for i, label in zip(ids, labels)) and len(ids) == len(labels)
    with pytest.raises(ValueError, match="alternating"):
        llama2_turns(tok, messages[:1] + messages[2:])


def test_history_trimming_keeps_system_prompt_and_fits():
    tok = byte_tokenizer()
    messages = [{"role": "system", "content": "sys"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "x" * 30}]
    messages.append({"role": "user", "content": "last"})
    full = sum(len(p + a) for p, a in llama2_turns(tok, messages))
    encode = lambda m: llama2_ids(tok, m)  # noqa: E731
    ids, kept = fit_prompt(encode, messages, full - 1)
    assert len(ids) <= full - 1 and kept[0]["role"] == "system" and kept[1]["content"] == "question 1"
    ids, kept = fit_prompt(encode, messages, 60)
    assert len(ids) <= 60 and [m["content"] for m in kept] == ["sys", "last"]
    with pytest.raises(ValueError, match="room for 5"):
        fit_prompt(encode, messages, 5)


def test_static_cache_gives_the_logits_of_the_growing_cache(tiny):
    """The CUDA-graph decoder's cache (position on the device, attention over the whole
    masked buffer) against the ordinary one: prefill, a chunk after a past, single steps."""
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 30))
    with torch.no_grad():
        outs = []
        for cache in [tiny.new_cache(2, 48), tiny.new_cache(2, 48, static=True)]:
            outs.append(torch.cat([tiny(ids[:, :12], cache), tiny(ids[:, 12:20], cache),
                                   *[tiny(ids[:, t:t + 1], cache) for t in range(20, 30)]], dim=1))
            assert cache.pos == 30
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0], tiny(ids), rtol=1e-5, atol=1e-5)


def test_graph_decoder_step_runs_the_static_step(tiny):
    from bailong.generation import GraphDecoder
    prompt = list(range(5, 25))
    expected = generate(tiny, prompt, 20, GREEDY, stop_ids=[])
    decoder = GraphDecoder(tiny, 64, graph=False)  # what a CUDA graph replays, run eagerly
    with torch.no_grad():
        logits, ids = decoder.prefill(torch.tensor([prompt])), []
        for _ in range(20):
            ids.append(int(logits[0].argmax()))
            logits = decoder.step(ids[-1])
    assert ids == expected


def test_graph_decoder_decodes_a_batch_as_each_sequence_alone(tiny):
    from bailong.generation import GraphDecoder
    prompts = [list(range(5, 25)), list(range(40, 60))]
    expected = [generate(tiny, p, 12, GREEDY, stop_ids=[]) for p in prompts]
    decoder = GraphDecoder(tiny, 64, graph=False, batch=2)
    with torch.no_grad():
        logits, ids = decoder.prefill(torch.tensor(prompts)), []
        for _ in range(12):
            ids.append(logits.argmax(-1))  # (2,), fed back without leaving the device
            logits = decoder.step(ids[-1])
    assert torch.stack(ids, 1).tolist() == expected


@needs_triton
def test_decode_benchmark_runs_and_agrees_with_transformers():
    import subprocess
    import sys
    from conftest import ROOT
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_decode.py"), "--device", "cpu", "--preset",
                             "tiny", "--prompt", "8", "--new-tokens", "12", "--profile"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ours: greedy ids equal the reference's for the first 12 of 12" in result.stdout
    assert "ours: greedy ids equal the reference's for the first 12 of 12 in every sequence" in result.stdout  # batch 8
    assert "ours NF4, eager" in result.stdout
    assert re.search(r"ours NF4, sampled as chat\.py +[\d.]+ tokens/s", result.stdout), result.stdout
    for label in ["NF4", "bf16"]:  # (no PDL on the CPU)
        assert re.search(rf"profile, {label}: [\d.]+ ms a step .* operations a step, busy", result.stdout), label


def test_a_failed_graph_capture_falls_back_to_eager_steps(tiny, monkeypatch):
    from bailong.generation import GraphDecoder

    def fail(self, window):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(GraphDecoder, "_capture", fail)
    decoder = GraphDecoder(tiny, 64)
    with torch.no_grad():
        first = int(decoder.prefill(torch.tensor([[5, 6, 7]]))[0].argmax())
        expected = tiny(torch.tensor([[5, 6, 7, first]]))[:, -1]
        with pytest.warns(UserWarning, match="CUDA graph capture failed"):  # at the first step, which captures
            torch.testing.assert_close(decoder.step(first), expected, rtol=1e-5, atol=1e-5)
    assert decoder.graphs is None


def test_static_steps_attend_over_the_windows_that_hold_the_filled_positions(tiny, monkeypatch):
    """Crossing windows (8, 16, 32, ... positions here) gives the eager path's ids; positions past the window are never
    read (NaN there would spread through attention's matmul, masked or not); each window's graph is captured
    once, when a step first needs it, or ahead of time by ``capture``."""
    from bailong import generation
    from bailong.generation import GraphDecoder
    monkeypatch.setattr(generation, "WINDOW", 8)
    prompt = list(range(5, 16))  # 11 positions: the second window
    expected = generate(tiny, prompt, 20, GREEDY, stop_ids=[])
    decoder = GraphDecoder(tiny, 40, graph=False)
    windows = []
    with torch.no_grad():
        logits, ids = decoder.prefill(torch.tensor([prompt])), []
        for _ in range(20):
            ids.append(int(logits[0].argmax()))
            window = decoder._window(decoder.pos + 1)  # the coming step's
            for kv in decoder.cache.k, decoder.cache.v:
                kv[:, :, :, decoder.pos:window], kv[:, :, :, window:] = 0.0, float("nan")  # NaN past the window
            logits = decoder.step(ids[-1])
            windows.append(decoder.cache.window)
    assert ids == expected
    assert windows == [16] * 5 + [32] * 15

    captured = []
    monkeypatch.setattr(GraphDecoder, "_capture", lambda self, window: captured.append(window) or ("graph", None))
    decoder = GraphDecoder(tiny, 36)
    decoder.capture(20)
    assert captured == [8, 16, 32]
    decoder.capture()
    assert captured == [8, 16, 32, 36] and set(decoder.graphs) == {8, 16, 32, 36}  # at most the whole cache
    with pytest.raises(ValueError, match="40 tokens does not fit the decoder's 36 positions"):
        decoder.prefill(torch.zeros((1, 40), dtype=torch.long))


def test_captured_steps_replay_as_eager_ones_across_windows(tiny, monkeypatch):
    """GraphDecoder's own capture code on the CPU, with CUDA's streams and graphs faked: a capture runs nothing
    (the step runs and what it wrote is put back), a replay reruns the step it captured, over its window, into
    its logits. Across windows, a short conversation after a long one, a longer prompt after that, up to a full
    cache: the logits of the eager steps. A warm-up that fails midway leaves the position where it was."""
    import contextlib

    from bailong import generation
    from bailong.generation import GraphDecoder
    monkeypatch.setattr(generation, "WINDOW", 16)
    step, capturing = GraphDecoder._step, []

    class Graph:
        def replay(self):
            decoder, window, logits = self.captured
            decoder.cache.window = window
            logits.copy_(step(decoder))

    def captured_step(self):
        if not capturing:
            return step(self)
        state = [t.clone() for t in (self.cache.next, self.cache.k, self.cache.v)]
        logits = step(self)
        for t, before in zip((self.cache.next, self.cache.k, self.cache.v), state):
            t.copy_(before)
        capturing[0].captured = self, self.cache.window, logits
        return logits

    Stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    current, warmed_up_on = Stream(), []

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):  # captured on the stream every window's warm-up ran on, not the current
        assert warmed_up_on and stream is not current and all(s is stream for s in warmed_up_on)
        capturing.append(g)
        try:
            yield
        finally:
            capturing.clear()
    monkeypatch.setattr(GraphDecoder, "_step", captured_step)
    for name, value in dict(device=lambda d: contextlib.nullcontext(), current_stream=lambda device=None: current,
                            Stream=Stream, stream=lambda s: warmed_up_on.append(s) or contextlib.nullcontext(),
                            graph_pool_handle=object, CUDAGraph=Graph, graph=graph,
                            set_stream=lambda s: None).items():
        monkeypatch.setattr(torch.cuda, name, value)
    decoder, eager = GraphDecoder(tiny, 64), GraphDecoder(tiny, 64, graph=False)

    def decode(prompt, n):
        with torch.no_grad():
            ours, theirs = decoder.prefill(torch.tensor([prompt])), eager.prefill(torch.tensor([prompt]))
            torch.testing.assert_close(ours, tiny(torch.tensor([prompt]))[:, -1])  # whatever window came before
            torch.testing.assert_close(theirs, ours)
            for _ in range(n):
                token = int(theirs[0].argmax())
                ours, theirs = decoder.step(token), eager.step(token)
                torch.testing.assert_close(ours, theirs)
    decode(list(range(3, 20)), 40)  # positions 18 to 57: windows 32 and 64
    assert sorted(decoder.graphs) == [32, 64]
    decode(list(range(3, 8)), 10)  # a short conversation after: window 16 captured
    assert sorted(decoder.graphs) == [16, 32, 64]
    decode(list(range(3, 40)), 27)  # a longer prompt after a shorter one, up to the last position
    with pytest.raises(ValueError, match="all filled"):
        decoder.step(1)
    with pytest.raises(ValueError, match="no step is left to capture"):
        decoder.capture()

    decoder, fail, forward = GraphDecoder(tiny, 64), [], type(tiny.lm_head).forward

    def lm_head(h):  # fails once when asked to, after the layers have moved the position on
        if fail:
            raise fail.pop()
        return forward(tiny.lm_head, h)
    monkeypatch.setattr(tiny.lm_head, "forward", lm_head)
    with torch.no_grad():
        decoder.prefill(torch.tensor([[5, 6, 7]]))
        eager.prefill(torch.tensor([[5, 6, 7]]))
        fail.append(KeyboardInterrupt())  # in the first warm-up step: the step is abandoned, nothing moved
        with pytest.raises(KeyboardInterrupt):
            decoder.step(9)
        fail.append(RuntimeError("out of memory"))  # again: now the capture gives up, and the step runs eagerly
        with pytest.warns(UserWarning, match="capture failed, decoding without it: RuntimeError: out of memory"):
            ours = decoder.step(9)
        torch.testing.assert_close(ours, eager.step(9))
    assert decoder.graphs is None and decoder.pos == decoder.cache.pos == eager.cache.pos == 4


def test_decoders_kept_per_model_neither_keep_the_model_alive_nor_outlive_a_rebuild(monkeypatch):
    import gc
    import weakref

    from bailong.generation import _decoders, graph_decoder
    model = bailong.load_preset("tiny", device="cpu")[0].eval()
    first = graph_decoder(model, 10)
    assert graph_decoder(model, 200) is first and first.max_len == 256  # lengths rounded up to the next window
    model.config.max_position_embeddings = 1000
    assert graph_decoder(model, 300).max_len == 512 and graph_decoder(model, 600).max_len == 1000  # the context
    first = graph_decoder(model, 10)  # a longer decoder serves a shorter conversation
    assert first.max_len == 1000
    first_alive, old_alive = weakref.ref(first), []
    del first
    from bailong.quantized import quantize_model
    quantize_model(model)  # new weights: a new decoder, and the old one gone before its cache is made
    new_cache = bailong.Llama.new_cache
    monkeypatch.setattr(bailong.Llama, "new_cache",
                        lambda *a, **k: old_alive.append(first_alive()) or new_cache(*a, **k))
    second = graph_decoder(model, 10)
    assert old_alive == [None] and first_alive() is None
    model_alive = weakref.ref(model)
    del model, second
    gc.collect()
    assert model_alive() is None and len(_decoders) == 0
