"""Where a model or adapter lives: a local folder, or a Hugging Face hub id (``org/name``).

A local folder always wins. Otherwise the id goes to ``huggingface_hub.snapshot_download`` with
only the files the runtime reads (safetensors, JSON configs, tokenizer files), which shows a
progress bar, reuses the hub cache and honours ``revision``. The cache folder (``HF_HUB_CACHE``,
else ``$HF_HOME/hub``) and ``HF_HUB_OFFLINE`` are read when a path is resolved, not when
huggingface_hub was imported. Offline, only the cache is looked at: a repo that is not there is an
error naming the repo and the cache folder, never a network wait.
"""

from __future__ import annotations

import os
from pathlib import Path

from mcl_runtime.errors import ModelLoadError

ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "merges.txt"]
_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or constants.is_offline_mode()


def is_repo_id(spec: str) -> bool:
    """``name`` or ``org/name`` as the hub spells them (a path such as ``/x/y`` or ``./x`` is not)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if spec.startswith(("/", ".", "~")) or os.sep != "/" and os.sep in spec:
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def resolve_path(
    spec: str | os.PathLike, error: type[Exception] = ModelLoadError, what: str = "model", revision: str | None = None
) -> Path:
    """The local folder for ``spec`` (a folder, or a hub id fetched into the hub cache); ``error``
    is raised, naming the repo and the cache folder, when it cannot be had."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    repo_id = str(spec)
    if not is_repo_id(repo_id):
        raise error(f"{what} folder {path} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    at = f" at revision {revision!r}" if revision else ""
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache, local_files_only=offline, allow_patterns=ALLOW_PATTERNS
            )
        )
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise error(
            f"{what} {repo_id!r}{at} is neither a local folder nor in the Hugging Face cache {cache} "
            f"({why}): download it while online (`hf download {repo_id}`) or pass a local folder"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise error(
            f"{what} {repo_id!r}{at} is not a local folder, and the hub has no such repo or revision "
            "(or it is private or gated: log in with `hf auth login`)"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise error(f"{what} {repo_id!r}{at}: download into {cache} failed: {exc}") from exc


def display_name(spec: str | os.PathLike) -> str:
    """The name a model is served under by default: a hub id as given, a folder by its name."""
    path = Path(spec).expanduser()
    return path.name if path.is_dir() or not is_repo_id(str(spec)) else str(spec)
