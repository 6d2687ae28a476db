"""Where a model lives: a local folder, or a Hugging Face hub id resolved to a local snapshot.

`resolve_model_path` returns an existing folder as it is. Anything else that reads as a hub id
("name" or "org/name") is resolved with `huggingface_hub.snapshot_download`, which honours
HF_HUB_OFFLINE (the local cache only, no network), HF_HUB_CACHE / HF_HOME, and reuses what an
earlier download left in the cache. Only the files the engine reads are fetched
(MODEL_FILE_PATTERNS). Failure of any kind raises ValueError naming the model.
"""
import os

# config, generation config, tokenizer files (json, BPE merges, SentencePiece, tiktoken, chat
# template) and safetensors weights.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


def resolve_model_path(model, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A local folder holding `model`: `model` itself when it is a folder, else the hub snapshot
    of the hub id `model` at `revision` (None: the default branch)."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a local model folder or a Hugging Face hub id, got {model!r}.")
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    looks_like_path = (os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
                       or (os.sep != "/" and os.sep in model))
    if looks_like_path:
        raise ValueError(f"model must be a local model folder or a Hugging Face hub id, got {model!r}: "
                         f"no such directory.")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=list(MODEL_FILE_PATTERNS))
    except Exception as e:  # unknown repo, offline without a cached snapshot, invalid id, network
        raise ValueError(f"model {model!r} is no local folder, and no snapshot of it could be had from the "
                         f"Hugging Face hub or its cache ({type(e).__name__}: {e})") from e
