"""Write a (merged) model as one GGUF file, the format llama.cpp, Ollama and LM Studio read.

Called by ``python -m bailong.export --format gguf``; the ``gguf`` package (published
by llama.cpp's authors) is imported here only. What goes in:

- every weight under llama.cpp's tensor name (``blk.0.attn_q.weight``...), from
  gguf's own name map. The q and k projections' rows are reordered within each
  head: Hugging Face rotates the pair (i, i + d/2) of a head's d dimensions,
  llama.cpp's Llama rotates neighbours (2i, 2i + 1), so row i + d/2 moves next
  to row i. 1-D tensors (the RMSNorm weights) stay float32, as llama.cpp's own
  converter keeps them; the matrices take ``kind`` (f32, f16, bf16 or q8_0; under
  q8_0 a matrix whose rows are not a multiple of 32 stays f16, as there too).
- Llama's metadata from the config (context length, heads and KV heads, RoPE base
  and linear scaling, RMSNorm epsilon), and for "llama3" RoPE scaling the
  per-frequency factors as llama.cpp's ``rope_freqs`` tensor;
- the SentencePiece vocabulary piece by piece, with its scores and types (an
  extended tokenizer's new pieces included, byte pieces as byte tokens), or a
  byte-level BPE tokenizer.json's tokens, types and merges with the name llama.cpp
  knows its pre-tokenizer by; the special ids, and the chat template: the model's
  own, or else the Llama 2 format that ``chat.py`` and ``train.py --stage sft`` use.

The file is written in one pass, tensor by tensor, so memory stays at the model
plus one converted tensor; the caller writes it under a temporary name.
"""
import math
import sys
import warnings
from dataclasses import replace

import numpy as np
import torch
from sentencepiece import sentencepiece_model_pb2 as pb
from tqdm import tqdm

from bailong.chat_template import LLAMA2_JINJA
from bailong.errors import BailongError, BailongWarning
from bailong.generation import Sampling
from bailong.model import rope_frequencies
from bailong.progress import BAR_HIDDEN
from bailong.quantized import NF4Linear, projections, set_module
from bailong.tokenizer import JsonTokenizer, check_fits


def permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection from Hugging Face's RoPE order to llama.cpp's (see above)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def check_tokenizer(tokenizer):
    """A one-line refusal for a tokenizer llama.cpp would not reproduce (callable before the model loads).
    Returns what the vocabulary is written from: the SentencePiece model, or the tokenizer.json's content
    and the name llama.cpp knows its pre-tokenizer by."""
    import json
    if not isinstance(tokenizer, JsonTokenizer):
        source, proto = tokenizer.path or "the tokenizer", tokenizer.proto()
        if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
            kind = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
            raise BailongError(f"{source}: a {kind} SentencePiece model; llama.cpp's Llama tokenizer reproduces "
                               "BPE models only, so the GGUF file would tokenize differently")
        normalizer = proto.normalizer_spec.name
        if normalizer not in ("identity", "") or proto.normalizer_spec.precompiled_charsmap:
            raise BailongError(f"{source}: normalizes text ({normalizer}), which llama.cpp's Llama tokenizer does "
                               "not do, so the GGUF file would tokenize differently")
        return proto
    from bailong.vocab_bpe import check_byte_level
    data = json.loads(tokenizer.serialized())
    check_byte_level(data, tokenizer.path)
    pre = data.get("pre_tokenizer") or {}
    parts = tuple((p.get("type"), p.get("pattern", {}).get("Regex"), p.get("behavior"), p.get("invert"),
                   p.get("use_regex"), p.get("add_prefix_space")) for p in pre.get("pretokenizers", [pre]))
    name = PRE_TOKENIZERS.get(parts)
    if data.get("normalizer") or name is None:
        raise BailongError(f"{tokenizer.path}: a pre-tokenizer or normalizer llama.cpp does not know by name, so "
                           "the GGUF file would tokenize differently (known: Llama 3's)")
    return data, name


def check_piece_lengths(tokenizer):
    """Warn of pieces longer than 32 bytes (a grown vocabulary's long words: 11 characters or more of a script of
    three bytes a character), which llama-cpp-python (0.3.36) leaves out of the text it decodes, its buffer for a
    piece being 32 bytes; llama.cpp's own tools read any length. After ``check_tokenizer``."""
    if isinstance(tokenizer, JsonTokenizer):  # byte-level tokens: a character of their alphabet for each byte
        added = tokenizer.tk.get_added_tokens_decoder()
        sizes = [len(t) for t, i in tokenizer.tk.get_vocab().items() if i not in added]
    else:
        sizes = [len(p.piece.replace("\u2581", " ").encode()) for p in tokenizer.proto().pieces if p.type == p.NORMAL]
    if long := [n for n in sizes if n > 32]:
        warnings.warn(BailongWarning(
            f"{tokenizer.path or 'the tokenizer'}: pieces longer than 32 bytes: {len(long)}, of up to {max(long)} "
            "bytes; llama.cpp reads them, but llama-cpp-python 0.3 leaves them out of the text it decodes"), stacklevel=2)


def sentencepiece_vocabulary(w, tokenizer, vocab_size, add_bos, add_eos):
    """Every SentencePiece piece with its score and type, for llama.cpp's "llama" tokenizer."""
    import gguf
    proto = check_tokenizer(tokenizer)
    w.add_tokenizer_model("llama")
    pieces = [p.piece.encode() for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [gguf.TokenType[pb.ModelProto.SentencePiece.Type.Name(p.type)] for p in proto.pieces]
    for i in range(len(pieces), vocab_size):  # embedding rows past the tokenizer (padding)
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.sp.unk_id())
    if tokenizer.pad_id >= 0:
        w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)


# The pre-tokenizers llama.cpp knows by name (it tells them apart by name, not by their settings): each as
# the (type, regex, behavior, invert, use_regex, add_prefix_space) of its parts.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {(("Split", LLAMA3_SPLIT, "Isolated", False, None, None),
                   ("ByteLevel", None, None, None, False, False)): "llama-bpe"}


def bpe_vocabulary(w, tokenizer, vocab_size):
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" tokenizer: tokens, types, merges, and the
    name llama.cpp knows its pre-tokenizer by."""
    import gguf
    data, name = check_tokenizer(tokenizer)
    by_id = {i: t for t, i in tokenizer.tk.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.tk.get_added_tokens_decoder()
    T = gguf.TokenType
    types = [T.UNUSED if i not in by_id else T.NORMAL if i not in added else
             T.CONTROL if added[i].special else T.USER_DEFINED for i in range(vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(name)
    w.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if i >= 0:
            getattr(w, f"add_{key}_token_id")(i)
    w.add_add_bos_token(tokenizer.adds_bos)
    w.add_add_eos_token(False)


def tensors(model):
    """(llama.cpp name, weight, heads) of every tensor the file holds, in the model's order; ``heads`` is
    set for the q and k projections, whose rows ``permute_rotary`` reorders as they are written."""
    import gguf
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when output is absent
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(name.split(".")[-2])
        yield names.get_name(name, try_suffixes=(".weight",)), w, heads


def ggml_type(w: torch.Tensor, kind: str):
    import gguf
    T = gguf.GGMLQuantizationType
    if w.dim() == 1 or kind == "f32":
        return T.F32
    if kind == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
        return T.F16
    return {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[kind]


def converted(w: torch.Tensor, qtype) -> np.ndarray:
    """``w`` as the bytes (or float array) a tensor of GGML type ``qtype`` holds."""
    import gguf
    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.F16):
        return w.to(torch.float32 if qtype == T.F32 else torch.float16).numpy()
    if qtype == T.BF16:  # the 16 bits of each bfloat16 (rounded to nearest even, as llama.cpp's converter does)
        return w.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(w.float().numpy(), qtype)


def write_gguf(path, model, tokenizer, kind="f16", name="model", chat_template=LLAMA2_JINJA, add_bos=True,
               add_eos=False, sampling: Sampling | None = None):
    """Write ``model`` and its ``tokenizer`` as the GGUF file ``path``, matrices in ``kind``.

    ``add_bos``/``add_eos``: whether a prompt starts with <s> / ends with </s> (for a SentencePiece
    tokenizer; Llama's defaults; a tokenizer.json says so itself).
    ``sampling`` (default: chat.py's defaults) becomes the file's sampling settings, which llama.cpp's
    tools start from unless told otherwise.
    """
    import gguf
    config = model.config
    check_fits(tokenizer, model)
    for module_name, m in projections(model):  # a projection left in NF4 (no LoRA on it) is written dense
        if isinstance(m, NF4Linear):
            dense = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            dense.weight = torch.nn.Parameter(m.weight.dequantize(model.model.norm.weight.dtype), requires_grad=False)
            set_module(model, module_name, dense)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    sampling = sampling or Sampling()
    w.add_sampling_temp(sampling.temperature)
    w.add_sampling_top_k(sampling.top_k)
    w.add_sampling_top_p(sampling.top_p)
    w.add_sampling_min_p(0.0)  # llama.cpp's own default is 0.05; chat.py has no such cut
    w.add_sampling_penalty_repeat(sampling.repetition_penalty)
    w.add_sampling_penalty_last_n(-1)  # the penalty counts every earlier token, as in chat.py
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    scaling = config.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])

    if isinstance(tokenizer, JsonTokenizer):
        bpe_vocabulary(w, tokenizer, config.vocab_size)
    else:
        sentencepiece_vocabulary(w, tokenizer, config.vocab_size, add_bos, add_eos)
    check_piece_lengths(tokenizer)
    w.add_chat_template(chat_template)

    plan = [(n, t, heads, ggml_type(t, kind)) for n, t, heads in tensors(model)]
    T = gguf.GGMLQuantizationType
    for n, t, _, qtype in plan:  # float16 (a q8_0 block's scale too) would turn larger values into infinities
        low, high = map(float, torch.aminmax(t))  # (a NaN is both)
        limit, largest = {T.F16: 65504.0, T.Q8_0: 65504.0 * 127}.get(qtype), max(-low, high)
        if not math.isfinite(largest):
            raise BailongError(f"{n} holds NaN or infinite values")
        if limit and largest > limit:
            raise BailongError(f"{n} holds values past what {kind} holds ({limit:g}): --type bf16 holds them")
    if scaling["rope_type"] == "llama3":  # llama.cpp divides each frequency by its factor in rope_freqs
        plain = rope_frequencies(replace(config, rope_scaling=None))
        plan.append(("rope_freqs.weight", plain / rope_frequencies(config), None, gguf.GGMLQuantizationType.F32))
    for n, t, _, qtype in plan:  # described as bytes: the writer turns them back into elements of qtype
        shape = gguf.quant_shape_to_byte_shape(t.shape, qtype)
        w.add_tensor_info(n, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, t, heads, qtype in tqdm(plan, desc=f"writing {kind} GGUF", unit="tensor", disable=BAR_HIDDEN, leave=False,
                                   file=sys.stderr):
        w.write_tensor_data(converted(permute_rotary(t, heads) if heads else t, qtype))
    w.close()
