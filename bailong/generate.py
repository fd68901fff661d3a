"""Text generation: one prefill over the prompt, then one token at a time with the KV cache."""
from dataclasses import dataclass

import torch

from bailong.model import Llama


@dataclass
class Sampling:
    """How the next token is chosen. Defaults are those Bailong-instruct's model card gives."""
    temperature: float = 0.6  # 0 means greedy (argmax)
    top_k: int = 40  # keep the k most likely tokens; 0 keeps all
    top_p: float = 0.9  # keep the smallest set whose probability reaches p; 1.0 keeps all
    repetition_penalty: float = 1.1  # 1.0 is off
    seed: int | None = None  # set for reproducible sampling


def process_logits(logits, seen, s: Sampling):
    """Apply, in this order, repetition penalty, temperature, top-k and top-p to (V,) logits.

    The repetition penalty (Keskar et al., 2019) divides positive logits of tokens
    already in the context by the penalty and multiplies negative ones, so a seen
    token always becomes less likely. Filtered tokens get -inf.
    """
    logits = logits.float().clone()
    if s.repetition_penalty != 1.0 and len(seen):
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / s.repetition_penalty, prev * s.repetition_penalty)
    if s.temperature > 0:
        logits /= s.temperature
    if 0 < s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if s.top_p < 1.0:
        probs, order = torch.sort(logits.softmax(-1), descending=True)
        # drop a token when the tokens more likely than it already reach top_p; the first always stays
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits, seen, s: Sampling, generator=None) -> int:
    logits = process_logits(logits, seen, s)
    if s.temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.inference_mode()
def generate(model: Llama, prompt_ids, max_new_tokens=256, sampling: Sampling | None = None, stop_ids=None,
             on_token=None, use_cache=True) -> list[int]:
    """New token ids after ``prompt_ids`` (batch of one).

    Stops after an id in ``stop_ids`` (default: the config's eos ids; it is included
    in the result), after ``max_new_tokens``, or when the context window is full.
    ``on_token(id)`` is called as each id is chosen, for streaming.
    ``use_cache=False`` reruns the whole sequence each step: slow, for checking the cache.
    """
    config = model.config
    sampling = sampling or Sampling()
    stop_ids = set(config.eos_token_id if stop_ids is None else stop_ids)
    device = model.lm_head.weight.device
    limit = min(len(prompt_ids) + max_new_tokens, config.max_position_embeddings)
    if not prompt_ids or len(prompt_ids) >= limit:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {limit}")
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device).manual_seed(sampling.seed)
    cache = model.new_cache(1, limit) if use_cache else None
    logits = model(ids, cache, last_only=True)[0, -1]  # prefill, (V,)
    new = []
    while True:
        next_id = sample(logits, ids[0], sampling, generator)
        new.append(next_id)
        if on_token:
            on_token(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
        if next_id in stop_ids or ids.shape[1] >= limit:
            return new
        step = ids[:, -1:] if use_cache else ids
        logits = model(step, cache, last_only=True)[0, -1]
