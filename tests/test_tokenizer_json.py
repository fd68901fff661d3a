"""tokenizer.json models (byte-level BPE, as Llama 3 and SmolLM2 ship them): our tokenizer against
transformers' AutoTokenizer, and load, chat and generate on a Llama 3-style model."""
import json
import shutil
import subprocess
import sys

import pytest
from bpe_models import LLAMA3_TEMPLATE, TEXTS, bpe_folder
from hf_models import write_hf
from transformers import AutoTokenizer

import bailong
from bailong.chat_template import jinja_template
from bailong.conversation import Chat
from bailong.errors import BailongError
from bailong.tokenizer import JsonTokenizer, open_tokenizer
from bailong.training import SAMPLES
from conftest import ROOT


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A random Llama 3-style model (grouped-query, tied embeddings, llama3 RoPE) with that tokenizer."""
    tmp = tmp_path_factory.mktemp("llama3")
    tokenizer = JsonTokenizer(bpe_folder(tmp / "tok") / "tokenizer.json")
    folder, _ = write_hf(tmp, "tied", vocab_size=tokenizer.vocab_size, bos_token_id=0, eos_token_id=1,
                         rope_theta=500000.0, max_position_embeddings=256,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tmp / "tok" / name).read_bytes())
    return folder


def test_a_document_begins_with_bos_where_a_prompt_does(llama3, tmp_path):
    """Pre-training puts bos before a document only where the tokenizer begins a prompt with it (Llama 3's
    post-processor does; SmolLM2's tokenizer, whose bos is its eos, adds nothing): the documents begin as
    transformers' tokenizer begins a text."""
    from bailong.token_cache import tokenize
    for name, processor in (("llama3", True), ("smollm2", False)):
        folder = tmp_path / name
        shutil.copytree(llama3, folder)
        if not processor:
            data = json.loads((folder / "tokenizer.json").read_text())
            (folder / "tokenizer.json").write_text(json.dumps({**data, "post_processor": None}))
            (folder / "tokenizer_config.json").write_text(json.dumps(
                {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"}))
        ours, theirs = JsonTokenizer(folder / "tokenizer.json"), AutoTokenizer.from_pretrained(folder)
        assert ours.adds_bos == processor
        ids, _, _ = tokenize(ours, ["臺灣 text"], tmp_path / "cache", 1)
        assert list(ids) == theirs("臺灣 text")["input_ids"] + [theirs.eos_token_id], name


def test_special_tokens_are_found_where_transformers_finds_them(llama3, tmp_path):
    """special_tokens_map.json's tokens stand over tokenizer_config.json's, and with neither file bos is the
    token the post-processor begins a prompt with: read from tokenizer_config.json alone, pre-training joined
    such a model's documents with nothing between them. The token cache is keyed by bos and eos too: a new eos
    in tokenizer_config.json was trained on with the old one's cached ids."""
    from bailong.token_cache import tokenize
    folder = tmp_path / "map"
    shutil.copytree(llama3, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|begin_of_text|>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end_of_text|>", "bos_token": {
        "content": "<|begin_of_text|>"}}))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(llama3 / "tokenizer.json", alone)
    for where in (folder, alone):
        ours, theirs = JsonTokenizer(where / "tokenizer.json"), AutoTokenizer.from_pretrained(where)
        assert (ours.bos_id, ours.eos_id) == (0, theirs.eos_token_id if where == folder else -1) and ours.adds_bos
        assert ours.encode("臺灣", bos=True) == theirs("臺灣").input_ids
    saved = tmp_path / "saved"  # and the settings saved with the tokenizer are ones transformers reads
    saved.mkdir()
    JsonTokenizer(folder / "tokenizer.json").save(saved)
    assert AutoTokenizer.from_pretrained(saved)("臺灣").input_ids == ours.encode("臺灣", bos=True)
    newer = tmp_path / "newer"  # a tokenizer_config.json with added_tokens_decoder (transformers 4.34 on) wins
    shutil.copytree(folder, newer)
    (newer / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>", "added_tokens_decoder": {
        "4": {"content": "<|eot_id|>", "special": True}}}))
    assert JsonTokenizer(newer / "tokenizer.json").eos_id == AutoTokenizer.from_pretrained(newer).eos_token_id == 4
    before = tokenize(JsonTokenizer(folder / "tokenizer.json"), ["臺灣"], tmp_path / "cache", 1)[0].tolist()
    (folder / "special_tokens_map.json").unlink()
    after = tokenize(JsonTokenizer(folder / "tokenizer.json"), ["臺灣"], tmp_path / "cache", 1)[0].tolist()
    assert before[-1] == 1 and after[-1] == 0 and before[:-1] == after[:-1]


def test_a_pretraining_run_resumes_only_with_its_tokenizer_s_bos_and_eos(llama3, tmp_path, capsys):
    """A new eos in the base's tokenizer_config.json changes every document's last token: the run is not
    continued with it; other settings (a chat template) change no token, and a run an earlier version started
    (which recorded no special tokens) is continued."""
    from train_runs import losses, run_train
    folder = tmp_path / "base"
    shutil.copytree(llama3, folder)
    args = ["--model", folder, "--new-pieces", "0", "--eval-every", "2", "--out", tmp_path / "run"]
    run_train(capsys, *args, "--steps", "2")
    config = folder / "tokenizer_config.json"
    settings = config.read_text()
    config.write_text(json.dumps({**json.loads(settings), "eos_token": "<|begin_of_text|>"}))
    _, err = run_train(capsys, *args, "--steps", "3", "--resume", code=2)
    assert "the tokenizer's bos and eos differ from those the run started with; choose another --out" in err
    config.write_text(json.dumps({**json.loads(settings), "chat_template": "{{ messages }}", "model_max_length": 9}))
    run_train(capsys, *args, "--steps", "3", "--resume")  # settings that change no token of the documents
    config.write_text(settings)
    run_json = tmp_path / "run" / "run.json"
    earlier = json.loads(run_json.read_text())
    del earlier["inputs"]["specials"]
    run_json.write_text(json.dumps(earlier))
    run_train(capsys, *args, "--steps", "4", "--resume")
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3, 4]


def test_pretraining_warns_where_nothing_separates_the_documents(llama3, tmp_path, capsys):
    """A tokenizer.json with no settings and a post-processor that adds nothing names no bos and no eos: its
    documents run into each other, which the run says."""
    from train_runs import run_train
    folder = tmp_path / "bare"
    shutil.copytree(llama3, folder)
    (folder / "tokenizer_config.json").unlink()
    data = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**data, "post_processor": None}))
    _, err = run_train(capsys, "--model", folder, "--new-pieces", "0", "--steps", "1", "--out", tmp_path / "run")
    assert f"warning: {folder / 'tokenizer.json'}: has neither a bos nor an eos token" in err
    _, err = run_train(capsys, "--model", llama3, "--new-pieces", "0", "--steps", "1", "--out", tmp_path / "run2")
    assert "has neither a bos nor an eos" not in err


def test_ids_and_text_equal_transformers(llama3):
    ours, theirs = open_tokenizer(llama3), AutoTokenizer.from_pretrained(llama3)
    assert isinstance(ours, JsonTokenizer) and (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, -1)
    for text in TEXTS:
        assert ours.encode(text, bos=True) == theirs(text).input_ids, text
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids
        assert ours.decode(ours.encode(text, bos=True, eos=True)) == text
    chinese = ours.encode(TEXTS[1])
    assert len(chinese) < len(TEXTS[1].encode())  # merges learned on the samples, not only bytes


def test_special_tokens_written_in_a_document_are_text(llama3):
    """A document (or a message) that writes <|end_of_text|> was ended there by its eos id, only for tokenizer.json
    models (SentencePiece reads </s> in text as text); chat text, as a template renders it, takes the ids."""
    ours, theirs = open_tokenizer(llama3), AutoTokenizer.from_pretrained(llama3)
    text = "a page that writes <|end_of_text|> and <|eot_id|> in its text"
    assert ours.eos_id not in ours.encode(text) and ours.decode(ours.encode(text)) == text
    assert ours.encode(text) == theirs(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert ours.encode_chat(text, {}) == theirs(text, add_special_tokens=False).input_ids
    assert ours.eos_id in ours.encode_chat(text, {}) and ours.eos_id not in ours.encode(text)


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
    assert chat.stop_ids == {1, 4}  # the model's eos (<|end_of_text|>) and the template's <|eot_id|>
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


def test_a_template_in_chat_template_jinja_is_read_first(llama3, tmp_path):
    """transformers saves a chat template in chat_template.jinja, and reads that file before tokenizer_config.json's
    chat_template; so do chat, SFT and the exports, for tokenizer.json and SentencePiece models alike."""
    import shutil

    from bailong.chat_template import model_template
    saved = tmp_path / "saved"
    AutoTokenizer.from_pretrained(llama3).save_pretrained(saved)
    if (saved / "chat_template.jinja").exists():  # as transformers 5 saves it
        assert jinja_template(saved)[0] == LLAMA3_TEMPLATE == model_template(open_tokenizer(saved))[0]
    folder = shutil.copytree(llama3, tmp_path / "model")
    other = LLAMA3_TEMPLATE.replace("<|eot_id|>", "<|end_of_text|>")
    (folder / "chat_template.jinja").write_text(other)
    assert AutoTokenizer.from_pretrained(folder).chat_template == other
    assert jinja_template(folder)[0] == other == model_template(open_tokenizer(folder))[0]
    (folder / "tokenizer.json").unlink()  # a SentencePiece model's folder reads it too
    assert jinja_template(folder)[0] == other
    (folder / "chat_template.jinja").write_bytes(b"{{ '\xff' }}")
    with pytest.raises(BailongError, match="chat_template.jinja: not UTF-8"):
        jinja_template(folder)


def test_a_broken_tokenizer_json_is_one_line(tmp_path):
    assert open_tokenizer(tmp_path) is None  # a folder without a tokenizer
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(BailongError, match="tokenizer.json: not a tokenizer.json"):
        open_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": []}}')  # read, but no use
    with pytest.raises(BailongError, match=r"tokenizer.json: not a usable tokenizer.json \(it cannot encode "):
        open_tokenizer(tmp_path)


def test_compare_init_measures_a_bpe_model(llama3, tmp_path, capsys):
    from bailong.vocab import main as vocab_main
    from bailong.zip_tie import METHODS
    out = tmp_path / "extended.json"
    corpus = str(SAMPLES / "zh_tw_sample.txt")
    vocab_main(["extend", "--base", str(llama3 / "tokenizer.json"), "--corpus", corpus, "--new-pieces", "50",
                "--out", str(out)])
    capsys.readouterr()
    vocab_main(["compare-init", "--model", str(llama3), "--base-tokenizer", str(llama3 / "tokenizer.json"),
                "--extended-tokenizer", str(out), "--text", corpus, "--max-chars", "400"])
    printed = capsys.readouterr().out
    for method in METHODS:
        assert f"extended, {method}" in printed
    assert "nan" not in printed


def test_both_stages_run_on_a_tied_bpe_model_and_chat_in_its_template(llama3, tmp_path):
    """Pre-training extends the tokenizer.json and keeps the tied embedding (with its new rows) in the
    adapter; SFT learns the model's own chat template, which chat.py then uses; the merged export carries
    the extended tokenizer.json, which transformers reads with the same ids."""
    run, sft = tmp_path / "run", tmp_path / "sft"
    common = ["--steps", "4", "--eval-every", "2", "--save-every", "2"]
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(llama3), "--new-pieces", "30",
                             *common, "--out", str(run)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tied embeddings: LoRA on the projections only; the embedding" in result.stdout + result.stderr
    model, tok = bailong.load(run, device="cpu")
    assert isinstance(tok, JsonTokenizer) and tok.vocab_size == model.config.vocab_size == 730
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.settings["chat_template"] == LLAMA3_TEMPLATE
    export = subprocess.run([sys.executable, "-m", "bailong.export", "--base", str(run), "--out",
                             str(tmp_path / "merged")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert export.returncode == 0, export.stderr[-2000:]
    theirs = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert theirs(TEXTS[1]).input_ids == tok.encode(TEXTS[1], bos=True)
    from bailong.export import main as export_main
    from test_export_gguf import compare_with_llama_cpp
    assert export_main(["--base", str(run), "--out", str(tmp_path / "run.gguf"), "--type", "f32"]) == 0
    compare_with_llama_cpp(tmp_path / "run.gguf", model, tok, 1e-5, True)  # the extended vocabulary, in llama.cpp

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", "sft", "--init", str(run), *common,
                             "--out", str(sft)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "chat format: the model's chat_template" in result.stdout + result.stderr
    chat = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(sft), "--prompt", "臺灣的夜市", "--temperature",
                           "0", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and "tokens, " in chat.stderr, chat.stderr


def test_an_sft_example_in_the_template_is_transformers_ids_with_the_answers_learned(llama3):
    from bailong.chat_template import model_template, template_example
    tok = open_tokenizer(llama3)
    messages = [{"role": "system", "content": "用繁體中文回答。"}, {"role": "user", "content": "臺灣的夜市?"},
                {"role": "assistant", "content": "很熱鬧。"}, {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "Food, 小吃 and lights."}]
    ids, labels = template_example(tok, model_template(tok), messages)
    expected = AutoTokenizer.from_pretrained(llama3).apply_chat_template(messages, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    learned = [i for i, label in zip(ids, labels) if label != -100]
    assert learned == tok.encode("很熱鬧。") + [4] + tok.encode("Food, 小吃 and lights.") + [4]



def test_a_template_that_ends_only_the_last_answer_with_eos_is_learned_and_one_that_moves_its_prompt_refused(
        llama3):
    """Phi-3's template writes eos after the last message alone: each earlier answer was refused as not the
    start of its continuation, for every conversation; an answer beginning with a new line after a prompt that
    ends with one is the token transformers makes of both (encoded apart, BPE merged nothing across them).
    A template whose generation prompt the conversation does not go on with cannot be learned from: said so."""
    from bailong.chat_template import template_example
    phi3 = ("{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '\n' + message['content'] + "
            "'<|eot_id|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\n' }}"
            "{% else %}{{ eos_token }}{% endif %}")
    tok = open_tokenizer(llama3)
    theirs = AutoTokenizer.from_pretrained(llama3)
    messages = [{"role": "user", "content": "臺灣?"}, {"role": "assistant", "content": "\n很熱鬧。"},
                {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Food."}]
    ids, labels = template_example(tok, (phi3, {"eos_token": "<|end_of_text|>"}), messages)
    assert ids == list(theirs.apply_chat_template(messages, chat_template=phi3, tokenize=True, return_dict=True)
                       ["input_ids"])
    assert tok.decode([i for i in labels if i != -100]) == "\n很熱鬧。\nFood.\n"
    learned = [i for i in labels if i != -100]
    assert learned.count(4) == 2 and labels[-1] == 1 and 2 not in learned  # each <|eot_id|> and the last eos,
    # not the next turn's <|start_header_id|>, which begins as the eos does ("<|")
    moving = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<think>{% endif %}"
    with pytest.raises(ValueError, match="the chat template writes the conversation on otherwise than its "
                                         "generation prompt asks"):
        template_example(tok, (moving, {}), messages)
    qwen3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '\n' }}{% generation %}{% if m['role'] =="
             " 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] + '<|eot_id|>' }}"
             "{% endgeneration %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant\n' }}"
             "{% endif %}")  # an empty reasoning before the last answer alone; transformers' {% generation %} tag
    ids, labels = template_example(tok, (qwen3, {}), messages)
    assert ids == list(theirs.apply_chat_template(messages, chat_template=qwen3, tokenize=True, return_dict=True)
                       ["input_ids"])
    assert tok.decode([i for i in labels if i != -100]) == "\n很熱鬧。<think>\n\n</think>\n\nFood."
    assert [i for i in labels if i != -100].count(4) == 2  # the first answer's end too: it was refused
    dropping = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split("
                "'</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")  # earlier reasoning dropped
    thinking = [messages[0], {"role": "assistant", "content": "<think>hm</think>Yes."}, *messages[2:]]
    with pytest.raises(ValueError, match="the chat template does not write an answer's text as the conversation "
                                         "gives it"):  # its first answer was learned as nothing, silently
        template_example(tok, (dropping, {}), thinking)
