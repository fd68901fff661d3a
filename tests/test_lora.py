"""LoRA against PEFT and against plain autograd; PEFT-format adapters both ways; merge and export."""
import json
import os
from contextlib import nullcontext

import pytest
import torch
from hf_models import write_hf
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

import bailong
from bailong.adapter import save_adapter
from bailong.config import preset
from bailong.errors import BailongWarning
from bailong.export import main as export_main
from bailong.lora import (LoRAConfig, LoRALinear, inject_lora, lora_parameters, lora_summary,
                          mark_only_lora_trainable, merge_lora)
from bailong.quantized import PROJECTIONS

ALL = PROJECTIONS + ("embed_tokens", "lm_head")
SHAPE = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)


def randomize(params, seed=0):
    """LoRA weights away from their (zero-update) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(params.items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def lora_model(folder, quantize=None, **lora):
    model, _ = bailong.load(folder, device="cpu", quantize=quantize)
    inject_lora(model, LoRAConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.0, **lora}))
    return model.eval()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_zero_update_is_the_base_model_and_merging_changes_nothing(tmp_path, quantize):
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    base, _ = bailong.load(folder, device="cpu", quantize=quantize)
    model = lora_model(folder, quantize)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))
        randomize(lora_parameters(model))
        unmerged = model(ids)
        assert (unmerged - base(ids)).abs().max() > 1e-3
        with pytest.warns(BailongWarning, match="keeps the 4-bit rounding error") if quantize else nullcontext():
            merge_lora(model)
        assert not list(lora_parameters(model)) and not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)


def test_merging_lets_each_old_weight_go_as_its_merged_one_takes_its_place(tmp_path, monkeypatch):
    """merge_lora held every LoRA module, and its frozen weight, until it returned: a 7B export on a 24 GiB
    machine held two copies of the projections and was killed for memory. At most the one being merged is
    held beside the merged ones now."""
    import gc
    import weakref

    from bailong import lora
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    model = lora_model(folder)
    old = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, LoRALinear)]
    held, set_module = [], lora.set_module

    def counted(model, name, module):
        set_module(model, name, module)
        held.append((sum(r() is not None for r in old), sum(isinstance(m, LoRALinear) for m in model.modules())))
    gc.disable()  # only what is let go at once counts
    try:
        monkeypatch.setattr(lora, "set_module", counted)
        merge_lora(model)
    finally:
        gc.enable()
    assert held[-1] == (0, 0) and all(alive == unmerged for alive, unmerged in held), held


def test_gradients_match_peft(tmp_path):
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    ours = lora_model(folder, rslora=True)
    randomize(lora_parameters(ours))
    theirs = get_peft_model(LlamaForCausalLM.from_pretrained(folder),
                            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(ALL), use_rslora=True))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in lora_parameters(ours).items():
            theirs_params[peft_name(name)].copy_(p)
    ids = torch.randint(0, 300, (2, 13))
    loss = torch.nn.functional.cross_entropy(ours(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    for name, p in lora_parameters(ours).items():
        torch.testing.assert_close(p.grad, theirs_params[peft_name(name)].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_lora_starts_as_peft_s(tmp_path):
    """The same matrices at zero (linear: B; embedding: A) and the others drawn alike (Kaiming-uniform, normal):
    with A at zero instead, B would get no gradient at the first step."""
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    ours = lora_parameters(lora_model(folder))
    theirs = dict(get_peft_model(LlamaForCausalLM.from_pretrained(folder), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(ALL))).named_parameters())
    for name, p in ours.items():
        other = theirs[peft_name(name)]
        assert p.shape == other.shape and bool(p.any()) == bool(other.any()), name
        if p.any():
            assert float(p.std()) == pytest.approx(float(other.std()), rel=0.2), name


def peft_name(name):
    """Our parameter name as PEFT names it inside a PeftModel (adapter 'default')."""
    for part in ["lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"]:
        name = name.replace(f".{part}", f".{part}.default")
    return "base_model.model." + name


def test_nf4_gradients_match_a_dense_float32_reference(tmp_path):
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    model = lora_model(folder, "nf4", targets=ALL)
    randomize(lora_parameters(model))
    reference = lora_model(folder, targets=ALL)  # dense, then given the NF4 model's dequantized weights
    with torch.no_grad():
        for (name, m), (_, r) in zip(model.named_modules(), reference.named_modules()):
            if isinstance(m, LoRALinear) and m.quantized:
                r.weight.copy_(m.weight.dequantize(torch.float32))
        for name, p in lora_parameters(reference).items():
            p.copy_(lora_parameters(model)[name])
    ids = torch.randint(0, 300, (2, 9))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = model(ids)
    weight_shapes = {torch.Size([m.out_features, m.in_features]) for m in model.modules() if isinstance(m, LoRALinear)}
    assert not weight_shapes & set(saved) - {model.lm_head.weight.shape}  # no dequantized weight kept
    out.float().pow(2).mean().backward()
    reference(ids).float().pow(2).mean().backward()
    for name, p in lora_parameters(model).items():
        torch.testing.assert_close(p.grad, lora_parameters(reference)[name].grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, rslora):
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    ours = lora_model(folder, rslora=rslora)
    randomize(lora_parameters(ours))
    mark_only_lora_trainable(ours)
    save_adapter(ours, tmp_path / "adapter", LoRAConfig(r=4, alpha=8.0, dropout=0.0, rslora=rslora), str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(ALL)
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
    again, _ = bailong.load(folder, device="cpu", adapter=tmp_path / "adapter")  # and back
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def make_peft_adapter(folder, out, targets=ALL, seed=0, **config):
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(folder),
                          LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=list(targets), **config))
    randomize({n: p for n, p in peft.named_parameters() if "lora_" in n}, seed)
    peft.save_pretrained(out)
    return peft.eval()


def test_peft_adapter_loads_in_ours_with_the_same_logits(tmp_path):
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    theirs = make_peft_adapter(folder, tmp_path / "adapter", alpha_pattern={"down_proj|q_proj": 32})  # a regex
    ours, _ = bailong.load(folder, device="cpu", adapter=tmp_path / "adapter")
    layer = ours.model.layers[0]
    assert layer.mlp.down_proj.scaling == layer.self_attn.q_proj.scaling == 4.0 and layer.mlp.up_proj.scaling == 2.0
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    quantized, _ = bailong.load(folder, device="cpu", quantize="nf4", adapter=tmp_path / "adapter")  # QLoRA
    assert quantized.model.layers[0].self_attn.q_proj.quantized
    with torch.no_grad():
        assert (quantized(ids) - ours(ids)).abs().max() < 0.5  # only NF4 rounding apart


def test_export_writes_a_merged_folder_transformers_loads(tmp_path, capsys):
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    make_peft_adapter(folder, tmp_path / "adapter")
    ours, _ = bailong.load(folder, device="cpu", adapter=tmp_path / "adapter")
    assert export_main(["--base", str(folder), "--adapter", str(tmp_path / "adapter"), "--out",
                        str(tmp_path / "merged"), "--max-shard-gb", "0.0001"]) == 0
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
    err = cli_error_export(capsys, folder, tmp_path / "adapter", tmp_path / "merged", code=2)
    assert "merged: already exists" in err
    (tmp_path / "token").write_text("hf_secret")  # a cloned folder's link to the user's Hub token
    os.symlink(tmp_path / "token", folder / "special_tokens_map.json")
    for out in ("merged2",):
        assert "special_tokens_map.json: is a link to" in cli_error_export(capsys, folder, tmp_path / "adapter",
                                                                          tmp_path / out)
        assert not (tmp_path / out).exists()


def test_export_keeps_the_dtype_of_weights_whose_config_names_none(tmp_path):
    """A bfloat16 checkpoint whose config.json names no dtype was exported in float32: twice its size, and at
    7B more than a 24 GiB machine holds. Its weights' own dtype now (a GGUF file's type follows it too)."""
    from safetensors import safe_open
    folder, model = write_hf(tmp_path, "gqa", **SHAPE)
    model.to(torch.bfloat16).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None), config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    assert export_main(["--base", str(folder), "--out", str(tmp_path / "merged")]) == 0
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def cli_error_export(capsys, base, adapter, out, code=1):
    from bailong.errors import run_cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(export_main, ["--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    assert exit_.value.code == code
    return capsys.readouterr().err.strip()


def test_adapters_that_do_not_fit_are_refused(tmp_path, capsys):
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    other, _ = write_hf(tmp_path / "other", "gqa", vocab_size=320, num_hidden_layers=4, **SHAPE)
    make_peft_adapter(other, tmp_path / "vocab")
    err = cli_error_export(capsys, folder, tmp_path / "vocab", tmp_path / "out1")
    assert "adapter_model.safetensors: base_model.model.lm_head.base_layer.weight has shape [320, 128], " \
           "but the base's lm_head (linear, 300 x 128) needs [300, 128]" in err
    make_peft_adapter(other, tmp_path / "deeper", targets=["q_proj"])
    err = cli_error_export(capsys, folder, tmp_path / "deeper", tmp_path / "out2")
    assert "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight names module " \
           "model.layers.3.self_attn.q_proj, which the base model lacks" in err
    config = tmp_path / "deeper" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": True}))
    assert "adapter_config.json: use_dora=True is not supported" in cli_error_export(capsys, folder, tmp_path / "deeper",
                                                                                  tmp_path / "out3")
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": False,
                                  "alora_invocation_tokens": [5, 6]}))  # applied from those tokens on only
    assert "alora_invocation_tokens=[5, 6] is not supported" in cli_error_export(capsys, folder, tmp_path / "deeper",
                                                                                tmp_path / "out3")
    assert "adapter_config.json: no such file" in cli_error_export(capsys, folder, tmp_path, tmp_path / "out4")
    tied, _ = write_hf(tmp_path / "tied", "tied", **SHAPE)  # LoRA on a shared embedding: a traceback before
    make_peft_adapter(tied, tmp_path / "on-tied", targets=["q_proj", "embed_tokens"])
    assert "LoRA on model.embed_tokens, but the base ties its embedding and head (tie_word_embeddings): not " \
           "supported" in cli_error_export(capsys, tied, tmp_path / "on-tied", tmp_path / "out5")
    assert not any((tmp_path / f"out{i}").exists() for i in range(1, 6))


def test_an_adapter_peft_makes_its_base_for_or_with_half_an_update_is_refused(tmp_path, capsys):
    """PiSSA (and OLoRA, CorDA, LoftQ, LoRA-GA): PEFT subtracts the initial B A from the base as it loads such an
    adapter, so B A added to the base as it is gave other logits (0.49 apart); a file that lost a lora_B loaded
    as no update there (PEFT warns)."""
    from safetensors.torch import load_file, save_file
    folder, hf = write_hf(tmp_path, "gqa", **SHAPE)
    get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "pissa")
    assert "adapter_config.json: init_lora_weights='pissa' is not supported: PEFT makes such an adapter's base " \
           "from the model as it loads it" in cli_error_export(capsys, folder, tmp_path / "pissa", tmp_path / "out1")
    config = tmp_path / "pissa" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "init_lora_weights": "OLoRA"}))  # any case
    assert "init_lora_weights='OLoRA' is not supported" in cli_error_export(capsys, folder, tmp_path / "pissa",
                                                                           tmp_path / "out1")
    make_peft_adapter(folder, tmp_path / "half", targets=["q_proj"])
    file = tmp_path / "half" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    del tensors[key]
    save_file(tensors, file)
    assert f"adapter_model.safetensors: holds {key.replace('lora_B', 'lora_A')} but not {key}" in \
        cli_error_export(capsys, folder, tmp_path / "half", tmp_path / "out2")
    assert not any((tmp_path / f"out{i}").exists() for i in range(1, 3))


def test_an_export_into_an_existing_empty_folder_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """--out . in an empty working folder ended, after the whole merge, in a traceback; an empty mount point in
    'could not write (Device or resource busy)': the new folder is renamed into place, which neither can be."""
    folder, _ = write_hf(tmp_path, "gqa", **SHAPE)
    make_peft_adapter(folder, tmp_path / "adapter", targets=["q_proj"])
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for out in (".", tmp_path / "empty"):
        assert "already exists; choose a new folder (nothing is overwritten)" in \
            cli_error_export(capsys, folder, tmp_path / "adapter", out, code=2)
    assert not any((tmp_path / "empty").iterdir())


def test_trainable_share_at_bailong_scale():
    config = preset("llama2-7b")
    config.vocab_size = 59241  # Llama 2 plus 27,241 Traditional Chinese pieces
    with torch.device("meta"):
        model = inject_lora(bailong.Llama(config), LoRAConfig(r=128))
    mark_only_lora_trainable(model)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    assert lora_summary(model) == "trainable parameters: 336,029,952 of 7,297,603,840 (4.60%)"


def test_activation_checkpointing_gives_the_same_gradients():
    from bailong.quantized import quantize_model
    model, _ = bailong.load_preset("tiny", device="cpu")
    quantize_model(model)
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    mark_only_lora_trainable(model)
    for p in model.parameters():  # B starts at zero; give every factor a value so all gradients flow
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in [False, True]:
        model.checkpointing = checkpointing
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_tied_embedding_that_grew_travels_in_peft_keys(tmp_path):
    """A tied model (no LoRA on its shared embedding) whose vocabulary grew keeps the grown embedding in the
    adapter under PEFT's own key (save_embedding_layers): PEFT reads ours, and we read PEFT's."""
    from bailong.tokenizer import byte_tokenizer
    from bailong.zip_tie import resize_vocab
    folder, _ = write_hf(tmp_path, "tied", vocab_size=256, **SHAPE)
    ours, _ = bailong.load(folder, device="cpu")
    resize_vocab(ours, 260)
    with torch.no_grad():
        ours.model.embed_tokens.weight[256:].normal_()
    lora = LoRAConfig(r=4, targets=PROJECTIONS, save_embedding_layers=True)
    inject_lora(ours, lora)
    randomize(lora_parameters(ours))
    save_adapter(ours, tmp_path / "ours", lora)
    (tmp_path / "ours" / "tokenizer.model").write_bytes(byte_tokenizer().sp.serialized_model_proto())  # 260 ids
    base = LlamaForCausalLM.from_pretrained(folder)
    base.resize_token_embeddings(260)
    theirs = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    ids = torch.randint(0, 260, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.eval()(ids), atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs", save_embedding_layers=True)  # embed_tokens.weight, lm_head.weight
    (tmp_path / "theirs" / "tokenizer.model").write_bytes(byte_tokenizer().sp.serialized_model_proto())
    again, _ = bailong.load(folder, device="cpu", adapter=tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=1e-5, rtol=1e-5)


def test_an_adapter_refused_leaves_the_model_as_it_was(tmp_path):
    """An adapter of a grown vocabulary with one weight of the wrong shape is refused, and the model it was to
    load into keeps its vocabulary: it grew the embedding and head before the checks refused the adapter. One
    that fits grows it."""
    from safetensors.torch import load_file, save_file

    from bailong.adapter import load_adapter
    from bailong.errors import BailongError
    from bailong.tokenizer import byte_tokenizer
    from bailong.zip_tie import resize_vocab
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=256, **SHAPE)
    grown, _ = bailong.load(folder, device="cpu")
    lora = LoRAConfig(r=4, targets=ALL)
    save_adapter(inject_lora(resize_vocab(grown, 260), lora), tmp_path / "adapter", lora)
    (tmp_path / "adapter" / "tokenizer.model").write_bytes(byte_tokenizer().sp.serialized_model_proto())  # 260 ids
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = next(k for k in sorted(tensors) if "down_proj.lora_A" in k)
    save_file({**tensors, key: torch.zeros(4, 999)}, file)
    model, _ = bailong.load(folder, device="cpu")
    with pytest.raises(BailongError, match=f"{key} has shape \\[4, 999\\]"):
        load_adapter(model, tmp_path / "adapter")
    assert model.config.vocab_size == 256 and model.lm_head.weight.shape[0] == 256
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    save_file(tensors, file)
    load_adapter(model, tmp_path / "adapter")
    assert model.config.vocab_size == 260 and model.lm_head.weight.shape[0] == 260
