"""train.py end to end: the embedded default, exact resume, several processes, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bailong.data import DATA_DIR, TokenData, read_conversations, split
from bailong.errors import BailongError, run_cli
from bailong.training import TrainConfig, latest_checkpoint, lr_at, parse_config
from conftest import ROOT

TRAIN = [sys.executable, str(ROOT / "train.py")]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_embedded_default_pretrain_sft_and_chat(tmp_path):
    pre, sft = tmp_path / "pretrain", tmp_path / "sft"
    result = subprocess.run(TRAIN + ["--stage", "pretrain", "--out", str(pre)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [loss for _, loss in losses(pre)]
    assert len(curve) == 300 and sum(curve[-20:]) / 20 < 0.6 * sum(curve[:20]) / 20  # clearly learned
    assert (pre / "loss.png").stat().st_size > 1000 and (pre / "adapter" / "tokenizer.model").exists()
    assert "vocabulary: +300 pieces (260 -> 560)" in result.stdout
    result = subprocess.run(TRAIN + ["--stage", "sft", "--init", str(pre), "--out", str(sft)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [loss for _, loss in losses(sft)]
    assert sum(curve[-20:]) / 20 < 0.5 * sum(curve[:20]) / 20
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(sft), "--prompt", "臺灣最高的山是哪一座？",
                             "--temperature", "0", "--max-new-tokens", "30"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_bfloat16_autocast_with_activation_checkpointing_trains(tmp_path):
    """What a GPU run does by default (bf16 weights and autocast, recomputed layers), on the CPU."""
    out = tmp_path / "bf16"
    result = subprocess.run(TRAIN + ["--precision", "bf16", "--checkpointing", "on", "--steps", "60",
                                     "--eval-every", "30", "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [loss for _, loss in losses(out)]
    assert sum(curve[-10:]) / 10 < 0.8 * sum(curve[:10]) / 10
    from safetensors.torch import load_file
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for k, t in saved.items() if "lora_" in k)  # LoRA kept in fp32


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    args = ["--steps", "40", "--save-every", "10", "--eval-every", "20", "--new-pieces", "100"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run(TRAIN + args + ["--out", str(whole)], capture_output=True, timeout=600).returncode == 0
    process = subprocess.Popen(TRAIN + args + ["--out", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it somewhere after its second checkpoint
        if (killed / "metrics.jsonl").exists() and any(step >= 25 for step, _ in losses(killed)):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest_checkpoint(killed).name in ("step-0000020", "step-0000030")
    again = subprocess.run(TRAIN + args + ["--out", str(killed), "--resume"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout
    assert losses(killed) == losses(whole)  # every step, to the last bit


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert subprocess.run(TRAIN + ["--steps", "10", "--save-every", "5", "--new-pieces", "50", "--out", str(out)],
                          capture_output=True, timeout=600).returncode == 0
    from bailong import training
    before = latest_checkpoint(out)
    monkeypatch.setattr(training.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    model, _ = __import__("bailong").load(out, device="cpu")
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n])
    with pytest.raises(OSError):
        training.save_checkpoint(out, 15, model, training_lora(), __import__("bailong").Tokenizer(
            out / "adapter" / "tokenizer.model"), optimizer)
    assert latest_checkpoint(out) == before
    monkeypatch.undo()
    assert training.load_checkpoint(before, model, torch.optim.AdamW(
        [p for n, p in model.named_parameters() if "lora_" in n])) == 10


def training_lora():
    from bailong.lora import LoRAConfig
    return LoRAConfig(r=16, alpha=32.0)


def test_two_processes_give_the_gradients_of_one_over_the_combined_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_step.py"), str(tmp_path), "8"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "tests" / "ddp_step.py"), str(tmp_path), "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    single, double = torch.load(tmp_path / "grads-1.pt"), torch.load(tmp_path / "grads-2.pt")
    for name, grad in single.items():
        torch.testing.assert_close(double[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_sft_examples_train_on_assistant_tokens_only():
    from bailong.chat_template import training_example
    from bailong.tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    chats = read_conversations([DATA_DIR / "chats_sample.jsonl"])
    encoded = [training_example(tok, c) for c in chats[:3]]
    ids = [i for e, _ in encoded for i in e]
    labels = [i for _, lab in encoded for i in lab]
    offsets = [0]
    for e, _ in encoded:
        offsets.append(offsets[-1] + len(e))
    data = TokenData(torch.tensor(ids).numpy(), torch.tensor(labels).numpy(), torch.tensor(offsets).numpy(), 256,
                     pad_id=2)
    inputs, targets = data.example(0)
    kept = targets[targets != -100].tolist()
    answer = chats[0][1]["content"]
    assert kept == tok.encode(answer, eos=True)  # the assistant's tokens and its eos, nothing else
    assert inputs[:len(encoded[0][0]) - 1].tolist() == encoded[0][0][:-1]


def test_held_out_split_is_whole_documents_and_seeded():
    items = [f"document {i}" for i in range(20)]
    train, held = split(items, 0.1, seed=3)
    assert len(held) == 2 and sorted(train + held) == sorted(items) and split(items, 0.1, seed=3) == (train, held)
    assert split(items[:1], 0.5, 0) == (items[:1], [])


def test_schedule_and_config():
    config = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, config) == pytest.approx(1e-4) and lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(99, config) == pytest.approx(1e-4, rel=1e-2) and lr_at(55, config) == pytest.approx(5.5e-4, rel=1e-2)
    assert parse_config(["--stage", "sft", "--lora-r", "8"]).init == "out/pretrain"
    assert parse_config([]).out == "out/pretrain" and parse_config(["--no-rslora"]).rslora is False


def error_of(capsys, *argv):
    capsys.readouterr()
    import train
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, list(map(str, argv)))
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_bad_input(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    out = ["--out", tmp_path / "o", "--steps", "2"]
    assert "missing.txt: no such folder" in error_of(capsys, "--data", tmp_path / "missing.txt", *out)
    (tmp_path / "empty.txt").write_text("\n")
    assert "the corpus is empty" in error_of(capsys, "--data", tmp_path / "empty.txt", *out)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe broken\n")
    assert "not UTF-8 text" in error_of(capsys, "--data", tmp_path / "bad.txt", *out)  # refused, not skipped
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                     'not json\n')
    assert f"{chats}:2: expected" in error_of(capsys, "--stage", "sft", "--init", ROOT, "--data", chats, *out)
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}\n')
    assert "unknown role 'robot'" in error_of(capsys, "--stage", "sft", "--init", ROOT, "--data", chats, *out)
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert "no assistant turn" in error_of(capsys, "--stage", "sft", "--init", ROOT, "--data", chats, *out)
    assert "longer than the model's context (256)" in error_of(capsys, "--seq-len", "1024", *out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text("{}")
    (other / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert "already holds a different run" in error_of(capsys, "--out", other, "--steps", "2")
    assert (other / "run.json").read_text() == "{}"
    (other / "run.json").unlink()
    assert "holds files that are not a training run" in error_of(capsys, "--out", other, "--steps", "2")
    assert "--stage must be pretrain or sft" in error_of(capsys, "--stage", "finetune")
    assert "--precision must be one of auto, bf16, fp32" in error_of(capsys, "--precision", "fp16")
    with pytest.raises(BailongError, match="no conversations"):
        read_conversations([tmp_path / "empty.txt"])


def test_torchrun_two_processes_train_and_rank_zero_writes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / "train.py"),
                             "--steps", "4", "--new-pieces", "50", "--eval-every", "2", "--out", str(tmp_path / "ddp")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and [s for s, _ in losses(tmp_path / "ddp")] == [1, 2, 3, 4]
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").exists()


def test_ctrl_c_saves_and_a_non_finite_loss_stops(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(TRAIN + ["--steps", "100000", "--new-pieces", "50", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 5):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted: saved" in stdout and latest_checkpoint(out) is not None
    result = subprocess.run(TRAIN + ["--steps", "5", "--new-pieces", "50", "--lr", "1e30", "--warmup", "1",
                                     "--grad-clip", "1e30", "--out", str(tmp_path / "nan")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "error: the loss is" in result.stderr and "stopped" in result.stderr, \
        result.stderr[-2000:]


def test_token_cache_is_reused(tmp_path):
    from bailong.data import tokenize
    from bailong.tokenizer import byte_tokenizer
    docs = ["臺灣", "hello world"]
    ids, labels, offsets = tokenize(byte_tokenizer(), docs, tmp_path, 1)
    assert labels is None and ids.tolist()[-1] == 2 and offsets.tolist() == [0, 8, 21]  # "▁" + 6 bytes + eos; "▁hello▁world" + eos
    again = tokenize(byte_tokenizer(), docs, tmp_path, 1)
    assert isinstance(again[0], __import__("numpy").memmap) and again[0].tolist() == ids.tolist()
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_parallel_tokenization_equals_serial_and_hub_datasets_resolve(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from bailong.data import data_paths, tokenize
    from bailong.tokenizer import byte_tokenizer
    docs = [f"第 {i} 行 line {i}" for i in range(2500)]
    parallel = tokenize(byte_tokenizer(), docs, tmp_path / "a", workers=2)
    serial = tokenize(byte_tokenizer(), docs, tmp_path / "b", workers=1)
    assert parallel[0].tolist() == serial[0].tolist() and parallel[2].tolist() == serial[2].tolist()
    snapshot = tmp_path / "hub" / "datasets--bailong-tests--corpus" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "part.txt").write_text("臺灣\n")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert data_paths(["bailong-tests/corpus"]) == [snapshot]


def test_a_real_checkpoint_and_tokenizer_through_both_stages(tmp_path):
    """The path a real run takes: a Hugging Face folder with the Llama 2 tokenizer, quantized while loading;
    the adapter carries the grown vocabulary and loading resizes the base to fit."""
    import shutil

    from hf_models import write_hf

    import bailong
    from conftest import asset
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32000, hidden_size=64, intermediate_size=128,
                         max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), folder / "tokenizer.model")
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    for argv in (["--model", folder, "--new-pieces", "200", "--out", pre],
                 ["--stage", "sft", "--init", pre, "--out", sft]):
        result = subprocess.run(TRAIN + list(map(str, argv)) + ["--steps", "12", "--eval-every", "6"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (pre / "base").exists()  # the base is the user's folder, named in the adapter config
    assert json.loads((pre / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    model, tokenizer = bailong.load(pre, device="cpu")
    assert model.config.vocab_size == tokenizer.vocab_size == 32200
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.abs().sum() > 0
    model, tokenizer = bailong.load(sft, device="cpu")
    assert tokenizer.vocab_size == 32200 and (sft / "base" / "model.safetensors").exists()
