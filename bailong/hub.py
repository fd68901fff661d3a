"""Where models, adapters and datasets come from: a local folder, or a Hugging Face Hub repo id.

A command resolves each name it is given once, here, and passes the folder on;
``resolve`` returns an existing folder as it is, so passing one again costs
nothing. From the Hub only the files a command reads are fetched, never pickled
``.bin`` weights.
"""
import glob
import json
from pathlib import Path

from bailong.errors import BailongError

# Fetched from the Hub first; then exactly the safetensors files the index names.
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json",
             "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "special_tokens_map.json"]
# An adapter folder: PEFT's two files, and the tokenizer of a grown vocabulary.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "special_tokens_map.json"]


def resolve(path_or_repo_id: str, revision=None, files=HUB_FILES, weights=True, repo_type=None) -> Path:
    """A local folder, or the Hub snapshot of a repo id (token from $HF_TOKEN).

    From the Hub we fetch only ``files``, then (with ``weights``) model.safetensors, or where the repo has none
    exactly the safetensors files its index names (transformers' order): no pickled .bin weights, no duplicates.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise BailongError(f"{path}: is a file; expected a folder or a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError
    repo = str(path_or_repo_id)
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=files, repo_type=repo_type))
        if not weights:
            return folder
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=["model.safetensors"]))
        index = folder / "model.safetensors.index.json"
        if index.exists() and not (folder / "model.safetensors").exists():
            try:
                # names, not patterns: a "*" in a repo's index would fetch every file
                shard_files = sorted({glob.escape(f) for f in json.loads(index.read_text())["weight_map"].values()})
            except (ValueError, KeyError, AttributeError, TypeError):  # a broken index: loading says how
                shard_files = ["*.safetensors"]
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=shard_files))
        if not any(folder.glob("*.safetensors")) and any(f.endswith(".bin") for f in _files(repo, revision)):
            raise BailongError(f"{repo}: holds only pickled .bin weights, which are not loaded (convert them to "
                               "safetensors, or choose a repo that has them)")
        return folder
    except BailongError:
        raise
    except HFValidationError:
        raise BailongError(f"{repo}: no such folder (and not a valid Hub repo id)") from None
    except Exception as e:  # not found, gated, offline, network: all the user's to fix
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BailongError(f"{repo}: no such folder, and not available from the Hugging Face "
                           f"Hub ({type(e).__name__}: {reason})") from None


def _files(repo, revision) -> list[str]:
    """The names of a Hub repo's files; none when it cannot be asked (offline: loading then says what is
    missing)."""
    from huggingface_hub import list_repo_files
    try:
        return list_repo_files(repo, revision=revision)
    except Exception:
        return []
