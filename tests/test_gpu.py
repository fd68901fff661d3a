"""The model on CUDA, against transformers on the same device (skipped without a GPU)."""
import pytest
import torch
from hf_models import write_hf

import bailong
from bailong.generate import Sampling, generate

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
    assert generate(model, prompt, 40, GREEDY, stop_ids=[]) == \
        generate(model, prompt, 40, GREEDY, stop_ids=[], use_cache=False)
