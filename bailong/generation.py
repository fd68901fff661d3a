"""Text generation: one prefill over the prompt, then one token at a time with the KV cache.

On CUDA each one-token step is replayed from a CUDA graph (``GraphDecoder``), so
that decoding speed is set by reading the weights, not by launching kernels.
"""
import warnings
import weakref
from dataclasses import replace
from numbers import Integral

import torch

from bailong.config import HF_SAMPLING, SAMPLING, Sampling
from bailong.errors import BailongWarning
from bailong.model import Llama
from bailong.quantized import nf4_weights
from bailong.step_graph import capture_failure


def process_logits(logits, seen, s: Sampling):
    """Apply, in this order, repetition penalty, temperature, top-k and top-p to (B, V) logits; ``seen``
    (B, V) marks the tokens already in each context. Returns the candidates: their logits (B, C), filtered
    ones -inf, and their token ids (B, C), or None where the candidates are the whole vocabulary in order.
    With top-k they are the k most likely tokens, most likely first, and top-p works on those k alone, not
    on a sorted vocabulary (exactly k: of tokens tied at the k-th logit, ``torch.topk`` picks which stay;
    transformers keeps them all).

    The repetition penalty (Keskar et al., 2019) divides positive logits of tokens
    already in the context by the penalty and multiplies negative ones, so a seen
    token always becomes less likely. Everything stays on the logits' device with
    the same shapes whatever the values (masks, no indexing by a data-dependent
    count): no operation waits for the device.
    """
    logits, ids = logits.float(), None
    if s.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if s.temperature > 0:
        logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        logits, ids = torch.topk(logits, s.top_k)  # sorted, most likely first
    if s.top_p < 1.0:
        probs, order = logits.softmax(-1), None
        if ids is None:
            probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens more likely than it already reach top_p; the first always stays
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.masked_fill(drop if order is None else drop.scatter(-1, order, drop), float("-inf"))
    return logits, ids


def sample(logits, seen, s: Sampling, generator=None):
    """The next token (B,) for (B, V) logits, chosen on their device; ``seen`` (B, V) gets it marked. A row
    whose logits are not finite (NaN or infinity: a fault upstream) gets -1, for the reader to report.

    Sampling uses the exponential race: with E_i drawn from Exp(1), argmax_i p_i / E_i is
    token i with probability p_i (E_i / p_i is exponential with rate p_i, and the smallest
    of independent exponentials is i with probability p_i / sum p). Unlike
    ``torch.multinomial`` it never waits for the device.
    """
    faulty = ~torch.isfinite(logits).all(-1)  # (B,)
    if s.temperature <= 0:  # top-k and top-p keep the most likely token: skipped, argmax breaks ties (lowest id)
        token = process_logits(logits, seen, replace(s, top_k=0, top_p=1.0))[0].argmax(-1)
    else:
        logits, ids = process_logits(logits, seen, s)
        probs = logits.softmax(-1)
        faulty |= probs.isnan().any(-1)  # e.g. logits / temperature past float32's range
        race = torch.empty_like(probs).exponential_(generator=generator)
        token = (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(-1)
        if ids is not None:  # a candidate's place -> its token id
            token = ids.gather(-1, token[:, None])[:, 0]
    seen.scatter_(1, token[:, None], True)
    return token.masked_fill(faulty, -1)


def seen_mask(ids, vocab_size):
    """(B, V) bool: which tokens each row of ``ids`` (B, T) holds."""
    return torch.zeros((ids.shape[0], vocab_size), dtype=torch.bool, device=ids.device).scatter_(1, ids, True)


WINDOW = 256  # the static step attends over the first WINDOW, 2 WINDOW, 4 WINDOW, ... positions of the cache


def window_for(positions, most):
    """The smallest of WINDOW, 2 WINDOW, 4 WINDOW, ... that holds ``positions``, or ``most`` if that is less."""
    window = WINDOW
    while window < positions:
        window *= 2
    return min(window, most)


class GraphDecoder:
    """Decoding whose one-token step is captured in a CUDA graph and replayed.

    Eagerly, a 7B model launches hundreds of small kernels per token (projections,
    norms, rope, attention in every layer) and the GPU waits on Python between them;
    a graph replays the whole step in one launch. That is legal because every replay
    touches the same tensors: the token buffer, a ``StaticKVCache`` (its position
    lives on the device and advances inside the graph) and the logits it writes.

    A graph's shapes are fixed, so its attention reads a fixed stretch of the cache:
    the step attends over the first ``WINDOW``, 2 ``WINDOW``, 4 ``WINDOW``, ... positions
    (at most the whole cache), the fewest that hold every position filled so far, and
    each such window gets its own graph, captured when decoding first reaches it (or
    ahead, ``capture``). A step thus reads at most twice the positions written (or
    ``WINDOW``), not the whole buffer (a short chat after a long one, or a long
    answer's first tokens), for one capture per doubling. The graphs share one memory
    pool, captured on one side stream: each replay's logits are read before the next
    replay. (The fused decoding step's attention reads only the filled positions; the
    window sets how many programs share the reading: ``bailong_kernels.decode``.)

    ``graph=False`` runs the same static steps eagerly (CPU, tests). ``batch`` sequences
    decode together (the prompts of one length). The decoder holds its model weakly,
    so that keeping decoders per model does not keep models alive.
    """

    def __init__(self, model: Llama, max_len, graph=True, batch=1):
        self.model_ref, self.max_len = weakref.ref(model), max_len
        self.cache = model.new_cache(batch, max_len, static=True)
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=self.cache.k.device)
        self.key = graph_key(model)
        self.pos = 0  # positions filled: the host's copy of ``cache.next``, read without waiting for the device
        self.graphs = {} if graph else None  # window -> (its captured step, the logits that step writes)
        self.pool = None  # the memory pool the graphs share
        self.stream = None  # the side stream they are warmed up and captured on (one: see _capture)

    def _window(self, end):
        """The attended length of a step that fills positions 0 .. end - 1."""
        return window_for(end, self.max_len)

    def _step(self):
        return self.model_ref()(self.token, self.cache, last_only=True)[:, -1]  # (B, V)

    def _capture(self, window):
        """The step over ``window`` positions captured in a CUDA graph, and the logits it writes."""
        # Warm up on a side stream first: autotuners, lazy initialisation and allocations must not happen
        # inside the capture. Each warm-up step writes the token buffer's k and v where the next step
        # writes them (not yet attended to), and the position is put back after it, even if it fails;
        # capturing itself runs nothing. Every window is warmed up and captured on this decoder's one side stream,
        # made on the model's device (torch.cuda.graph's own capture stream is made once a process, on the first
        # capture's device); one stream for the graphs that share a pool, as torch asks, so that each capture
        # reuses the pool's memory the others freed (the allocator reuses a block on its own stream only).
        self.cache.window = window
        with torch.cuda.device(self.token.device):
            if self.stream is None:
                self.stream = torch.cuda.Stream()
            current, stream = torch.cuda.current_stream(), self.stream
            start = self.cache.next.clone()
            stream.wait_stream(current)
            try:
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        try:
                            self._step()
                        finally:
                            self.cache.next.copy_(start)
            finally:  # whatever follows, on the current stream, comes after the warm-up and its put-back
                current.wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    logits = self._step()
            finally:  # a failed capture leaves its stream current: put ours back
                torch.cuda.set_stream(current)
        return graph, logits

    def capture(self, end=None):
        """Capture now the graphs that steps up to position ``end`` (default: the whole cache) replay; a
        window's graph is otherwise captured at its first step."""
        if self.pos >= self.max_len:
            raise ValueError(f"the decoder's {self.max_len} positions are all filled: no step is left to capture")
        window, last = 0, self._window(end or self.max_len)
        while window < last:
            window = self._window(window + 1)
            self._graph(window)

    def _graph(self, window):
        """The captured step over ``window`` positions and its logits, captured if need be; None where steps
        run eagerly (``graph=False``, or a capture failed: an operation that cannot be captured, warned about)."""
        if self.graphs is not None and window not in self.graphs:
            try:
                self.graphs[window] = self._capture(window)
            except RuntimeError as e:
                self.graphs = None
                warnings.warn(f"CUDA graph capture failed, decoding without it: {capture_failure(e)}", BailongWarning)
        return None if self.graphs is None else self.graphs[window]

    def prefill(self, ids):
        """Logits (B, V) after the prompts ``ids`` (B, T), which fill the cache from position 0."""
        if ids.shape[1] > self.max_len:
            raise ValueError(f"a prompt of {ids.shape[1]} tokens does not fit the decoder's {self.max_len} positions")
        self.cache.next.zero_()
        self.pos, self.cache.window = ids.shape[1], self._window(ids.shape[1])
        return self.model_ref()(ids, self.cache, last_only=True)[:, -1]

    def step(self, tokens):
        """Logits (B, V) after one more token for each sequence: ``tokens`` (B,) on the device (no copy from
        the host), or an int for all. Read them before the next step: the graphs share their memory."""
        if self.pos >= self.max_len:
            raise ValueError(f"the decoder's {self.max_len} positions are all filled")
        self.token.copy_(torch.as_tensor(tokens).view(-1, 1))
        window = self._window(self.pos + 1)
        if captured := self._graph(window):
            graph, logits = captured
            graph.replay()
        else:
            self.cache.window = window
            logits = self._step()
        self.pos += 1  # counted once the step ran: a capture that raised (its warm-up put back) changed nothing
        return logits


def graph_key(model):
    """Where every weight lives and as what, and which kernels run: a captured graph reads those
    addresses and launches those kernels, so it is stale once any of them changes."""
    nf4 = [t for q in nf4_weights(model) for t in q.tensors().values()]
    switches = None
    if model.lm_head.weight.is_cuda:
        import bailong_kernels  # Triton is imported only where it runs
        switches = bailong_kernels.switches()
    return tuple((t.data_ptr(), t.dtype) for t in [*model.parameters(), *nf4]), switches


_decoders = weakref.WeakKeyDictionary()  # model -> its GraphDecoder, reused while it fits


def graph_decoder(model: Llama, max_len) -> GraphDecoder:
    """The model's GraphDecoder for at least ``max_len`` positions, made anew only when it is
    too short, the weights moved or a kernel switch changed. Its cache is sized to the next window
    (``WINDOW`` times a power of two, at most the model's context): a growing chat makes a new decoder,
    and captures its graphs again, only when its length doubles. A larger cache costs memory, not
    reading: a step reads only its window."""
    decoder = _decoders.get(model)
    if decoder is None or decoder.max_len < max_len or decoder.key != graph_key(model):
        _decoders.pop(model, None)
        decoder = None  # the last reference: the old graph and cache are freed before new ones are made
        decoder = _decoders[model] = GraphDecoder(model, window_for(max_len, model.config.max_position_embeddings))
    return decoder


GENERATION_CONFIG = "generation_config.json"


def generation_config(folder):
    """A model's generation_config.json (``outputs.model_file``), or None."""
    from bailong.outputs import model_file
    return model_file(folder, GENERATION_CONFIG)


def generation_eos(folder) -> set[int]:
    """The ids a model's generation_config.json ends an answer at (its eos_token_id: one, or a list: Gemma's
    <end_of_turn>, Llama 3's <|eot_id|>), where it has one: transformers stops at them."""
    from bailong.errors import read_json
    file = generation_config(folder)
    eos = read_json(file).get("eos_token_id") if file else None
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
    return {i for i in eos if isinstance(i, int) and not isinstance(i, bool) and i >= 0}


def model_sampling(folder, chosen: dict | None = None, seed=None) -> tuple[Sampling, int]:
    """Sampling and answer length for a model: ``chosen`` values (None: not chosen), else its
    ``generation_config``'s, read as transformers reads it (greedy unless it says do_sample; what it leaves
    out, transformers' defaults: ``HF_SAMPLING``), else Sampling's defaults and 512 new tokens."""
    from bailong.errors import BailongError, read_json
    chosen = {k: v for k, v in (chosen or {}).items() if v is not None}
    file = generation_config(folder)
    config = read_json(file) if file else None
    defaults = vars(Sampling())
    if config is not None:
        defaults = {**HF_SAMPLING, **{k: config[k] for k in SAMPLING if config.get(k) is not None}}
    try:
        Sampling(**{name: defaults[name] for name in SAMPLING})  # the file's values make sense, used or not
        if config is not None and config.get("do_sample") is not True:
            defaults["temperature"] = 0.0
        sampling = Sampling(**{name: chosen.get(name, defaults[name]) for name in SAMPLING}, seed=seed)
    except ValueError as e:
        raise BailongError(f"{file}: {e}") from None
    max_new = chosen.get("max_new_tokens") or (config or {}).get("max_new_tokens")
    max_new = 512 if max_new is None else max_new
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise BailongError(f"{file}: max_new_tokens must be at least 1, not {max_new!r}")
    return sampling, max_new


def _prompt(prompt_ids, vocab) -> list[int]:
    """``generate``'s prompt as a list of ids (a 1-D tensor, or a batch of one, taken too), or a ValueError that
    says what is wrong with it, where torch's indexing errors said it from deep inside the model."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids[0] if prompt_ids.dim() == 2 and len(prompt_ids) == 1 else prompt_ids
        if prompt_ids.dim() != 1 or prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise ValueError(f"prompt_ids: a {prompt_ids.dtype} tensor of shape {list(prompt_ids.shape)}; generate "
                             "continues one sequence of token ids")
        prompt_ids = prompt_ids.tolist()
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("prompt_ids is empty: generate continues at least one token (a bos id, say)")
    for i in ids:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise ValueError(f"prompt_ids must be one sequence of token ids (integers), not one holding {i!r}")
        if not 0 <= i < vocab:
            raise ValueError(f"prompt_ids: {i} is not a token id of this model (its vocabulary has {vocab})")
    return [int(i) for i in ids]


@torch.inference_mode()
def generate(model: Llama, prompt_ids, max_new_tokens=256, sampling: Sampling | None = None, stop_ids=None,
             on_token=None, cuda_graph=None) -> list[int]:
    """New token ids after ``prompt_ids`` (batch of one).

    Stops after an id in ``stop_ids`` (default: the config's eos ids; it is included
    in the result), after ``max_new_tokens``, or when the context window is full.
    ``on_token(id)`` is called as each id is chosen, for streaming.
    ``cuda_graph`` (default: on CUDA, for a model in eval mode, outside autocast) decodes with a
    ``GraphDecoder``. On CUDA each step is queued before the token it follows reaches the host
    (``steps_ahead``): the device is not left waiting while the host streams a token.
    """
    config = model.config
    sampling = Sampling() if sampling is None else sampling
    if not isinstance(sampling, Sampling):  # (a dict's keys would be read as no setting at all)
        raise TypeError(f"sampling must be a Sampling (bailong.Sampling(temperature=0)), not {type(sampling).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number above 0, not {max_new_tokens!r}")
    stop_ids = set(config.eos_token_id if stop_ids is None else [stop_ids] if isinstance(stop_ids, Integral)
                   else stop_ids)
    device = model.lm_head.weight.device
    prompt_ids = _prompt(prompt_ids, model.lm_head.weight.shape[0])
    limit = min(len(prompt_ids) + max_new_tokens, config.max_position_embeddings)
    if len(prompt_ids) >= limit:
        raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room in the model's context of "
                         f"{config.max_position_embeddings}")
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    seen = seen_mask(ids, model.lm_head.weight.shape[0])  # for the repetition penalty
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device).manual_seed(sampling.seed)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not model.training and not torch.is_autocast_enabled("cuda")
    decoder = graph_decoder(model, limit) if cuda_graph else None
    if decoder is not None:
        logits, step = decoder.prefill(ids), decoder.step  # (1, V)
    else:
        cache = model.new_cache(1, limit)
        logits = model(ids, cache, last_only=True)[:, -1]  # prefill, (1, V)

        def step(token):
            return model(token[:, None], cache, last_only=True)[:, -1]
    ahead, new = steps_ahead(device), []
    while True:
        token = sample(logits, seen, sampling, generator)  # (1,), on the device
        room = len(prompt_ids) + len(new) + 1 < limit
        read = read_later(token)
        if ahead and room:  # the next step is queued first, to run while the host reads and streams this token;
            logits = step(token.clamp_min(0))  # a faulty -1 (raised below) must not index the embedding
        next_id = read()  # a token's one wait for the device: streaming and the stop test need the id
        if next_id < 0:
            raise FloatingPointError(f"the model's logits are not finite (NaN or infinity) after {len(new)} new "
                                     "tokens: the weights or the computation overflowed")
        new.append(next_id)
        if on_token:
            on_token(next_id)
        if next_id in stop_ids or not room:
            return new  # a step taken ahead is let go (a decoder's next prefill starts its cache over)
        if not ahead:
            logits = step(token)


def steps_ahead(device) -> bool:
    """Whether generate() queues each next step before reading the token it follows: where the device runs
    apart from the host (CUDA), so that streaming, the stop test and launching the step overlap the device's
    work. On the CPU the step would only run sooner, and one taken past a stop would be wasted."""
    return device.type == "cuda"


def read_later(token):
    """A function giving ``token`` (one id, on its device) as an int. On CUDA the copy to the host starts now
    and the function waits for that copy alone, not for work queued after this call."""
    if not token.is_cuda:
        return lambda: int(token)
    host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True).copy_(token, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(token.device))  # where the copy runs, not the current device's

    def read():
        copied.synchronize()
        return int(host)
    return read
