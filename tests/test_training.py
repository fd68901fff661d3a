"""train.py end to end: the embedded default, what a run keeps, bad input (resuming: test_resume.py; several
processes: test_processes.py; progress lines, metrics and the closing summary: test_progress.py)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bailong.data import TokenData, split
from bailong.errors import UsageError
from bailong.progress import lr_at
from bailong.run_folder import latest_checkpoint
from bailong.training import CHOICES, TrainConfig, parse_config
from conftest import ROOT
from train_runs import evals, losses, run_train

TRAIN = [sys.executable, str(ROOT / "train.py")]


def test_embedded_default_pretrain_sft_and_chat(tmp_path):
    """The quick start: both stages learn (held-out loss falls, not only training loss), the result is the
    adapter with the best held-out loss, and the README's quick start gives the losses this run gives."""
    readme = (ROOT / "README.md").read_text()
    said = re.search(r"\((\d\.\d+) before training, (\d\.\d+) after\)", readme)
    said_sft = re.search(r"held-out loss (\d\.\d+) -> (\d\.\d+), the adapter of step (\d+), at\s+(\d\.\d+), kept",
                         readme)
    pre, sft = tmp_path / "pretrain", tmp_path / "sft"
    result = subprocess.run(TRAIN + ["--stage", "pretrain", "--out", str(pre)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [loss for _, loss in losses(pre)]
    assert len(curve) == 100 and sum(curve[-10:]) / 10 < 0.7 * sum(curve[:10]) / 10  # clearly learned
    held = [loss for _, loss in evals(pre)]
    assert [s for s, _ in evals(pre)] == [0, 20, 40, 60, 80, 100]
    assert all(b < a for a, b in zip(held, held[1:])), held  # held-out loss falls at every evaluation
    assert (pre / "loss.png").stat().st_size > 1000 and (pre / "adapter" / "tokenizer.model").exists()
    # measured on held-out text: not on the training text the pieces were learned from, which they fit better
    assert "vocabulary: +300 pieces (260 -> 560); held-out text (453 characters)" in result.stdout
    assert "(the adapter of step 100, best on held-out data)" in result.stdout
    assert 3.6 < float(re.search(r"best (\d\.\d+) at step 100", result.stdout)[1]) < 3.8  # 3.6972 here
    assert [abs(float(x) - loss) < 0.006 for x, loss in zip(said.groups(), (held[0], held[-1]))] == [True, True], \
        (said[0], held)  # the README's figures, rounded
    result = subprocess.run(TRAIN + ["--stage", "sft", "--init", str(pre), "--out", str(sft)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    held = [loss for _, loss in evals(sft)]
    assert len(losses(sft)) >= 40 and min(held[1:]) < held[0] - 0.05 and held[-1] < held[0]
    best_step, best = min(evals(sft), key=lambda e: e[1])
    assert int(said_sft[3]) == best_step and abs(float(said_sft[4]) - best) < 0.0006, (said_sft[0], evals(sft))
    assert [abs(float(said_sft[i]) - loss) < 0.006 for i, loss in ((1, held[0]), (2, best))] == [True, True]
    assert "warning" not in result.stdout
    result = subprocess.run([sys.executable, str(ROOT / "chat.py"), str(sft), "--prompt", "臺灣最高的山是哪一座？",
                             "--temperature", "0", "--max-new-tokens", "30"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_bfloat16_autocast_with_activation_checkpointing_trains(tmp_path):
    """What a GPU run does by default (bf16 weights and autocast, recomputed layers), on the CPU."""
    out = tmp_path / "bf16"
    result = subprocess.run(TRAIN + ["--precision", "bf16", "--checkpointing", "on", "--steps", "30",
                                     "--eval-every", "30", "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [loss for _, loss in losses(out)]
    assert sum(curve[-10:]) / 10 < 0.85 * sum(curve[:10]) / 10  # 0.80 here: 30 steps learn less than 100
    from safetensors.torch import load_file
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for k, t in saved.items() if "lora_" in k)  # LoRA kept in fp32


def test_the_8bit_optimizer_trains_and_resumes_exactly(tmp_path, capsys):
    """--optimizer adamw8bit: the checkpoints hold the moments' uint8 codes, a resumed run logs the same losses as
    one that never stopped, the losses stay within 1% of a run with float32 moments, and another optimizer cannot
    resume the run."""
    args = ["--save-every", "4", "--eval-every", "4", "--new-pieces", "50", "--lora-r", "64"]  # r x 64 >= 4096 values
    whole, resumed, float32 = tmp_path / "whole", tmp_path / "resumed", tmp_path / "float32"
    run_train(capsys, *args, "--steps", "12", "--optimizer", "adamw8bit", "--out", whole)
    run_train(capsys, *args, "--steps", "8", "--optimizer", "adamw8bit", "--out", resumed)
    run_train(capsys, *args, "--steps", "12", "--optimizer", "adamw8bit", "--out", resumed, "--resume")
    assert losses(resumed) == losses(whole)
    state = torch.load(resumed / "checkpoints" / "step-0000012" / "state.pt", weights_only=True)["optimizer"]
    codes = [s["exp_avg"] for s in state["state"].values() if "exp_avg_absmax" in s]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
    run_train(capsys, *args, "--steps", "12", "--out", float32)
    apart = [abs(a - b) / b for (_, a), (_, b) in zip(losses(whole), losses(float32))]
    assert 0 < max(apart) < 0.01  # rounded moments: another run, the same training
    _, err = run_train(capsys, *args, "--steps", "16", "--out", resumed, "--resume", code=2)
    assert "--optimizer was 'adamw8bit', now 'adamw'" in err


def test_keep_dequantized_trains_the_same_run_with_fewer_dequantizations(tmp_path, capsys, monkeypatch):
    """--keep-dequantized (bailong.recompute), activation checkpointing on: the losses of a run without it, fewer
    NF4 dequantizations, and a run continues with or without it (it changes nothing the run computes)."""
    from bailong.nf4 import NF4Tensor
    calls, dequantize = [], NF4Tensor.dequantize
    monkeypatch.setattr(NF4Tensor, "dequantize", lambda q, *a, **k: calls.append(q) or dequantize(q, *a, **k))
    args, counts = ["--checkpointing", "on", "--eval-every", "4", "--save-every", "4"], {}
    for name, keep in [("plain", []), ("kept", ["--keep-dequantized"])]:
        calls.clear()
        run_train(capsys, *args, *keep, "--steps", "4", "--out", tmp_path / name)
        counts[name] = len(calls)
    assert losses(tmp_path / "kept") == losses(tmp_path / "plain")
    assert counts["kept"] < 0.8 * counts["plain"]
    run_train(capsys, *args, "--steps", "8", "--keep-dequantized", "--resume", "--out", tmp_path / "plain")
    assert [step for step, _ in losses(tmp_path / "plain")] == list(range(1, 9))


def test_each_micro_batch_of_a_run_takes_new_examples(tmp_path, capsys, monkeypatch):
    """With --grad-accum, a step's micro-batches and the next step's are all other examples (overlapping, about
    half the data would never be seen)."""
    seen, batch = [], TokenData.batch

    def recorded(self, indices):
        seen.append(tuple(indices))
        return batch(self, indices)
    monkeypatch.setattr(TokenData, "batch", recorded)
    run_train(capsys, "--steps", "2", "--grad-accum", "2", "--batch-size", "2", "--held-out", "0", "--out",
              tmp_path / "run")
    taken = [i for indices in seen for i in indices]
    assert len(seen) == 4 and len(set(taken)) == 8, seen


def test_the_held_out_loss_weighs_every_answer_token_alike(tmp_path, capsys):
    """The held-out loss (which picks the adapter kept, and stops a run by --patience) is the mean over every
    answer token: two conversations in two batches give what they give in one (a mean of the batches' means
    would weigh a short answer's tokens more)."""
    run_train(capsys, "--steps", "10", "--held-out", "0", "--out", tmp_path / "pre")  # losses far from uniform
    held = []
    for batches, size in [(2, 1), (1, 2)]:
        out = tmp_path / f"sft-{batches}"
        run_train(capsys, "--stage", "sft", "--init", tmp_path / "pre", "--steps", "1", "--eval-batches", batches,
                  "--batch-size", size, "--out", out)
        held.append(evals(out)[0])
    assert held[0][0] == 0 and held[0][1] == pytest.approx(held[1][1], rel=1e-6), held


def test_the_result_is_the_best_held_out_adapter_and_patience_stops_a_run_that_memorises(tmp_path, capsys):
    """A run that overfits (the pre-training rate for 300 steps) stops once held-out loss has not improved
    for --patience evaluations; adapter/ holds the best evaluated step, the checkpoint the last."""
    import bailong
    from bailong.token_cache import tokenize
    from bailong.data import data_paths, read_corpus
    out = tmp_path / "run"
    stdout, _ = run_train(capsys, "--steps", "300", "--eval-every", "25", "--patience", "2", "--out", out)
    record = evals(out)
    best_step, best = min(record[1:], key=lambda r: r[1])
    last_step = record[-1][0]
    assert f"stopped early after step {last_step}: held-out loss has not improved for 2 evaluations" in stdout
    assert last_step < 300 and record[-1][1] > best and record[-2][1] > best and best_step == last_step - 50
    assert f"(the adapter of step {best_step}, best on held-out data)" in stdout
    assert latest_checkpoint(out).name == f"step-{last_step:07d}"
    # the result, loaded as chat.py loads it, has exactly the best held-out loss
    model, tokenizer = bailong.load(out, device="cpu", quantize="nf4")
    config = TrainConfig()
    _, held = split(read_corpus(data_paths(config.data)), config.held_out, config.seed)
    data = TokenData(*tokenize(tokenizer, held, tmp_path / "cache", 1), config.seq_len, tokenizer.eos_id,
                     bos=tokenizer.adds_bos)
    inputs, targets = data.batch(range(min(data.n, config.eval_batches * config.batch_size)))
    with torch.no_grad():  # the mean over the targeted tokens: each document's bos is none
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    assert (targets == -100).any() and loss.item() == pytest.approx(best, abs=1e-5)


def test_the_startup_says_how_many_held_out_examples_an_evaluation_measures(tmp_path, capsys):
    stdout, _ = run_train(capsys, "--steps", "1", "--batch-size", "1", "--eval-batches", "3", "--out", tmp_path / "a")
    assert "and 4 held-out examples of 128 tokens (the held-out loss over the first 3: --eval-batches);" in stdout
    stdout, _ = run_train(capsys, "--steps", "1", "--batch-size", "2", "--eval-batches", "3", "--out", tmp_path / "b")
    assert "and 4 held-out examples of 128 tokens; 1 steps" in stdout


def test_no_held_out_data_keeps_the_last_step_and_says_so(tmp_path, capsys, monkeypatch):
    """The result is saved before the last step's checkpoint: a kill between them leaves a run --resume finishes
    (the other way round, a finished run without its result)."""
    from bailong import checkpoints
    out, real_save, seen = tmp_path / "run", checkpoints.save_checkpoint, []
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda *a, **k: seen.append(
        (a[1], (out / "adapter").exists())) or real_save(*a, **k))
    stdout, _ = run_train(capsys, "--steps", "6", "--held-out", "0", "--new-pieces", "50", "--save-every", "4",
                          "--out", out)
    assert seen == [(4, False), (6, True)]
    assert "no held-out data (--held-out 0)" in stdout and "(the adapter of the last step, 6)" in stdout
    assert (out / "loss.png").stat().st_size > 1000 and (out / "adapter" / "adapter_model.safetensors").exists()
    import bailong  # a checkpoint folder loads like the run itself (its base is found two folders up)
    model, tokenizer = bailong.load(latest_checkpoint(out), device="cpu")
    assert tokenizer.vocab_size == model.config.vocab_size == 260 + 50


def test_schedule_and_config():
    config = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, config) == pytest.approx(1e-4) and lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(99, config) == pytest.approx(1e-4, rel=1e-2) and lr_at(55, config) == pytest.approx(5.5e-4, rel=1e-2)
    assert parse_config(["--stage", "sft", "--lora-r", "8"]).init == "out/pretrain"
    with pytest.raises(UsageError, match="--seed must be from 0 to 4294967295"):  # past any float, too
        parse_config(["--seed", str(10**400)])
    with pytest.raises(UsageError, match="--seed must be from 0 to 4294967295, not -1"):
        parse_config(["--seed", "-1"])
    assert parse_config([]).out == "out/pretrain" and parse_config(["--no-rslora"]).rslora is False
    sft = parse_config(["--stage", "sft"])  # fine-tuning has its own defaults; what is given still wins
    assert (sft.lr, sft.steps, parse_config([]).lr) == (1e-4, 60, 2e-3)
    assert parse_config(["--stage", "sft", "--lr", "3e-4"]).lr == 3e-4
    # an --lr below the default --min-lr ends at a tenth of it, as the defaults do (it was refused for a --min-lr
    # never given); one above it, or a --min-lr given, is as before
    assert [(c.lr, c.min_lr) for c in map(parse_config, (["--lr", "1e-4"], ["--lr", "4e-3"], ["--stage", "sft", "--lr",
            "5e-6"]))] == [(1e-4, 1e-5), (4e-3, 2e-4), (5e-6, 5e-6 / 10)]
    with pytest.raises(UsageError, match=r"--min-lr must be between 0 and --lr \(0.0001\), not 0.0002"):
        parse_config(["--lr", "1e-4", "--min-lr", "2e-4"])


def test_a_config_files_home_folder_is_the_users(tmp_path):
    """A "~" the shell did not expand (in a config file) is the home folder, not a folder named "~"."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"stage": "sft", "out": "~/runs/zh", "init": "~/runs/pretrain"}))
    parsed = parse_config(["--config", str(config)])
    assert (parsed.out, parsed.init) == (str(Path.home() / "runs/zh"), str(Path.home() / "runs/pretrain"))


def test_a_non_finite_loss_stops(tmp_path):
    result = subprocess.run(TRAIN + ["--steps", "5", "--new-pieces", "50", "--lr", "1e30", "--min-lr", "0",
                                     "--warmup", "1", "--grad-clip", "1e30", "--out", str(tmp_path / "nan")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "error: the loss is" in result.stderr and "stopped" in result.stderr, \
        result.stderr[-2000:]


def test_a_real_checkpoint_and_tokenizer_through_both_stages(tmp_path):
    """The path a real run takes: a Hugging Face folder with the Llama 2 tokenizer, quantized while loading;
    the adapter carries the grown vocabulary and loading resizes the base to fit."""

    from hf_models import write_hf

    import bailong
    from conftest import asset
    folder, _ = write_hf(tmp_path, "gqa", vocab_size=32000, hidden_size=64, intermediate_size=128,
                         max_position_embeddings=256)
    shutil.copy(asset("llama2-tokenizer/tokenizer.model"), folder / "tokenizer.model")
    pre, sft = tmp_path / "pre", tmp_path / "sft"
    for argv in (["--model", folder, "--new-pieces", "200", "--out", pre],
                 ["--stage", "sft", "--init", pre, "--out", sft]):
        argv += ["--steps", "12", "--eval-every", "6", "--batch-size", "2"]
        result = subprocess.run(TRAIN + list(map(str, argv)),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (pre / "base").exists()  # the base is the user's folder, named in the adapter config
    assert json.loads((pre / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folder)
    model, tokenizer = bailong.load(pre, device="cpu")
    assert model.config.vocab_size == tokenizer.vocab_size == 32200
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.abs().sum() > 0
    model, tokenizer = bailong.load(sft, device="cpu")
    assert tokenizer.vocab_size == 32200 and (sft / "base" / "model.safetensors").exists()
    folder.rename(tmp_path / "moved")  # the base the pre-training run names: the fine-tuning run keeps its own
    resumed = subprocess.run(TRAIN + list(map(str, ["--stage", "sft", "--init", pre, "--out", sft, "--steps", "13",
                                                    "--eval-every", "6", "--batch-size", "2", "--resume"])),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    new = subprocess.run(TRAIN + ["--stage", "sft", "--init", str(pre), "--out", str(tmp_path / "new")],
                         capture_output=True, text=True, timeout=600)
    assert new.returncode == 1 and new.stderr == f"error: {pre}: its base model {folder} (base_model_name_or_path " \
        f"in {pre / 'adapter' / 'adapter_config.json'}) is gone: move it back, or write its new place there\n"


def test_the_init_methods_offered_are_those_zip_tie_knows():
    from bailong.zip_tie import METHODS
    assert CHOICES["init_method"] == METHODS


def test_bf16_gradients_and_casts_by_layer_train_as_without(tmp_path, capsys, monkeypatch):
    """train.py --bf16-grads (bailong.memory.BF16Grads), and with --casts-by-layer too, in bf16 training with
    activation checkpointing and LoRA dropout: the same losses at every step, held-out ones too, and the same
    adapter, bit for bit. A run sets the casts by layer for itself: afterwards they are as they were (a notebook's
    next run, or its own training, went on with them)."""
    from bailong import lora_casts, lora_fused
    monkeypatch.setattr(lora_casts, "_by_layer", False)
    monkeypatch.setattr(lora_fused, "_one_at_a_time", False)
    use, set_to = lora_casts.use_casts_by_layer, []
    monkeypatch.setattr(lora_casts, "use_casts_by_layer", lambda flag=True: set_to.append(flag) or use(flag))
    args = ["--precision", "bf16", "--checkpointing", "on", "--steps", "12", "--eval-every", "6",
            "--lora-dropout", "0.1"]
    runs = {"float32": [], "bf16": ["--bf16-grads"], "by-layer": ["--bf16-grads", "--casts-by-layer"]}
    for name, flags in runs.items():
        out, _ = run_train(capsys, *args, *flags, "--out", tmp_path / name)
        assert ("MiB less than float32" in out) == bool(flags)
    assert "gradients: the projections' LoRA gradients (" in out and set_to == [False, False, False, False, True, False]
    assert not lora_casts._by_layer and not lora_fused._one_at_a_time
    from safetensors.torch import load_file
    saved = {name: load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in runs}
    for name in ("bf16", "by-layer"):
        assert losses(tmp_path / name) == losses(tmp_path / "float32") and len(losses(tmp_path / name)) == 12
        assert evals(tmp_path / name) == evals(tmp_path / "float32")
        assert saved[name].keys() == saved["float32"].keys()
        assert all(torch.equal(saved[name][k], saved["float32"][k]) for k in saved[name])


@pytest.mark.parametrize("held_out, grads", [("0.1", []), ("0", []), ("0.1", ["--precision", "bf16", "--bf16-grads"])])
def test_a_run_that_diverges_stops_before_a_nan_reaches_its_weights_or_its_result(held_out, grads, tmp_path, capsys,
                                                                                    monkeypatch):
    """One gradient that overflowed (the loss finite) was stepped into every weight (clipping scales them all by
    the NaN norm) and the NaN adapter saved as the result, exit status 0; a first held-out loss of NaN was kept
    as the best; a run without held-out data saved the weights of its last step unlooked at. Each stops the run
    now, before the optimizer's step or a save, naming the last checkpoint before the weights that failed."""
    from safetensors.torch import load_file

    from bailong import optim
    build = optim.build_optimizer

    def overflowing_at_step_3(params, *args, **kwargs):
        params, seen = list(params), []
        params[len(params) // 2].register_hook(  # a projection's: kept in bf16 with --bf16-grads
            lambda g: g * float("inf") if len(seen.append(g) or seen) == 3 else g)
        return build(params, *args, **kwargs)

    def nan_after_step_2(params, *args, **kwargs):
        params, steps = list(params), []
        optimizer = build(params, *args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: len(steps.append(0) or steps) == 2 and params[-1].data.fill_(
            float("nan")))
        return optimizer
    with monkeypatch.context() as patched:
        patched.setattr(optim, "build_optimizer", overflowing_at_step_3)
        _, stderr = run_train(capsys, "--steps", "4", "--save-every", "1", "--held-out", held_out, *grads,
                              "--out", tmp_path / "grad", code=1)
    # (step 2's checkpoint holds the weights whose gradient overflowed)
    assert stderr.replace("inf", "nan").startswith(  # (inf times a gradient's zeros: NaN)
        "error: the gradient norm is nan at step 3: the run diverged, stopped (the last checkpoint before: "
        f"{tmp_path / 'grad' / 'checkpoints' / 'step-0000001'}; a lower --lr"), stderr
    saved = list((tmp_path / "grad").rglob("adapter_model.safetensors"))
    assert saved and all(v.isfinite().all() for f in saved for v in load_file(f).values())
    with monkeypatch.context() as patched:
        patched.setattr(optim, "build_optimizer", nan_after_step_2)
        _, stderr = run_train(capsys, "--steps", "2", "--eval-every", "1", "--save-every", "1", "--held-out", held_out,
                              "--out", tmp_path / "last", code=1)
    said = "the held-out loss is nan after step 2" if held_out != "0" else "the loss is nan after the last step"
    assert f"error: {said}: the run diverged, stopped (the last checkpoint before: " in stderr
    assert "NaN" not in (tmp_path / "last" / "metrics.jsonl").read_text()
    if held_out == "0":
        assert not (tmp_path / "last" / "adapter").exists()
