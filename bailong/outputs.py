"""A training output read as a model: its base and its adapter, its base's files, and the refusal of a run
where a model folder is asked for (a run's folder and its layout: run_folder.py)."""
from pathlib import Path

from bailong.config import ModelConfig, preset
from bailong.errors import BailongError, UsageError, read_json
from bailong.hub import ADAPTER_CONFIG, resolve
from bailong.run_folder import RunFolder
from bailong.runs import read_run


def is_output(folder: Path) -> bool:
    """Whether ``folder`` is a training output or one of its checkpoints (it keeps an adapter)."""
    return (RunFolder(folder).result / ADAPTER_CONFIG).is_file()


def training_output(folder: Path) -> tuple[str | Path, Path] | None:
    """(base model, adapter) of a training output or one of its checkpoints; None for a model folder."""
    result = RunFolder(folder).result
    if not is_output(folder):
        return None
    run = folder.resolve()  # a run, or one of its checkpoints (run/checkpoints/step-N)
    base = next((RunFolder(f).base for f in (run, run.parent.parent) if RunFolder(f).has_base()), None) \
        or read_json(result / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base:
        raise BailongError(f"{folder}: a training output without its base model (no base/ beside it and no "
                           "base_model_name_or_path in adapter/adapter_config.json)")
    if Path(base).is_absolute() and not Path(base).exists():  # a folder moved since (a Hub id is found loading)
        raise BailongError(f"{folder}: its base model {base} (base_model_name_or_path in "
                           f"{result / ADAPTER_CONFIG}) is gone: move it back, or write its new place there")
    return base, result


def check_model(config):
    """--model (pre-training's base) must be a model, not a training output, which fine-tuning or an export takes."""
    if config.model and is_output(Path(config.model).expanduser()):
        raise UsageError(f"{config.model}: is a training output; fine-tune it with --stage sft --init "
                         f"{config.model}, or merge it first (python -m bailong.export) to pre-train on it")


def check_context(config, context=None):
    """Refuse a --seq-len longer than the model's ``context``: before anything is written, where the model's
    config.json is at hand (the embedded default, a local folder, a pre-training output); else, given, after
    loading."""
    if context is None:
        folder = Path(config.model or "") if config.stage == "pretrain" else RunFolder(config.init).base
        if config.stage == "pretrain" and not config.model:
            context = preset("tiny").max_position_embeddings
        elif (folder / "config.json").is_file():
            context = ModelConfig.from_file(folder / "config.json").max_position_embeddings
        else:
            return
    if config.seq_len > context:
        raise UsageError(f"--seq-len {config.seq_len} is longer than the model's context ({context})")


def model_file(folder, name) -> Path | None:
    """A model's file ``name`` (generation_config.json, tokenizer_config.json): its ``folder``'s, or a training
    output's (or checkpoint's) base model's, which a fine-tuning run copies into the base it keeps; None where
    there is none."""
    if folder is None:
        return None
    if (file := Path(folder).expanduser() / name).is_file():  # "~/run" from a --config file too
        return file
    run = training_output(Path(folder).expanduser())
    return model_file(resolve(str(run[0])), name) if run else None


def check_not_a_run(folder: Path):
    """A one-line error where ``folder``, read as a model folder, is a training run: given with an adapter of its
    own, or with none kept yet (where it brings one, ``training_output`` reads it as its base and adapter), or an
    adapter folder."""
    if not (folder / "config.json").exists() and (folder / ADAPTER_CONFIG).is_file():
        output = folder.parent if is_output(folder.parent) else None
        raise BailongError(f"{folder}: an adapter, not a model folder: " + (
            f"give the training output it is in ({output})" if output else
            "give its base model (and the adapter with --adapter, where the command takes one)"))
    if not (folder / "config.json").exists() and read_run(folder):
        raise BailongError(f"{folder}: a training run, not a model folder: " + (
            "it brings its own adapter; give it without --adapter" if is_output(folder) else
            "it has no adapter yet (stopped before one was kept); continue it with train.py --resume"))
