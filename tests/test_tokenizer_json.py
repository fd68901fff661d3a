"""tokenizer.json models (byte-level BPE, as Llama 3 and SmolLM2 ship them): our tokenizer against
transformers' AutoTokenizer, and load, chat and generate on a Llama 3-style model."""
import json
import subprocess
import sys

import pytest
from hf_models import write_hf
from transformers import AutoTokenizer

import bailong
from bailong.chat_template import jinja_template
from bailong.conversation import Chat
from bailong.errors import BailongError
from bailong.tokenizer import JsonTokenizer, open_tokenizer
from conftest import ROOT

TEXTS = ["The quick brown fox jumps over the lazy dog; 42 apples cost $3.50 (really).",
         "臺灣的夜市有蚵仔煎和滷肉飯，颱風天學校停課。", "😀🎉 𠮷野家 ㄅㄆㄇㄈ 龘 ∑∫ — ñandú façade",
         "Llama 3 把臺灣說成 three bytes 一個字, isn't it 奇怪?\n\n  indented\tand tabbed  "]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama 3's pre-tokenizer split (words, 1-3 digits, punctuation runs, whitespace), then bytes as characters
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")


def bpe_folder(folder, vocab_size=700):
    """A small Llama 3-style tokenizer (byte-level BPE trained on the project's samples, <|begin_of_text|>
    added in front by its post-processor) with its tokenizer_config.json; returns the folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    samples = [(ROOT / "bailong" / "data" / f).read_text() for f in ("zh_tw_sample.txt", "en_sample.txt")]
    tk.train_from_iterator(samples, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A random Llama 3-style model (grouped-query, tied embeddings, llama3 RoPE) with that tokenizer."""
    tmp = tmp_path_factory.mktemp("llama3")
    tokenizer = JsonTokenizer(bpe_folder(tmp / "tok") / "tokenizer.json")
    folder, _ = write_hf(tmp, "tied", vocab_size=tokenizer.vocab_size, bos_token_id=0, eos_token_id=4,
                         rope_theta=500000.0, max_position_embeddings=256,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tmp / "tok" / name).read_bytes())
    return folder


def test_ids_and_text_equal_transformers(llama3):
    ours, theirs = open_tokenizer(llama3), AutoTokenizer.from_pretrained(llama3)
    assert isinstance(ours, JsonTokenizer) and (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 4, -1)
    for text in TEXTS:
        assert ours.encode(text, bos=True) == theirs(text).input_ids, text
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
        assert ours.decode(ours.encode(text, bos=True, eos=True)) == text
    chinese = ours.encode(TEXTS[1])
    assert len(chinese) < len(TEXTS[1].encode())  # merges learned on the samples, not only bytes


def test_streaming_never_prints_half_a_character(llama3):
    tok = open_tokenizer(llama3)
    text = " ".join(TEXTS)
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some ids carry part of a character
    stream = tok.stream()
    chunks = [stream.put(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == text and not any("\ufffd" in c for c in chunks)


def test_load_chat_and_generate_on_a_llama3_style_model(llama3):
    model, tok = bailong.load(llama3, device="cpu")
    assert isinstance(tok, JsonTokenizer) and model.config.rope_scaling["rope_type"] == "llama3"
    messages = [{"role": "system", "content": "用繁體中文回答。"}, {"role": "user", "content": "臺灣的夜市?"},
                {"role": "assistant", "content": "很熱鬧。"}, {"role": "user", "content": "Why?"}]
    chat = Chat(model, tok, jinja_template(llama3), bailong.Sampling(temperature=0), 8)
    expected = AutoTokenizer.from_pretrained(llama3).apply_chat_template(messages, add_generation_prompt=True,
                                                                         tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert chat.encode(messages) == list(expected)
    assert expected.count(4) == 4 and expected[0] == 0  # the template's <|eot_id|> and bos are special ids
    answer = bailong.generate(model, chat.encode(messages), max_new_tokens=8,
                              sampling=bailong.Sampling(temperature=0))
    assert 0 < len(answer) <= 8
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(llama3), "--prompt", "臺灣的夜市",
                             "--temperature", "0", "--max-new-tokens", "6"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "tokens, " in result.stderr, result.stderr


def test_a_broken_tokenizer_json_is_one_line(tmp_path):
    assert open_tokenizer(tmp_path) is None  # a folder without a tokenizer
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(BailongError, match="tokenizer.json: not a tokenizer.json"):
        open_tokenizer(tmp_path)


def test_training_such_a_model_is_refused_in_one_line(llama3, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(llama3), "--steps", "1",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {llama3}: its tokenizer is byte-level BPE " \
        "(tokenizer.json); training needs a SentencePiece tokenizer.model (byte-level BPE models load and chat, " \
        "but are not trained yet)"
    assert not (tmp_path / "run").exists()
