"""Bailong used from Python, as a notebook calls it: the arguments people naturally pass (one path where a list
may go, a dtype by name, a tensor of ids) do what they say, or are refused at once with a clear error."""
import sys

import pytest
import torch
from safetensors.torch import load_file

import bailong
from bailong import conversation
from bailong.adapter import load_adapter, save_adapter
from bailong.config import Sampling, preset, torch_dtype
from bailong.conversation import Chat
from bailong.data import data_paths, read_conversations, read_corpus
from bailong.eval import compare_tokenizers, loss_per_char, tokens_per_char
from bailong.export import export
from bailong.model import Llama
from bailong.lora import LoRAConfig, inject_lora, lora_parameters, merge_lora
from bailong.quantized import quantize_model
from bailong.tokenizer import byte_tokenizer
from bailong.vocab import extend_tokenizer
from bailong.zip_tie import extend_model, resize_vocab
from conftest import ROOT

SAMPLES = ROOT / "bailong" / "samples"
TEXT, CHATS = SAMPLES / "zh_tw_sample.txt", SAMPLES / "chats_sample.jsonl"


def with_lora(model, dropout=0.5):
    inject_lora(model, LoRAConfig(r=4, dropout=dropout))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.5)  # an update that dropout would change
    return model


def test_lora_added_to_a_model_in_eval_mode_leaves_dropout_off(tmp_path):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    model = with_lora(bailong.load_preset("tiny", device="cpu")[0])  # load_preset's model is in eval mode
    assert torch.equal(model(ids), model(ids))
    assert not torch.equal(model.train()(ids), model(ids))  # (in training, dropout works)
    save_adapter(model, tmp_path / "adapter", LoRAConfig(r=4, dropout=0.5))
    fresh = bailong.load_preset("tiny", device="cpu")[0]
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids), fresh(ids)) and torch.equal(fresh(ids), model.eval()(ids))
    assert not merge_lora(fresh).training and not any(m.training for m in fresh.modules())
    quantized = bailong.load_preset("tiny", device="cpu")[0]
    with_lora(quantize_model(quantized))  # (its NF4 projections are new modules)
    assert torch.equal(quantized(ids), quantized(ids))


def test_one_path_is_read_as_a_list_of_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (a relative name's first character was taken for a folder)
    for path in (TEXT, str(TEXT)):
        assert list(read_corpus(path)) == list(read_corpus([TEXT]))
        assert data_paths(path) == [TEXT]
    assert list(read_conversations(str(CHATS))) == list(read_conversations([CHATS]))
    assert list(read_conversations(CHATS, ending="assistant")) == list(read_conversations([CHATS]))
    with pytest.raises(bailong.BailongError, match="no file named: the corpus is empty"):
        read_corpus([])
    tokenizer = tmp_path / "bytes.model"
    tokenizer.write_bytes(byte_tokenizer().serialized())
    assert compare_tokenizers(TEXT, str(tokenizer)) == compare_tokenizers(TEXT, [str(tokenizer)])


def test_one_text_is_read_as_a_list_of_one():
    tokenizer, model = byte_tokenizer(), bailong.load_preset("tiny", device="cpu")[0]
    text = "臺灣的天氣很好。" * 3
    assert tokens_per_char(tokenizer, text) == tokens_per_char(tokenizer, [text]) > 1  # (characters one a text: 3.0)
    assert loss_per_char(model, tokenizer, text) == loss_per_char(model, tokenizer, [text])
    with pytest.raises(ValueError, match="no characters"):
        loss_per_char(model, tokenizer, [])
    texts = list(read_corpus(TEXT))
    assert extend_tokenizer(tokenizer, "\n".join(texts), 20, say=lambda _: None)[1] == \
        extend_tokenizer(tokenizer, ["\n".join(texts)], 20, say=lambda _: None)[1]


def test_a_dtype_by_name():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="'float64': one of float32, bfloat16, float16"):
        torch_dtype("float64")
    model = bailong.load_preset("tiny", dtype="bfloat16", device="cpu")[0]
    assert model.lm_head.weight.dtype is torch.bfloat16
    assert merge_lora(with_lora(model), dtype="float16").lm_head.weight.dtype is torch.float16


def test_a_folder_loads_in_a_dtype_by_name(tmp_path):
    bailong.save(bailong.load_preset("tiny", device="cpu")[0], tmp_path)
    byte_tokenizer().save(tmp_path)
    assert bailong.load(tmp_path, dtype="bfloat16", device="cpu")[0].lm_head.weight.dtype is torch.bfloat16


@pytest.mark.parametrize("options, error", [
    (dict(format="GGUF"), "format='GGUF': 'hf' .a folder. or 'gguf'"),
    (dict(format="gguf", gguf_type="Q8_0"), "gguf_type='Q8_0': one of f32, f16, bf16, q8_0"),
    (dict(gguf_type="q8_0"), "gguf_type and overwrite are for a GGUF file"),
    (dict(overwrite=True), "gguf_type and overwrite are for a GGUF file"),
    (dict(dtype="half"), "'half': one of")])
def test_export_refuses_options_it_would_not_follow_before_any_work(tmp_path, options, error):
    with pytest.raises(ValueError, match=error):  # (the base does not exist: nothing was read)
        export(tmp_path / "no base", None, tmp_path / "out", **options)
    assert list(tmp_path.iterdir()) == []


def test_ids_decode_from_a_list_a_tensor_or_one_id():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("臺灣 ok")
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(ids) == "臺灣 ok"
    assert tokenizer.decode(torch.tensor(ids[-1])) == tokenizer.decode(ids[-1]) == "k"
    with pytest.raises(TypeError, match=rf"one sequence of ids, not ids of shape \(1, {len(ids)}\)"):
        tokenizer.decode(torch.tensor([ids]))
    with pytest.raises(TypeError, match="encode takes one str, not list"):
        tokenizer.encode(["hi", "yo"])
    stream = tokenizer.stream()
    assert "".join(stream.put(i) for i in torch.tensor(ids)) + stream.flush() == "臺灣 ok"


def test_lora_targets_and_rank_are_checked():
    assert LoRAConfig(targets="q_proj").targets == ("q_proj",)
    model = bailong.load_preset("tiny", device="cpu")[0]
    inject_lora(model, LoRAConfig(r=2, targets="q_proj"))
    assert {n.split(".")[-3] for n in lora_parameters(model)} == {"q_proj"}
    with pytest.raises(ValueError, match="LoRA target 'embed': no module of the model is named so"):
        inject_lora(model, LoRAConfig(r=2, targets=("q_proj", "embed")))
    for r in (0, 4.5, True):
        with pytest.raises(ValueError, match="r must be a whole number above 0"):
            LoRAConfig(r=r)
    with pytest.raises(ValueError, match="dropout must be at least 0 and below 1"):
        LoRAConfig(dropout=1.0)


def test_generate_takes_one_stop_id_and_refuses_what_it_would_misread():
    model = bailong.load_preset("tiny", device="cpu")[0]
    greedy = Sampling(temperature=0)
    new = bailong.generate(model, [1, 5], 6, greedy, stop_ids=[])
    assert bailong.generate(model, [1, 5], 6, greedy, stop_ids=new[1]) == new[:new.index(new[1]) + 1]
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number above 0, not 0"):
        bailong.generate(model, [1, 5], 0, greedy)
    with pytest.raises(TypeError, match="sampling must be a Sampling"):
        bailong.generate(model, [1, 5], 6, {"temperature": 0})
    with pytest.raises(ValueError, match="a prompt of 256 tokens leaves no room in the model's context of 256"):
        bailong.generate(model, [1] * 256, 6, greedy)
    with pytest.raises(ValueError, match="seed must be a whole number or None, not '1'"):
        Sampling(seed="1")


def test_a_question_whose_answer_fails_is_taken_back(monkeypatch):
    model = bailong.load_preset("tiny", device="cpu")[0]
    chat = Chat(model, byte_tokenizer(), None, Sampling(temperature=0), 4)

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory")
    with monkeypatch.context() as m:
        m.setattr(conversation, "generate", fails)
        with pytest.raises(RuntimeError, match="out of memory"):
            chat.answer("hello", stream=False)
    assert chat.messages == []
    with pytest.raises(AttributeError):
        chat.answer(5, stream=False)  # (not a text: the template cannot read it)
    assert chat.messages == []
    chat.answer("hello again", stream=False)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    def printing(*args, **kwargs):  # Ctrl-C as the answer's end is printed, its line ended
        if "end" not in kwargs and kwargs.get("file") is not sys.stderr:
            raise KeyboardInterrupt
        print(*args, **kwargs)
    with monkeypatch.context() as m:  # the answer whole: it is kept
        m.setattr(conversation, "print", printing, raising=False)
        with pytest.raises(KeyboardInterrupt):
            chat.answer("and again")
    assert [m["content"] for m in chat.messages][2] == "and again" and len(chat.messages) == 4


def test_an_adapter_of_a_grown_vocabulary_without_its_tokenizer_says_what_it_lacks(tmp_path):
    base = bailong.load_preset("tiny", device="cpu")[0]
    bailong.save(base, tmp_path / "base")
    byte_tokenizer().save(tmp_path / "base")
    resize_vocab(base, 300)
    save_adapter(with_lora(base), tmp_path / "adapter", LoRAConfig(r=4))
    with pytest.raises(bailong.BailongError, match=r"needs \[260, 64\]; an adapter trained on an extended "
                                                   r"vocabulary carries its tokenizer in its folder"):
        bailong.load(tmp_path / "base", device="cpu", adapter=tmp_path / "adapter")


@pytest.mark.parametrize("tied", [False, True])
def test_an_adapter_of_a_grown_vocabulary_takes_its_new_rows_without_lora_on_them(tmp_path, tied):
    """LoRA on the projections alone of a model extend_model grew: its adapter lacked the new rows (zip-tie's,
    in no LoRA weight), and loaded onto the base it read each new id as a row of zeros. They are saved whole
    now, as PEFT's save_embedding_layers does where the vocabulary was resized."""
    config = preset("tiny")
    config.vocab_size, config.tie_word_embeddings = 260, tied
    torch.manual_seed(0)
    base = Llama(config).eval()
    bailong.save(base, tmp_path / "base")
    byte_tokenizer().save(tmp_path / "base")
    extended = extend_tokenizer(byte_tokenizer(), TEXT.read_text(encoding="utf-8"), 20, say=lambda _: None)[0]
    grown = extend_model(base, byte_tokenizer(), extended)
    lora = LoRAConfig(r=4, targets=("q_proj", "v_proj"))
    inject_lora(grown, lora)
    save_adapter(grown, tmp_path / "adapter", lora)
    extended.save(tmp_path / "adapter")
    model, tokenizer = bailong.load(tmp_path / "base", device="cpu", adapter=tmp_path / "adapter")
    ids = torch.tensor([tokenizer.encode("臺灣的語言")])
    assert model.config.vocab_size == 280 and ids.max() >= 260
    assert torch.equal(model(ids), grown(ids))
    inject_lora(merge_lora(model), lora)  # merged, the model is the next adapter's base: its rows stay out of it
    save_adapter(model, tmp_path / "next", lora)
    assert all("lora_" in k for k in load_file(tmp_path / "next" / "adapter_model.safetensors"))


def test_a_cuda_device_the_machine_lacks_is_said_in_one_line(tmp_path):
    bailong.save(bailong.load_preset("tiny", device="cpu")[0], tmp_path / "model")
    for load in (lambda: bailong.load_preset("tiny", device="cuda:99"), lambda: bailong.load(
            tmp_path / "model", device=torch.device("cuda", 99))):  # (torch's AssertionError, or an index error)
        with pytest.raises(bailong.BailongError, match=r"^device='cuda:99': this machine has (no|\d+) CUDA device"):
            load()


def test_a_forward_without_a_batch_dimension_says_so():
    model = bailong.load_preset("tiny", device="cpu")[0]
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, tokens\), not of shape \(3,\)"):
        model(torch.tensor([1, 5, 6]))
    assert model(torch.tensor([[1, 5, 6]])).shape == (1, 3, 260)


def test_a_model_saved_onto_a_file_is_refused(tmp_path):
    (tmp_path / "model").write_text("notes")
    with pytest.raises(bailong.BailongError, match="model: is a file; a model is saved into a folder"):
        bailong.save(bailong.load_preset("tiny", device="cpu")[0], tmp_path / "model")
    assert (tmp_path / "model").read_text() == "notes"
