"""Loading and saving checkpoints, and the one-line errors for bad ones."""
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from hf_models import write_hf
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import bailong
import chat
from bailong.errors import BailongWarning, run_cli
from conftest import ROOT


def cli_error(capsys, *argv):
    """Run chat.py's main as the command line does; return its one-line error."""
    capsys.readouterr()  # drop what setting up the checkpoint printed
    with pytest.raises(SystemExit) as exit_:
        run_cli(chat.main, [*map(str, argv), "--prompt", "hi", "--device", "cpu"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def ckpt(tmp_path):
    folder, _ = write_hf(tmp_path, "gqa")
    return folder


def edit_weights(folder, change):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_missing_folder_and_missing_repo(capsys, tmp_path):
    err = cli_error(capsys, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in err and "no such folder" in err
    err = cli_error(capsys, "bailong-tests/no-such-model")  # offline: not in the Hub cache either
    assert "bailong-tests/no-such-model: no such folder, and not available from the Hugging Face Hub" in err


def test_folder_without_config(capsys, ckpt):
    (ckpt / "config.json").unlink()
    assert f"{ckpt / 'config.json'}: no such file" in cli_error(capsys, ckpt)


def test_unsupported_architecture(capsys, ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "unsupported architecture MistralForCausalLM" in cli_error(capsys, ckpt)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors(capsys, ckpt, keep):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])
    assert f"{file}: not a valid safetensors file" in cli_error(capsys, ckpt)


def test_corrupted_safetensors_header(capsys, ckpt):
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header
    file.write_bytes(bytes(data))
    assert f"{file}: not a valid safetensors file" in cli_error(capsys, ckpt)


def test_missing_tensor(capsys, ckpt):
    edit_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert f"{ckpt}: the checkpoint lacks tensor model.layers.1.mlp.up_proj.weight" in cli_error(capsys, ckpt)


def test_tensor_of_wrong_shape(capsys, ckpt):
    file = edit_weights(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    err = cli_error(capsys, ckpt)
    assert f"{file}: tensor model.norm.weight has shape [65], config.json implies [64]" in err


def test_sizes_config_json_mistypes_are_refused_before_memory_is_taken(capsys, ckpt):
    """A config.json far larger than its checkpoint asked the machine for terabytes (a traceback), or built a
    hundred million layers (minutes, memory growing): its sizes are checked against the files' headers first."""
    config = json.loads((ckpt / "config.json").read_text())
    for key, value, said in [("vocab_size", 10**12, "has shape [300, 64], config.json implies [1000000000000, 64]"),
                             ("hidden_size", 4 * 10**6, "config.json implies"),
                             ("intermediate_size", 10**11, "config.json implies [64, 100000000000]"),
                             ("num_hidden_layers", 10**8, f"num_hidden_layers is {10**8}, but the checkpoint holds")]:
        (ckpt / "config.json").write_text(json.dumps({**config, key: value}))
        assert said in cli_error(capsys, ckpt), key


def test_unexpected_and_non_float_tensors(capsys, ckpt):
    file = edit_weights(ckpt, lambda t: t.update({"model.layers.9.extra": torch.ones(3)}))
    assert f"{file}: unexpected tensor model.layers.9.extra" in cli_error(capsys, ckpt)
    edit_weights(ckpt, lambda t: t.update({k.removeprefix("model."): t.pop(k) for k in list(t)}))  # a LlamaModel's
    assert "holds no tensor named model.layers.0... (it holds layers.0.input_layernorm.weight) (a LlamaModel's " \
           "checkpoint, without the LM head): not a LlamaForCausalLM's checkpoint" in cli_error(capsys, ckpt)
    edit_weights(ckpt, lambda t: t.update({f"module.{k}": t.pop(k) for k in list(t)}))  # a DDP module's
    assert "(it holds module.layers.0.input_layernorm.weight): not a LlamaForCausalLM" in cli_error(capsys, ckpt)
    edit_weights(ckpt, lambda t: t.update({k.removeprefix("module."): t.pop(k) for k in list(t)}))
    edit_weights(ckpt, lambda t: t.update({f"model.{k}" if k != "lm_head.weight" else k: t.pop(k) for k in list(t)}))
    edit_weights(ckpt, lambda t: (t.pop("model.layers.9.extra"), t.update({"model.norm.weight": torch.ones(64).int()})))
    assert f"{file}: tensor model.norm.weight is I32" in cli_error(capsys, ckpt)


def test_index_naming_missing_shard(capsys, tmp_path):
    folder, _ = write_hf(tmp_path, "gqa", shard_size="40KB")
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"]["model.norm.weight"]
    (folder / shard).unlink()
    assert f"{index}: names shard {shard}, which is missing" in cli_error(capsys, folder)
    (folder / shard).mkdir()  # a folder of that name: safetensors said only "No such device (os error 19)"
    assert f"{index}: names shard {shard}, which is not a file" in cli_error(capsys, folder)
    (folder / shard).rmdir()
    (folder / "model.safetensors").mkdir()
    assert f"{folder / 'model.safetensors'}: is not a file" in cli_error(capsys, folder)
    (folder / "model.safetensors").rmdir()
    for damaged in ({"weight_map": 5}, {"weight_map": {"lm_head.weight": None}}):
        index.write_text(json.dumps(damaged))
        assert f"{index}: not a valid safetensors index (TypeError: weight_map is not an object of tensor names " \
               "and file names)" in cli_error(capsys, folder)
    other = tmp_path / "elsewhere" / "model.safetensors"  # a shard outside the folder is not read
    other.parent.mkdir()
    shutil.copy(next(folder.glob("model-*.safetensors")), other)
    for outside in (str(other), "../elsewhere/model.safetensors"):
        index.write_text(json.dumps({"weight_map": {"model.norm.weight": outside}}))
        assert f"{index}: names shard {outside}, outside its folder" in cli_error(capsys, folder)


def test_index_naming_tensor_absent_from_shard(capsys, tmp_path):
    folder, _ = write_hf(tmp_path, "gqa", shard_size="40KB")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.ghost"] = data["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(data))
    assert "the index says it holds model.layers.0.ghost, but it does not" in cli_error(capsys, folder)


def test_error_from_real_command_line_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(tmp_path / "absent"), "--prompt", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent'}: no such folder "
                                                  "(and not a valid Hub repo id)"]


@pytest.mark.parametrize("kind", ["gqa", "tied"])
def test_save_round_trips_and_loads_in_transformers(tmp_path, kind):
    folder, hf = write_hf(tmp_path, kind)
    model, _ = bailong.load(folder, device="cpu")
    out = tmp_path / "saved"
    bailong.save(model, out, max_shard_bytes=50_000)  # small shards: exercise the index
    assert (out / "model.safetensors.index.json").exists() and not list(out.glob("*.tmp"))
    ids = torch.randint(0, 300, (1, 12))
    again, _ = bailong.load(out, device="cpu")
    theirs = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(again(ids), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-4, rtol=0)


def test_saving_again_in_the_other_layout_leaves_no_stale_weights_and_lora_must_be_merged(tmp_path):
    """One file over an earlier save's shards left their index, which the loader reads first: the old weights came
    back. An unmerged LoRA model is refused: transformers would load the folder as the bare base."""
    from bailong.errors import BailongError
    from bailong.lora import LoRAConfig, inject_lora, merge_lora
    folder, _ = write_hf(tmp_path, "gqa")
    model, _ = bailong.load(folder, device="cpu")
    out = tmp_path / "saved"
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("the user's")
    bailong.save(model, out, max_shard_bytes=50_000)
    with torch.no_grad():
        model.lm_head.weight *= 2
    bailong.save(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    torch.testing.assert_close(bailong.load(out, device="cpu")[0].lm_head.weight, model.lm_head.weight)
    bailong.save(model, out, max_shard_bytes=50_000)
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    inject_lora(model, LoRAConfig(r=4))
    with pytest.raises(BailongError, match="the model carries LoRA .*; merge it first"):
        bailong.save(model, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    merge_lora(model)
    bailong.save(model, tmp_path / "merged")


def test_cast_on_load_from_half_precision_files(tmp_path):
    folder, hf = write_hf(tmp_path, "gqa")
    hf.to(torch.bfloat16).save_pretrained(folder)  # bfloat16 on disk
    model, _ = bailong.load(folder, dtype=torch.float32, device="cpu")
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight.float())


def test_repo_id_loads_from_the_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    folder, hf = write_hf(tmp_path, "gqa", shard_size="40KB")
    snapshot = tmp_path / "hub" / "models--bailong-tests--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, _ = bailong.load("bailong-tests/tiny", device="cpu")
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_a_hub_repo_of_pickled_weights_alone_is_named_so(tmp_path, monkeypatch):
    """Its .bin files are never fetched: what it holds is asked of the Hub (faked here: no network)."""
    import huggingface_hub

    from bailong.errors import BailongError
    from bailong.hub import resolve
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kwargs: str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, revision=None: ["config.json", "pytorch_model.bin"])
    with pytest.raises(BailongError, match="^someone/old-model: holds only pickled .bin weights, which are not "
                                           "loaded"):
        resolve("someone/old-model")



def test_a_hub_index_names_the_files_fetched_not_patterns(tmp_path, monkeypatch):
    """A "*" in a repo's index fetched every file of the repo (the names went to the Hub as patterns)."""
    import huggingface_hub

    from bailong.hub import resolve
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "*", "b": "m[1].st"}}))
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns, **kwargs: fetched.append(allow_patterns) or str(tmp_path))
    resolve("someone/model")
    assert fetched[-2:] == [["model.safetensors"], ["[*]", "m[[]1].st"]]


def test_a_hub_repo_with_both_layouts_gives_its_single_file_as_transformers_does(tmp_path, monkeypatch):
    """Its shards were fetched and loaded, other weights than transformers' (which fetches model.safetensors first),
    and, once transformers had put model.safetensors in the same snapshot, the weights changed under the run."""
    import fnmatch

    import huggingface_hub

    from bailong.hub import resolve
    repo, snapshot = tmp_path / "repo", tmp_path / "snapshot"
    write_hf(repo, "gqa", shard_size="40KB")
    write_hf(tmp_path / "single", "gqa", seed=1)
    shutil.copy(tmp_path / "single" / "gqa" / "model.safetensors", repo / "gqa")

    def snapshot_download(name, allow_patterns, **kwargs):  # what a real one keeps of the repo
        snapshot.mkdir(exist_ok=True)
        for file in (repo / "gqa").iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                shutil.copy(file, snapshot)
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert sorted(p.name for p in resolve("someone/both").iterdir() if p.suffix == ".safetensors") == [
        "model.safetensors"]


def test_a_tied_config_with_another_stored_head_unties_as_transformers_does(tmp_path):
    """config.json ties the head to the embedding, yet the checkpoint holds a different lm_head.weight:
    transformers warns and uses both; the stored head was written into the shared matrix, and the
    embedding, read after it, overwrote it (or the other way round, by the file's order)."""
    folder, _ = write_hf(tmp_path, "tied")
    file = folder / "model.safetensors"
    tensors = load_file(file)
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, file, metadata={"format": "pt"})
    ids = torch.randint(0, 300, (1, 12))
    theirs = LlamaForCausalLM.from_pretrained(folder).eval()
    assert not theirs.config.tie_word_embeddings or theirs.lm_head.weight is not theirs.model.embed_tokens.weight
    with pytest.warns(BailongWarning, match="ties the head to the embedding, but the checkpoint holds another "):
        model, _ = bailong.load(folder, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).logits)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # the same: tied, quietly
    save_file(tensors, file, metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", BailongWarning)
        model, _ = bailong.load(folder, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_config_whose_values_disagree_is_named(tmp_path, capsys):
    folder, _ = write_hf(tmp_path, "gqa")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(bailong.BailongError, match=rf"{folder / 'config.json'}: num_attention_heads \(\d+\) is not a "
                       r"multiple of num_key_value_heads \(3\)"):
        bailong.load(folder, device="cpu")


def test_a_preset_model_leaves_the_callers_random_state_as_it_was():
    """load_preset seeded torch's random state again: a caller's draws after it were the same whatever it had
    seeded. Its weights are still those its seed gave (drawn as before, on the CPU whatever the default device),
    and another seed's differ."""
    from bailong.config import preset
    from bailong.model import init_weights
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    model, tokenizer = bailong.load_preset("tiny", device="cpu", seed=5)
    assert torch.equal(torch.rand(3), expected)
    config = preset("tiny")
    config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(5)
    before = init_weights(bailong.Llama(config)).state_dict()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    other, _ = bailong.load_preset("tiny", device="cpu", seed=6)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    with torch.device("meta"):  # another default device (a notebook's "cuda"): drawn on the CPU all the same
        again, _ = bailong.load_preset("tiny", device="cpu", seed=5)
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())


def test_loading_generating_and_merging_import_no_compiler(ckpt):
    """torch draws an embedding's random weights on the meta device through code that imports torch._dynamo
    first (1.3 s, a third of chat.py's start on a 2-core machine), and makes a real tensor like a meta one through
    code that imports sympy's shapes (0.3 s): loading builds the model there, draws nothing and makes its tensors
    directly; a merge (an export) draws nothing; a forward and generate() import neither."""
    code = ("import sys; import bailong; from bailong.lora import LoRAConfig, inject_lora, merge_lora\n"
            "model, _ = bailong.load(sys.argv[1], quantize='nf4')\n"
            "bailong.generate(model, [1, 2, 3], max_new_tokens=3)\n"
            "merge_lora(inject_lora(model, LoRAConfig()))\n"
            "slow = ('torch._dynamo', 'torch.fx.experimental.symbolic_shapes')\n"
            "print(sorted(m for m in sys.modules if m.startswith(slow)))\n")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(ckpt)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:] + result.stdout[-500:]


def test_loading_draws_nothing_for_another_threads_modules(tmp_path):
    """Drawing nothing while loading held for the whole process when it was a patch of nn.Embedding: a notebook's
    or a server's embeddings built in another thread meanwhile kept empty memory (696 of 3,000 here)."""
    import threading
    model, _ = bailong.load_preset("tiny")  # quick to load: the model's building is much of it
    bailong.save(model, tmp_path / "model")
    done, loaded = threading.Event(), []

    def load_while_built():
        while not done.is_set():
            loaded.append(bailong.load(tmp_path / "model")[0].lm_head.weight.std().item())
    loader = threading.Thread(target=load_while_built)
    loader.start()
    try:
        drawn = [torch.nn.Embedding(256, 64).weight.std().item() for _ in range(3000)]  # normal(0, 1)
    finally:
        done.set()
        loader.join()
    assert all(0.8 < std < 1.2 for std in drawn), sum(not 0.8 < std < 1.2 for std in drawn)
    assert loaded and set(loaded) == {model.lm_head.weight.std().item()}  # loads ran meanwhile, and loaded well
