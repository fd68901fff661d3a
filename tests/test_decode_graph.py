"""CUDA-graph decoding with the capture emulated faithfully (tests/graph_capture.py): a replay runs the recorded
operations and Triton launches again, not the step's Python, and what a capture made holds garbage until a replay.
(tests/test_generate.py checks the decoder's warm-up stream and failures with a simpler fake.)"""
import pytest
import torch

from bailong.generation import Sampling, generate
from graph_capture import emulated_cuda_graphs

GREEDY = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)


@pytest.mark.parametrize("gpu_path", [False, True])
def test_replayed_decoding_graphs_give_the_eager_steps_logits(tiny, monkeypatch, gpu_path):
    """The decoding graphs replayed as CUDA replays them (tests/graph_capture.py: the recorded operations and
    Triton launches run again, not the model's Python): the logits of eager steps across windows, for a shorter
    conversation after a longer one and up to a full cache; on the CPU's path, and on the GPU's (NF4 GEMV and the
    fused decoding step's kernels, interpreted). The model's forward runs in a step only to warm up and capture."""
    from bailong import generation
    from bailong.generation import GraphDecoder
    from test_layer_kernels import gpu_path as kernels_path, tiny_nf4
    monkeypatch.setattr(generation, "WINDOW", 16)
    model = tiny_nf4(1) if gpu_path else tiny
    if gpu_path:
        kernels_path(monkeypatch, fused_step=True)
    eager, forwards, forward = GraphDecoder(model, 64, graph=False), [], type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: forwards.append(1) or forward(*a, **k))
    with emulated_cuda_graphs(monkeypatch) as graphs, torch.no_grad():
        decoder, in_steps = GraphDecoder(model, 64), 0

        def decode(prompt, n):
            nonlocal in_steps
            ours, theirs = decoder.prefill(torch.tensor([prompt])), eager.prefill(torch.tensor([prompt]))
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            for _ in range(n):
                token, before = int(theirs[0].argmax()), len(forwards)
                ours = decoder.step(token)
                in_steps += len(forwards) - before
                theirs = eager.step(token)
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        if gpu_path:  # interpreted: fewer steps, every window still
            decode(list(range(3, 17)), 4)  # positions 14 to 17: windows 16, then 32
            decode(list(range(3, 36)), 2)  # a longer conversation after: window 64
            decode(list(range(3, 8)), 2)  # a shorter one after that: window 16 again
        else:
            decode(list(range(3, 20)), 40)  # positions 17 to 56: windows 32, then 64
            decode(list(range(3, 8)), 6)  # a short conversation after: window 16
            decode(list(range(3, 40)), 27)  # a longer prompt after a shorter one, up to the last position
            assert decoder.pos == 64
    assert sorted(decoder.graphs) == [16, 32, 64] and len(graphs) == 3 and in_steps == 3 * 3  # 2 warm-ups, a capture


def test_generate_through_replayed_graphs_gives_the_eager_ids(tiny, monkeypatch):
    """generate() as it runs on CUDA, the capture emulated faithfully: the decoder's graphs replayed across
    windows, each step queued before its token is read. The ids of decoding with the eager cache, greedy and
    sampled (top-k, top-p, repetition penalty), cut by a stop id or by the length; one decoder for every call."""
    from bailong import generation
    from bailong.generation import GraphDecoder
    monkeypatch.setattr(generation, "WINDOW", 16)
    sampled = Sampling(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5)
    runs = [(s, stops) for s in (GREEDY, sampled)
            for stops in ([], [generate(tiny, [1, 2, 3], 40, s, stop_ids=[])[20]])]
    expected = [generate(tiny, [1, 2, 3], 40, s, stop_ids=stops, cuda_graph=False) for s, stops in runs]
    with emulated_cuda_graphs(monkeypatch) as graphs:
        decoder = GraphDecoder(tiny, 64)
        monkeypatch.setattr(generation, "graph_decoder", lambda model, n: decoder)
        monkeypatch.setattr(generation, "steps_ahead", lambda device: True)
        assert [generate(tiny, [1, 2, 3], 40, s, stop_ids=stops, cuda_graph=True) for s, stops in runs] == expected
    assert sorted(decoder.graphs) == [16, 32, 64] and len(graphs) == 3
    for full, cut in (expected[:2], expected[2:]):  # a stop id cuts where it first comes
        assert len(full) == 40 and len(cut) <= 21 and cut == full[:len(cut)]
