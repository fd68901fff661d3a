"""chat.py's formats and commands: Jinja chat templates as transformers renders them, generation
config defaults, /reset /system /save, and batch answers from a jsonl file."""
import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import bailong
import chat
from bailong import conversation
from bailong.chat_template import jinja_template, render_jinja
from bailong.generation import SAMPLING, model_sampling
from conftest import ROOT, asset

LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CHATML = (
    "{% for message in messages %}\n{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim "
    "+ '<|im_end|>' + '\\n' }}\n{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "請用繁體中文回答。"}, {"role": "user", "content": "你好"},
     {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "  臺灣的夜市？ "}],
]


@pytest.fixture
def model_folder(tmp_path):
    from hf_models import write_hf
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32000, max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), folder / "tokenizer.model")
    return folder


@pytest.mark.parametrize("template", [LLAMA2_CHAT, CHATML])
def test_templates_render_as_transformers_renders_them(model_folder, template):
    (model_folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    theirs = AutoTokenizer.from_pretrained(model_folder)
    found, specials = jinja_template(model_folder)
    assert found == template
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            assert render_jinja(template, messages, specials, prompt) == \
                theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    tok = bailong.Tokenizer(model_folder / "tokenizer.model")
    ids = tok.encode_chat(render_jinja(template, CONVERSATIONS[1], specials), specials)
    assert ids.count(1) == (2 if template == LLAMA2_CHAT else 0) and tok.decode(ids).count("你好") == 2


def test_an_answer_ends_only_at_the_templates_special_tokens(model_folder):
    """Meta's Llama 2 template writes ' ' before </s>: a lone "▁", which decodes to nothing alone, and which
    Llama 2 writes before every digit and byte-spelled character; it must not end an answer."""
    from bailong.chat_template import turn_end_ids
    tok = bailong.Tokenizer(model_folder / "tokenizer.model")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert tok.encode("It costs 25 dollars")[2] == tok.sp.piece_to_id("▁")
    assert turn_end_ids(tok, (LLAMA2_CHAT, specials)) == {tok.eos_id}


def test_the_model_template_is_used_and_generation_config_sets_defaults(model_folder):
    (model_folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": "<s>", "eos_token": "</s>"}))
    (model_folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.3, "top_p": 0.5, "do_sample": True, "max_new_tokens": 7}))
    args = chat.parse_args([str(model_folder), "--top-p", "0.8"])
    sampling, max_new = model_sampling(model_folder, vars(args))
    assert (sampling.temperature, sampling.top_p, sampling.top_k, max_new) == (0.3, 0.8, 50, 7)
    (model_folder / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert model_sampling(model_folder, vars(args))[0].temperature == 0.0


def test_generation_config_is_read_as_transformers_reads_it(model_folder):
    """Greedy unless do_sample; what a file leaves out (or sets to null), transformers' defaults: Llama-2-chat's
    file sampled with top-k 40 and a repetition penalty of 1.1 (Bailong's defaults), TinyLlama-Chat's (no
    do_sample) sampled where transformers is greedy."""
    from transformers import GenerationConfig
    for file in ({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096},  # Llama-2-chat's
                 {"max_length": 2048, "temperature": 0.7},  # sampling values without do_sample
                 {"do_sample": False, "repetition_penalty": 1.2}, {"do_sample": True, "top_k": None, "top_p": None}):
        (model_folder / "generation_config.json").write_text(json.dumps(file))
        theirs = GenerationConfig.from_pretrained(model_folder)
        theirs = {k: v if v is not None else GenerationConfig._get_default_generation_params()[k]
                  for k, v in theirs.to_dict().items() if k in ("do_sample", *SAMPLING)}
        ours = model_sampling(model_folder)[0]
        assert (ours.temperature, ours.top_k, ours.top_p, ours.repetition_penalty) == (
            theirs["temperature"] if theirs["do_sample"] else 0.0, theirs["top_k"], theirs["top_p"],
            theirs["repetition_penalty"]), file
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(model_folder), "--template", "llama2",
                             "--prompt", "hi", "--max-new-tokens", "3", "--seed", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "[3 tokens," in result.stderr


def test_commands_and_saving(model_folder, tmp_path):
    saved = tmp_path / "conversation.jsonl"
    # the file this conversation saved is updated; after /reset the conversation is another, which does not
    # replace it without /save! (it was replaced without a word)
    script = f"/system 只用繁體中文\nhi\n/save {saved}\nmore\n/save {saved}\n/reset\nagain\n/save {saved}\n/exit\n"
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(model_folder), "--max-new-tokens", "3",
                             "--temperature", "0"], input=script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 1 and [m["role"] for m in rows[0]["messages"]] == ["system"] + ["user", "assistant"] * 2
    assert rows[0]["answered_by"] == str(model_folder)  # (only files that say so are replaced: never a user's data)
    assert rows[0]["messages"][0]["content"] == "只用繁體中文" and rows[0]["messages"][1]["content"] == "hi"
    assert "(the conversation is cleared; the system prompt stays)" in result.stderr
    assert f"error: {saved}: already exists; /save! {saved} replaces it" in result.stderr


def test_batch_answers_from_jsonl(model_folder, tmp_path):
    """Each conversation comes back whole with its answer (the model saw what fits of a long one), with --system's
    prompt where it had none."""
    questions = tmp_path / "questions.jsonl"
    long = [{"role": role, "content": f"第{i}輪：" + "夜市的小吃很多。" * 8}
            for i in range(4) for role in ("user", "assistant")]
    conversations = CONVERSATIONS + [long + CONVERSATIONS[0]]  # 4 exchanges of about 80 tokens, in 256
    questions.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations))
    answers = tmp_path / "answers.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(model_folder), "--input", str(questions),
                             "--output", str(answers), "--max-new-tokens", "4", "--temperature", "0",
                             "--system", "簡短回答。"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert {json.loads(line)["answered_by"] for line in answers.read_text().splitlines()} == {str(model_folder)}
    rows = [json.loads(line)["messages"] for line in answers.read_text().splitlines()]
    system = [{"role": "system", "content": "簡短回答。"}]
    assert [r[:-1] for r in rows] == [m if m[0]["role"] == "system" else system + m for m in conversations]
    assert all(r[-1]["role"] == "assistant" for r in rows)
    questions.write_text(json.dumps({"messages": CONVERSATIONS[1][:3]}, ensure_ascii=False) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(model_folder), "--input", str(questions)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"{questions}:1: expected" in result.stderr and "ending with the user" in \
        result.stderr


def test_training_output_and_its_merged_export_answer_alike(tmp_path):
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "--steps", "20", "--new-pieces", "100",
                            "--out", str(run)], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    export = subprocess.run([sys.executable, "-m", "bailong.export", "--base", str(run), "--out",
                             str(tmp_path / "merged")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert export.returncode == 0, export.stderr[-2000:]
    answers = []
    for model in (run, tmp_path / "merged"):
        result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(model), "--prompt", "臺灣的夜市",
                                 "--temperature", "0", "--max-new-tokens", "24"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        answers.append(result.stdout)
    assert answers[0] == answers[1] and answers[0].strip("\n")  # what a barely trained model says: spaces, maybe


def test_a_training_output_samples_and_chats_as_its_base_model_says(model_folder, tmp_path, capsys, monkeypatch):
    """The base's generation_config.json and chat template, for a pre-training output (its base named in the
    adapter) and a fine-tuning one (its merged base keeps a copy), as for the base itself: chat.py read the
    defaults and Llama 2's format, and fine-tuning a tokenizer.model base trained in Llama 2's format too,
    where `chat.py BASE --adapter` used the base's template."""
    from bailong.chat_template import model_template
    from train_runs import run_train
    (model_folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.3,
                                                                     "max_new_tokens": 7}))
    (model_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "</s>"}))
    common = ["--steps", "1", "--batch-size", "2", "--eval-every", "1"]
    monkeypatch.chdir(model_folder.parent)  # a base named relatively is recorded by its whole path
    run_train(capsys, "--model", model_folder.name, "--new-pieces", "0", *common, "--out", tmp_path / "pre")
    adapter = json.loads((tmp_path / "pre" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_folder.resolve())
    monkeypatch.chdir(tmp_path)
    stdout, _ = run_train(capsys, "--stage", "sft", "--init", tmp_path / "pre", *common, "--out", tmp_path / "sft")
    assert "chat format: the model's chat_template" in stdout
    for run in ("pre", "sft", "sft/checkpoints/step-0000001", "sft/base"):
        sampling, max_new = model_sampling(tmp_path / run)
        assert (sampling.temperature, max_new) == (0.3, 7), run
        _, tokenizer = bailong.load(tmp_path / run, device="cpu")
        assert model_template(tokenizer, tmp_path / run) == (CHATML, {"bos_token": None, "eos_token": "</s>",
                                                                     "unk_token": None, "pad_token": None}), run
    assert (tmp_path / "sft" / "base" / "generation_config.json").is_file()


def test_a_tokenizer_json_that_adds_chat_tokens_is_read_instead_of_tokenizer_model(tmp_path):
    """A Llama 2 chat fine-tune whose <|im_start|> and <|im_end|> live only in tokenizer.json: its
    tokenizer.model cannot write them (they were spelled out as text, and <|im_end|> became <unk>), so
    tokenizer.json is read, as transformers reads it; a tokenizer.json that adds nothing leaves
    tokenizer.model first."""
    from transformers import AutoTokenizer

    from bailong.chat_template import model_template
    from bailong.conversation import Chat
    from bailong.generation import Sampling
    from bailong.tokenizer import JsonTokenizer, Tokenizer, open_tokenizer
    from hf_models import write_hf
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32002, max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), folder / "tokenizer.model")
    theirs = AutoTokenizer.from_pretrained(folder)
    theirs.save_pretrained(folder)  # a tokenizer.json of the same 32,000 pieces
    assert isinstance(open_tokenizer(folder), Tokenizer)
    theirs.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    theirs.chat_template = CHATML
    theirs.save_pretrained(folder)
    model, tokenizer = bailong.load(folder, device="cpu")
    assert isinstance(tokenizer, JsonTokenizer) and tokenizer.vocab_size == 32002
    chat_ = Chat(model, tokenizer, model_template(tokenizer, folder), Sampling(temperature=0), 3)
    ids, _ = chat_.prompt([{"role": "user", "content": "Hello"}])
    im_start, im_end = theirs.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1 and 0 not in ids  # no <unk>
    assert im_end in chat_.stop_ids
    config = json.loads((folder / "config.json").read_text())  # added tokens the model has no rows for (a
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 32000}))  # <pad>): not its tokenizer
    assert isinstance(open_tokenizer(folder), Tokenizer)


def test_a_merged_fine_tuned_model_tokenizes_and_chats_in_transformers_as_here(model_folder, tmp_path, capsys):
    """A base without tokenizer_config.json: the merged folder of its fine-tuned run had none either, so
    transformers began no text with <s> and knew no chat format; the export writes Llama 2's settings and
    format, which transformers then tokenizes to our ids. A base with its own keeps it through fine-tuning."""
    from transformers import AutoTokenizer

    from bailong.chat_template import llama2_ids
    from bailong.export import main as export_main
    from train_runs import run_train
    common = ["--steps", "1", "--batch-size", "2", "--eval-every", "1"]
    run_train(capsys, "--model", model_folder, "--new-pieces", "0", *common, "--out", tmp_path / "pre")
    run_train(capsys, "--stage", "sft", "--init", tmp_path / "pre", *common, "--out", tmp_path / "sft")
    export_main(["--base", str(tmp_path / "sft"), "--out", str(tmp_path / "merged")])
    theirs, (_, ours) = AutoTokenizer.from_pretrained(tmp_path / "merged"), bailong.load(tmp_path / "sft", device="cpu")
    assert theirs("臺灣 Hello")["input_ids"] == ours.encode("臺灣 Hello", bos=True)
    for messages in CONVERSATIONS:
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == llama2_ids(ours, messages)
    (model_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "add_bos_token": False,
                                                                    "legacy": False}))
    run_train(capsys, "--stage", "sft", "--init", tmp_path / "pre", *common, "--out", tmp_path / "sft2")
    assert json.loads((tmp_path / "sft2" / "base" / "tokenizer_config.json").read_text())["add_bos_token"] is False


def test_an_answer_ends_where_generation_config_says_too(tmp_path):
    """generation_config.json's eos_token_id (Gemma's [1, 107], <end_of_turn> a piece of its own that decodes
    to text) ends an answer, as transformers' generate stops at it: chat ran on into the next turn."""
    import types

    from bailong.conversation import Chat
    from bailong.generation import generation_eos
    from bailong.tokenizer import byte_tokenizer
    model = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_id=[2], max_position_embeddings=64))
    for written, expected in [([1, 107], {1, 107}), (107, {107}), (None, set()), ("107", set())]:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": written}))
        assert generation_eos(tmp_path) == expected
    assert generation_eos(tmp_path / "none") == set()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 107]}))
    assert Chat(model, byte_tokenizer(), None, None, 8, stop_ids=generation_eos(tmp_path)).stop_ids == {2, 107}


def test_chat_py_stops_where_generation_config_says(model_folder, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 107]}))
    seen = []

    class Seen(conversation.Chat):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.stop_ids)
    monkeypatch.setattr(conversation, "Chat", Seen)
    assert chat.main([str(folder), "--prompt", "hi", "--max-new-tokens", "1"]) in (0, None)
    assert seen and {2, 107} <= seen[0]


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json of byte pieces", "byte-level BPE"])
def test_an_answer_cut_inside_a_character_keeps_no_replacement_character(kind, tmp_path, monkeypatch, capsys):
    """Cut at --max-new-tokens inside a character spelled in bytes (most Chinese characters in Llama 2's
    vocabulary), an answer ended in U+FFFD, which the history kept and the next prompt spelled to the model. What
    was shown whole is kept: a tokenizer.json of SentencePiece's byte pieces decodes a whole run of them, the
    characters before the cut ones too, as U+FFFD."""
    from transformers import AutoTokenizer

    from bailong import conversation
    from bailong.tokenizer import JsonTokenizer, Tokenizer
    from bpe_models import bpe_folder
    model, _ = bailong.load_preset("tiny")
    model.config.max_position_embeddings = 4096  # (the tiny model's context, for a vocabulary of 32,000)
    if kind == "byte-level BPE":
        tokenizer = JsonTokenizer(bpe_folder(tmp_path) / "tokenizer.json")
    else:
        tokenizer = Tokenizer(asset("llama2-tokenizer/tokenizer.model"))
    if kind == "tokenizer.json of byte pieces":
        AutoTokenizer.from_pretrained(tokenizer.path.parent).save_pretrained(tmp_path)
        tokenizer = JsonTokenizer(tmp_path / "tokenizer.json")
    ids = tokenizer.encode("abc 龘龘")  # 龘 in bytes
    monkeypatch.setattr(conversation, "generate", lambda *a, on_token, **k: [on_token(i) for i in ids[:-1]])
    chat = conversation.Chat(model, tokenizer, None, bailong.Sampling(temperature=0), 50)
    assert chat.answer("hi") == "abc 龘" and chat.messages[-1]["content"] == "abc 龘"
    assert capsys.readouterr().out.startswith("abc 龘\ufffd")  # shown as cut
