"""GGUF export: the file read back with the gguf package's reader, and run in llama.cpp itself."""
import ctypes
import json
import os
import re
import shutil
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

import bailong
from bailong.adapter import save_adapter
from bailong.chat_template import LLAMA2_JINJA, llama2_ids, llama2_jinja, render_jinja
from bailong.config import ModelConfig
from bailong.errors import BailongError, BailongWarning
from bailong.export import main as export_main
from bailong.export_gguf import check_piece_lengths, permute_rotary
from bailong.lora import PROJECTIONS, LoRAConfig, inject_lora, merge_lora
from bailong.model import Llama, init_weights
from bailong.tokenizer import Tokenizer
from bailong.vocab import main as vocab_main
from bailong.zip_tie import extend_model
from bailong.training import SAMPLES
from conftest import ROOT, asset

gguf = pytest.importorskip("gguf", reason="the gguf package (requirements.txt) reads the files back")

TEXTS = ["臺灣的夜市有蚵仔煎和滷肉飯，颱風天學校停課。", "The quick brown fox jumps over the lazy dog; 42 apples cost $3.50.",
         "Llama 2 把臺灣說成 three bytes 一個字, isn't it 奇怪?", "😀🎉 𠮷野家 ㄅㄆㄇㄈ 龘 — ñandú façade"]
SHAPES = {  # a small Llama of each kind llama.cpp must read right
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),  # not hidden / heads
    "rope": dict(num_attention_heads=2, num_key_value_heads=2, rope_theta=5e5, rms_norm_eps=1e-6,
                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5, max_position_embeddings=1024,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Llama 2's tokenizer and the same extended with 600 Traditional Chinese pieces."""
    base = asset("llama2-tokenizer/tokenizer.model")
    out = tmp_path_factory.mktemp("vocab") / "tokenizer.model"
    vocab_main(["extend", "--base", str(base), "--corpus", str(SAMPLES / "zh_tw_sample.txt"),
                "--new-pieces", "600", "--out", str(out)])
    return Tokenizer(base), Tokenizer(out)


def make_run(folder, tokenizers, **shape):
    """A random base model with Llama 2's vocabulary and an adapter as training leaves it: the vocabulary
    extended (zip-tie), LoRA on every projection, embedding and head, and the extended tokenizer beside it.
    With tied embeddings the vocabulary stays (LoRA leaves a shared embedding alone, so an adapter cannot
    carry new rows for it). Returns the base folder, the adapter folder, the model (adapter applied, not
    merged) and its tokenizer."""
    base_tok, ext_tok = tokenizers
    config = ModelConfig(**{"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                            "vocab_size": base_tok.vocab_size, "max_position_embeddings": 256, **shape})
    torch.manual_seed(0)
    model = init_weights(Llama(config), std=0.1)
    with torch.no_grad():  # norms away from 1, so a norm written wrong shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    bailong.save(model, folder / "base")
    shutil.copy(base_tok.path, folder / "base" / "tokenizer.model")
    tied = config.tie_word_embeddings
    if not tied:
        extend_model(model, base_tok, ext_tok)
    lora = LoRAConfig(r=4, alpha=8, targets=PROJECTIONS if tied else LoRAConfig.targets)
    inject_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.05)
    save_adapter(model, folder / "adapter", lora)
    tokenizer = base_tok if tied else ext_tok
    shutil.copy(tokenizer.path, folder / "adapter" / "tokenizer.model")
    return folder / "base", folder / "adapter", model.eval(), tokenizer


def write(base, adapter, out, *extra):
    assert export_main(["--base", str(base), *(["--adapter", str(adapter)] if adapter else []), "--out", str(out),
                        *extra]) == 0
    return gguf.GGUFReader(out)


def value(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_every_tensor_piece_and_setting_reads_back(kind, tokenizers, tmp_path):
    base, adapter, model, tok = make_run(tmp_path, tokenizers, **SHAPES["gqa"])
    reader = write(base, adapter, tmp_path / "model.gguf", "--type", kind)
    merged = merge_lora(model, torch.float32).state_dict()
    found = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert len(found) == len(merged)
    for name, ours in merged.items():
        t = found[names.get_name(name, try_suffixes=(".weight",))]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = model.config.num_attention_heads if "q_proj" in name else model.config.num_key_value_heads
            ours = permute_rotary(ours, heads)
        theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(ours.shape)
        if ours.dim() == 1 or kind == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(theirs, ours), name
        elif kind in ("f16", "bf16"):
            dtype = torch.float16 if kind == "f16" else torch.bfloat16
            assert t.tensor_type.name == kind.upper() and torch.equal(theirs, ours.to(dtype).float()), name
        else:  # each block of 32 to within half its step d = max |w| / 127, plus up to 127 times the rounding
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0  # of d to float16 (2^-11 d)
            blocks, error = ours.reshape(-1, 32), (theirs - ours).reshape(-1, 32)
            step = blocks.abs().amax(1, keepdim=True) / 127
            assert (error.abs() <= (0.5 + 127 * 2**-11) * step + 1e-7).all(), name
            assert error.abs().max() > 0.4 * step.max()  # and rounded: not stored in a finer type

    proto = tokenizers[1].proto()
    assert value(reader, "tokenizer.ggml.model") == "llama"
    assert value(reader, "tokenizer.ggml.tokens") == [p.piece for p in proto.pieces]
    assert value(reader, "tokenizer.ggml.scores") == pytest.approx([p.score for p in proto.pieces])
    assert value(reader, "tokenizer.ggml.token_type") == [p.type for p in proto.pieces]  # the same numbering
    assert [value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown")] == [1, 2, 0]
    new = [p.piece for p in proto.pieces[32000:]]
    assert len(new) == 600 and all(any("\u4e00" <= c <= "\u9fff" for c in piece) for piece in new)
    config = model.config
    assert {k: value(reader, f"llama.{k}") for k in ("context_length", "embedding_length", "block_count",
                                                    "feed_forward_length", "vocab_size", "rope.dimension_count",
                                                    "attention.head_count", "attention.head_count_kv")} == \
        {"context_length": 256, "embedding_length": 64, "block_count": 2, "feed_forward_length": 96,
         "vocab_size": 32600, "rope.dimension_count": 16, "attention.head_count": 4, "attention.head_count_kv": 2}
    assert value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert value(reader, "llama.rope.freq_base") == config.rope_theta
    assert value(reader, "general.architecture") == "llama" and value(reader, "general.name") == "model"
    assert value(reader, "tokenizer.chat_template") == LLAMA2_JINJA
    assert [value(reader, f"general.sampling.{k}") for k in ("temp", "top_k", "top_p", "penalty_repeat", "min_p")] \
        == pytest.approx([0.6, 40, 0.9, 1.1, 0.0])  # chat.py's defaults


def test_the_llama2_template_gives_the_tokens_chat_uses(tokenizers, tmp_path):
    """For a SentencePiece model and a byte-level BPE one (whose answer, encoded alone, begins with no space: the
    template wrote one, and llama.cpp read an answer of the history otherwise than training had)."""
    from bpe_models import bpe_folder

    from bailong.tokenizer import open_tokenizer, tokenizer_settings
    bpe = open_tokenizer(bpe_folder(tmp_path))
    for tok, specials in [(tokenizers[1], {"bos_token": "<s>", "eos_token": "</s>"}),
                          (bpe, {k: tokenizer_settings(tmp_path)[k] for k in ("bos_token", "eos_token")})]:
        for messages in ([{"role": "user", "content": " 臺灣最高的山？ "}],
                         [{"role": "system", "content": "Answer in Traditional Chinese."},
                          {"role": "user", "content": "Where is Taiwan?"},
                          {"role": "assistant", "content": " 東亞。 "}, {"role": "user", "content": "謝謝!"},
                          {"role": "assistant", "content": "In Asia."}]):
            assert tok.encode_chat(render_jinja(llama2_jinja(tok), messages, specials), specials) == \
                llama2_ids(tok, messages)


def test_a_model_template_and_token_settings_are_kept_and_nothing_partial_is_left(tokenizers, tmp_path, monkeypatch):
    base, adapter, _, _ = make_run(tmp_path, tokenizers, **SHAPES["gqa"])
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "add_bos_token": False}))
    (base / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.3, "top_k": 5}))
    reader = write(base, adapter, tmp_path / "model.gguf")
    assert value(reader, "tokenizer.chat_template") == template
    assert value(reader, "tokenizer.ggml.add_bos_token") is False
    assert [value(reader, f"general.sampling.{k}") for k in ("temp", "top_k", "top_p")] == pytest.approx([0.3, 5, 1.0])
    assert reader.tensors[0].tensor_type == gguf.GGMLQuantizationType.F16  # the default for a float32 model
    before = (tmp_path / "model.gguf").read_bytes()

    import bailong.export_gguf
    def fail(*args):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(bailong.export_gguf, "converted", fail)
    with pytest.raises(RuntimeError):
        export_main(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "model.gguf"),
                     "--overwrite", "--type", "bf16"])
    with pytest.raises(RuntimeError):
        export_main(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "new.gguf")])
    assert (tmp_path / "model.gguf").read_bytes() == before  # the earlier file whole, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "model.gguf"]
    (tmp_path / "token").write_text("hf_secret")  # a cloned folder's template: a link to the user's Hub token
    (base / "tokenizer_config.json").unlink()
    os.symlink(tmp_path / "token", base / "chat_template.jinja")
    with pytest.raises(BailongError, match="chat_template.jinja: is a link to .*, outside its folder"):
        export_main(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "new.gguf")])
    assert not (tmp_path / "new.gguf").exists()


def test_what_llama_cpp_would_read_differently_is_refused(tokenizers, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb
    base, adapter, _, _ = make_run(tmp_path, tokenizers, **SHAPES["gqa"])
    proto = tokenizers[0].proto()
    for change, expected in [("model_type", "a UNIGRAM SentencePiece model; llama.cpp's Llama tokenizer reproduces "
                                            "BPE models only"),
                             ("normalizer", "normalizes text (nmt_nfkc), which llama.cpp's Llama tokenizer does not")]:
        changed = pb.ModelProto()
        changed.CopyFrom(proto)
        if change == "model_type":
            changed.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
        else:
            changed.normalizer_spec.name = "nmt_nfkc"
        (base / "tokenizer.model").write_bytes(changed.SerializeToString())
        with pytest.raises(BailongError, match=re.escape(expected)):
            export_main(["--base", str(base), "--out", str(tmp_path / "model.gguf")])
    (base / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                  "model_type": "mistral"}))
    with pytest.raises(BailongError, match="unsupported architecture MistralForCausalLM"):
        export_main(["--base", str(base), "--out", str(tmp_path / "model.gguf")])
    (base / "config.json").write_text(json.dumps(config))
    (base / "tokenizer_config.json").write_text(json.dumps({"legacy": False}))  # (TinyLlama-Chat's): said, not refused
    said = re.escape("tokenizer.model: read as legacy false, as the model's tokenizer_config.json says")
    with pytest.warns(BailongWarning, match=said):
        write(base, None, tmp_path / "legacy.gguf")
    with pytest.warns(BailongWarning, match=said):  # a run's adapter, its grown tokenizer.model read as its base's
        write(base, adapter, tmp_path / "legacy.gguf", "--overwrite")
    (base / "tokenizer_config.json").unlink()
    from bpe_models import SPLIT, bpe_folder
    (base / "tokenizer.model").unlink()
    bpe_folder(base)  # a byte-level BPE tokenizer.json, with a pre-tokenizer llama.cpp does not know by name
    (base / "tokenizer.json").write_text((base / "tokenizer.json").read_text().replace(
        json.dumps(SPLIT)[1:-1], json.dumps(SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"))[1:-1]))
    with pytest.raises(BailongError, match=re.escape("tokenizer.json: a pre-tokenizer or normalizer llama.cpp "
                                                      "does not know by name")):
        export_main(["--base", str(base), "--out", str(tmp_path / "model.gguf")])
    (base / "tokenizer.json").unlink()
    with pytest.raises(BailongError, match=re.escape("no tokenizer.model or tokenizer.json; a GGUF file carries")):
        export_main(["--base", str(base), "--out", str(tmp_path / "model.gguf")])
    assert not (tmp_path / "model.gguf").exists()


# llama.cpp itself: its Python binding builds it from source (a test requirement; about 3.5 minutes on 2 cores).

def llama_cpp_model(path, **options):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (requirements-test.txt)")
    # The weights as written: where the CPU reports Intel AMX, llama.cpp (as 0.3.36 builds it) repacks q8_0
    # weights for AMX, and there its AMX matmul has crashed the whole process (SIGSEGV in
    # ggml_backend_amx_mul_mat, outside Python too, at every model size tried up to 512 x 1024). This option
    # of llama.cpp's is not one of Llama()'s arguments.
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def as_written():
        params = defaults()
        params.use_extra_bufts = False
        return params
    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", as_written):
        return llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=256, n_threads=2,
                               type_k=0, type_v=0, **options)  # a float32 KV cache: nothing rounded but the weights


@pytest.mark.parametrize("kind, tolerance", [("f32", 1e-5), ("f16", 3e-3), ("bf16", 2e-2), ("q8_0", 6e-2)])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_llama_cpp_reads_the_file_as_we_compute_it(shape, kind, tolerance, tokenizers, tmp_path):
    """Same token ids for Chinese, English, mixed and rare text, and the same logits: to float32's rounding
    for f32; else to the weight type's, which llama.cpp also applies to the activations of each matmul
    (measured: 1e-3 of the logits' size for f16, 7e-3 for bf16, 2.5e-2 for q8_0 (3.5e-2 with rope scaling))."""
    base, adapter, model, tok = make_run(tmp_path, tokenizers, **SHAPES[shape])
    reader = write(base, adapter, tmp_path / "model.gguf", "--type", kind)
    assert ("output.weight" in {t.name for t in reader.tensors}) != model.config.tie_word_embeddings
    compare_with_llama_cpp(tmp_path / "model.gguf", model, tok, tolerance, kind in ("f32", "f16"))


def test_a_merged_folder_with_padded_embeddings_runs_in_llama_cpp(tokenizers, tmp_path):
    """No adapter, and five embedding rows past the tokenizer (a vocabulary padded for speed): they are
    written as unused [PAD] tokens, and llama.cpp's logits for them match ours too."""
    base, _, model, tok = make_run(tmp_path, tokenizers, **SHAPES["gqa"])
    from bailong.zip_tie import resize_vocab
    model = merge_lora(model)
    resize_vocab(model, model.config.vocab_size + 5)
    bailong.save(model, tmp_path / "merged")
    shutil.copy(tok.path, tmp_path / "merged" / "tokenizer.model")
    reader = write(tmp_path / "merged", None, tmp_path / "merged.gguf", "--type", "f32")
    assert value(reader, "tokenizer.ggml.tokens")[-5:] == [f"[PAD{i}]" for i in range(32600, 32605)]
    assert value(reader, "tokenizer.ggml.token_type")[-5:] == [gguf.TokenType.UNUSED] * 5
    compare_with_llama_cpp(tmp_path / "merged.gguf", model, tok, 1e-5, True)


def compare_with_llama_cpp(path, model, tok, tolerance, same_argmax):
    llm = llama_cpp_model(path)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text, bos=True), text
    ids = tok.encode(" ".join(TEXTS), bos=True)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    error = (theirs - ours).norm() / ours.norm()
    assert theirs.shape == ours.shape and error < tolerance, f"logits {error:.2e} apart (root mean square, relative)"
    if same_argmax:
        assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95


def test_llama_cpp_answers_a_trained_run_as_we_do_and_formats_its_chat_alike(tmp_path):
    """A real training output (Llama 2 chat format, extended vocabulary) exported whole: the same greedy
    answer token for token, and llama.cpp's own chat formatting recognises the template."""
    import subprocess
    import sys
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "--steps", "20", "--new-pieces", "100",
                            "--out", str(run)], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert export_main(["--base", str(run), "--out", str(tmp_path / "run.gguf"), "--type", "f32"]) == 0
    model, tok = bailong.load(run, device="cpu")
    messages = [{"role": "system", "content": "用繁體中文回答。"}, {"role": "user", "content": "臺灣的夜市"}]
    prompt = llama2_ids(tok, messages)
    greedy = bailong.Sampling(temperature=0, repetition_penalty=1.0)
    ours = bailong.generate(model, prompt, max_new_tokens=24, sampling=greedy, stop_ids=[tok.eos_id])
    ours = ours[:-1] if ours[-1] == tok.eos_id else ours
    llm = llama_cpp_model(tmp_path / "run.gguf")
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if token == tok.eos_id or len(theirs) == 24:
            break
        theirs.append(token)
    assert theirs == ours and ours, tok.decode(ours)

    import llama_cpp
    template = gguf.GGUFReader(tmp_path / "run.gguf").fields["tokenizer.chat_template"].contents()
    chat = (llama_cpp.llama_chat_message * 2)(*[llama_cpp.llama_chat_message(role=m["role"].encode(),
                                                                             content=m["content"].encode())
                                                for m in messages])
    buffer = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, 2, True, buffer, len(buffer))
    assert n > 0, "llama.cpp does not recognise the chat template"
    text = buffer.raw[:n].decode()
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == prompt, text


def test_weights_that_are_not_finite_or_past_float16_are_refused_not_written(tokenizers, tmp_path, capsys):
    """A diverged run's NaN adapter was merged and written (a folder, a GGUF file) without a word, and weights
    past float16's 65504 became infinities in a float16 folder or an f16 GGUF file: each is refused, naming the
    tensor, and nothing is written."""
    from safetensors.torch import load_file, save_file

    from bailong.errors import run_cli
    base, adapter, _, _ = make_run(tmp_path, tokenizers, **SHAPES["gqa"])

    def refused(*argv):
        with pytest.raises(SystemExit) as exit_:
            run_cli(export_main, list(map(str, argv)))
        assert exit_.value.code == 1
        return capsys.readouterr().err.strip()
    big = load_file(base / "model.safetensors")
    big["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e5
    save_file(big, tmp_path / "big.safetensors")  # a base whose one weight float16 cannot hold
    (base / "model.safetensors").replace(tmp_path / "plain.safetensors")
    (tmp_path / "big.safetensors").replace(base / "model.safetensors")
    assert refused("--base", base, "--out", tmp_path / "half", "--dtype", "float16") == \
        f"error: {base}: model.layers.1.mlp.down_proj.weight holds NaN or infinite values (past float16's " \
        "largest, 65504 (--dtype bfloat16 holds them), or damaged weights)"
    assert refused("--base", base, "--out", tmp_path / "half.gguf") == \
        "error: blk.1.ffn_down.weight holds values past what f16 holds (65504): --type bf16 holds them"
    write(base, None, tmp_path / "whole.gguf", "--type", "bf16")
    (tmp_path / "plain.safetensors").replace(base / "model.safetensors")
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(n for n in weights if "lora_B" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors")
    for out in (tmp_path / "nan", tmp_path / "nan.gguf"):
        assert refused("--base", base, "--adapter", adapter, "--out", out) == f"error: {adapter}: merged, " \
            f"{name.split('.lora_B')[0][17:]}.weight holds NaN or infinite values (weights a run that diverged left)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "whole.gguf"]


def test_pieces_longer_than_32_bytes_are_warned_of_as_llama_cpp_python_drops_them(tokenizers, tmp_path):
    """A grown vocabulary's long words (11 characters or more of a script of three bytes each: a Thai corpus gave
    41 of 500 new pieces past 32 bytes) came out of llama-cpp-python's decoding as nothing, without a word."""
    proto = tokenizers[0].proto()
    proto.pieces.add(piece="\u2581" + "ทุกเช้า" * 2, score=-1e5, type=proto.pieces[300].NORMAL)  # 1 + 42 bytes
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(proto.pieces), max_position_embeddings=64)
    bailong.save(init_weights(Llama(config)), tmp_path / "base")
    with pytest.warns(BailongWarning, match="pieces longer than 32 bytes: 1, of up to 43 bytes; llama.cpp"):
        write(tmp_path / "base", None, tmp_path / "long.gguf")
    assert llama_cpp_model(tmp_path / "long.gguf", vocab_only=True).detokenize([32000]) == b""  # what it warns of
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Llama 2's own pieces: none so long
        check_piece_lengths(tokenizers[0])
