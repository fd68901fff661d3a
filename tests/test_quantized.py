"""The NF4 base model: bitsandbytes checkpoints in, bitsandbytes checkpoints out."""
import json

import pytest
import torch
from hf_models import write_hf
from safetensors.torch import load_file, save_file
from test_nf4 import bnb_dequantize
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import bailong
from bailong.errors import BailongError
from bailong.quantized import NF4Linear, memory_report, projections
from conftest import asset

# every projection's input width a multiple of 64: where bitsandbytes' own CPU forward is right
SHAPE = dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)


def quantize_with_transformers(source, out, quant_type="nf4", double_quant=True, skip=None):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    model = LlamaForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
    return out


def dequantized_reference(source, quantized):
    """transformers' dense model with the weights bitsandbytes dequantizes from ``quantized``."""
    tensors = load_file(quantized / "model.safetensors")
    model = LlamaForCausalLM.from_pretrained(source).eval()
    state = model.state_dict()
    import bitsandbytes.functional as bnb
    for name in state:
        if f"{name}.absmax" in tensors:
            parts = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            state[name] = bnb_dequantize(tensors[name], bnb.QuantState.from_dict(parts, device="cpu"), torch.float32)
    model.load_state_dict(state)
    return model


def test_projections_left_dense_stay_dense(tmp_path):
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    quantized = quantize_with_transformers(source, tmp_path / "q", skip=["lm_head", "o_proj"])
    model, _ = bailong.load(quantized, device="cpu")
    assert type(model.model.layers[2].self_attn.o_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[2].self_attn.q_proj, NF4Linear)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dequantized_reference(source, quantized)(ids).logits,
                                   atol=1e-5, rtol=0)
    assert "o_proj" in bailong.quantized.bnb_quantization_config(model)["llm_int8_skip_modules"]


def test_a_quantized_head_is_refused_by_name(tmp_path):
    """transformers quantizes lm_head too when told to skip nothing; the error said its shape was wrong."""
    from bailong.errors import BailongError
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    with pytest.raises(BailongError, match=r"lm_head.weight is quantized \(4-bit\), which only the projections"):
        bailong.load(quantize_with_transformers(source, tmp_path / "q", skip=[]), device="cpu")


def test_a_projection_merged_in_one_layer_only_is_named_whole_for_transformers(tmp_path):
    """An adapter on some layers' q_proj leaves the others NF4: skipping "q_proj" told transformers to read every
    layer's as dense, and it refused the folder."""
    from transformers import LlamaForCausalLM

    from bailong.quantized import set_module
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    model, _ = bailong.load(quantize_with_transformers(source, tmp_path / "q"), device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    dense = torch.nn.Linear(q.in_features, q.out_features, bias=False)
    dense.weight.data = q.weight.dequantize(torch.float32)
    set_module(model, "model.layers.0.self_attn.q_proj", dense)  # as a merged adapter on layer 0 leaves it
    assert bailong.quantized.bnb_quantization_config(model)["llm_int8_skip_modules"] == \
        ["lm_head", "model.layers.0.self_attn.q_proj"]
    bailong.save(model, tmp_path / "saved")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu").eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():  # bitsandbytes' own CPU 4-bit matmul: 4e-3 from ours on the unchanged checkpoint too
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-2, rtol=0)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_checkpoint_gives_the_logits_of_its_dequantized_weights(tmp_path, double_quant):
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    quantized = quantize_with_transformers(source, tmp_path / "q", double_quant=double_quant)
    model, _ = bailong.load(quantized, device="cpu")
    assert all(isinstance(m, NF4Linear) for _, m in projections(model))
    assert model.model.layers[0].mlp.up_proj.weight.double_quant == double_quant
    reference = dequantized_reference(source, quantized)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)


def test_stories260k_quantized_by_transformers(tmp_path):
    source = asset("stories260K")  # its MLP width, 172, is not a multiple of the blocksize
    quantized = quantize_with_transformers(source, tmp_path / "q")
    model, _ = bailong.load(quantized, device="cpu")
    reference = dequantized_reference(source, quantized)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)


def test_quantizing_while_loading_writes_what_transformers_writes(tmp_path, capsys):
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    theirs = load_file(quantize_with_transformers(source, tmp_path / "q") / "model.safetensors")
    capsys.readouterr()
    model, _ = bailong.load(source, device="cpu", quantize="nf4")
    err = capsys.readouterr().err
    assert "quantized to NF4 while loading: mean |error|" in err and "model memory:" in err
    ours = model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_what_we_save_loads_in_transformers_with_the_same_logits(tmp_path):
    source, _ = write_hf(tmp_path, "tied", **SHAPE)
    model, _ = bailong.load(source, device="cpu", quantize="nf4")
    bailong.save(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu")
    theirs.train()  # in eval mode on CPUs with AVX-512 BF16, bitsandbytes repacks weights for a bf16 kernel
    again, _ = bailong.load(tmp_path / "saved", device="cpu")
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=0)
        assert torch.equal(again(ids), expected)


def test_quantized_model_follows_devices_not_dtypes(tmp_path):
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    model, _ = bailong.load(source, device="cpu", quantize="nf4", double_quant=False, blocksize=128)
    q_proj = model.model.layers[0].self_attn.q_proj
    model.to(torch.bfloat16)
    assert q_proj.weight.absmax.dtype == torch.float32 and q_proj.weight.blocksize == 128
    assert model.lm_head.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 300, (1, 5)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert not list(q_proj.parameters())  # frozen: nothing for an optimizer to find


def test_memory_report(tmp_path):
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    model, _ = bailong.load(source, device="cpu", quantize="nf4")
    report = memory_report(model)
    nf4 = sum(m.weight.nbytes for _, m in projections(model))
    dense = sum(p.numel() * 4 for p in model.parameters())
    n = sum(m.weight.numel for _, m in projections(model)) + sum(p.numel() for p in model.parameters())
    assert "in 21 NF4 matrices" in report and f"{(nf4 + dense) / (2 * n):.1%}" in report


@pytest.mark.parametrize("quant_type", ["fp4"])
def test_fp4_checkpoint_is_refused(tmp_path, quant_type):
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    quantized = quantize_with_transformers(source, tmp_path / "q", quant_type=quant_type)
    with pytest.raises(BailongError, match="bnb_4bit_quant_type 'fp4' is not supported"):
        bailong.load(quantized, device="cpu")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4"  # a config that lies about its tensors
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(BailongError, match="quant_state fp4 is not supported"):
        bailong.load(quantized, device="cpu")


def test_other_quantizations_and_inconsistent_states_are_refused(tmp_path):
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    quantized = quantize_with_transformers(source, tmp_path / "q")
    config_file = quantized / "config.json"
    good = json.loads(config_file.read_text())
    for change, message in [({"load_in_8bit": True, "load_in_4bit": False}, "8-bit bitsandbytes"),
                            ({"quant_method": "gptq"}, "quantization 'gptq' is not supported")]:
        config_file.write_text(json.dumps({**good, "quantization_config": {**good["quantization_config"], **change}}))
        with pytest.raises(BailongError, match=message):
            bailong.load(quantized, device="cpu")
    config_file.write_text(json.dumps({**good, "quantization_config": "bnb"}))
    with pytest.raises(BailongError, match="quantization_config must be an object, not 'bnb'"):
        bailong.load(quantized, device="cpu")
    config_file.write_text(json.dumps(good))
    file = quantized / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.self_attn.o_proj.weight.absmax"
    tensors[name] = tensors[name][:-3]
    save_file(tensors, file)
    with pytest.raises(BailongError, match="model.safetensors: model.layers.1.self_attn.o_proj.weight: absmax is "
                                           "uint8 \\[253\\], but quant_state"):
        bailong.load(quantized, device="cpu")


def test_quantized_shape_must_fit_the_config(tmp_path):
    source, _ = write_hf(tmp_path, "gqa", **SHAPE)
    quantized = quantize_with_transformers(source, tmp_path / "q")
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(BailongError, match="mlp.(gate|up|down)_proj.weight is quantized with shape"):
        bailong.load(quantized, device="cpu")


def test_a_quantized_models_state_dict_loads_back(tmp_path):
    """``model.state_dict()`` of an NF4 model, with LoRA or without, loads back into a model of its shape through
    torch.save and torch.load(weights_only=True): the same outputs and tensors. It holds bitsandbytes' keys, which
    ``load_state_dict`` called unexpected. As torch loads parameters: into the weights' own tensors, their dtype
    kept; for another blocksize into new ones, never the state dict's; with assign=True the state dict's. A dense
    state dict for NF4 layers is refused, naming the weight."""
    from test_lora import randomize

    from bailong.lora import LoRAConfig, inject_lora, lora_parameters
    from bailong.quantized import quantize_model

    def model(seed, lora):
        made = quantize_model(bailong.load_preset("tiny", device="cpu", seed=seed)[0])
        if lora:
            randomize(lora_parameters(inject_lora(made, LoRAConfig(r=4, dropout=0.0))), seed)
        return made.eval()
    ids = torch.randint(0, 260, (2, 9), generator=torch.Generator().manual_seed(0))
    for lora in (False, True):
        source, target = model(0, lora), model(1, lora)
        torch.save(source.state_dict(), tmp_path / "state.pt")
        packed = target.model.layers[0].self_attn.q_proj.weight.data
        target.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        assert target.model.layers[0].self_attn.q_proj.weight.data is packed  # copied into (a CUDA graph reads it)
        with torch.no_grad():
            assert torch.equal(target(ids), source(ids))
        assert target.state_dict().keys() == source.state_dict().keys()
        assert all(torch.equal(t, source.state_dict()[k]) for k, t in target.state_dict().items())
    other, target = quantize_model(bailong.load_preset("tiny", device="cpu", seed=2)[0], blocksize=128), model(1, False)
    target.load_state_dict(other.state_dict())  # another blocksize: new tensors, not the state dict's (other's)
    with torch.no_grad():
        assert torch.equal(target(ids), other.eval()(ids))
    up, others = target.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight
    assert up.blocksize == 128 and up.data.data_ptr() != others.data.data_ptr()
    bf16 = quantize_model(bailong.load_preset("tiny", device="cpu", seed=1, dtype=torch.bfloat16)[0])
    bf16.load_state_dict(model(0, False).state_dict())  # as a parameter keeps its dtype
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    on_meta = model(1, False).to("meta")  # assign=True: the state dict's tensors themselves
    on_meta.load_state_dict(other.state_dict(), assign=True)
    assert on_meta.model.layers[0].mlp.up_proj.weight.data is others.data
    with pytest.raises(RuntimeError, match="the state dict: model.layers.0.self_attn.q_proj.weight: missing "
                                           "quant_state"):
        model(1, False).load_state_dict(bailong.load_preset("tiny", device="cpu")[0].state_dict())
