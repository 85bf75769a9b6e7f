"""Find a Hugging Face Hub repo in the local cache, offline. Never downloads.

The hub cache lays a repo out as `<cache>/models--org--name/{refs/<revision>, snapshots/<hash>/...}`
(files in a snapshot are symlinks into `blobs/`). The cache folder is, in order:
$HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE (older name), $HF_HOME/hub, ~/.cache/huggingface/hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sd35fp8.errors import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_repo_id(text: str) -> bool:
    """`org/name` that is not an existing local path."""
    return bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists()


def hub_cache_dir() -> Path:
    """The hub cache folder the huggingface_hub library would use (honours HF_HUB_CACHE, HF_HOME)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def repo_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    org, name = repo_id.split("/", 1)
    return (cache_dir or hub_cache_dir()) / f"models--{org}--{name}"


def snapshot_dir(repo_id: str, revision: str = "main", cache_dir: Path | None = None) -> Path:
    """The cached snapshot folder of `repo_id` at `revision` (a branch name in refs/, or a commit hash).

    Raises CheckpointError listing every place it looked when the repo is not cached.
    """
    if not _REPO_ID.match(repo_id):
        raise CheckpointError(f"{repo_id!r} is neither an existing path nor a Hugging Face repo id (org/name)",
                              repo_id)
    repo = repo_folder(repo_id, cache_dir)
    looked = [str(repo / "refs" / revision), str(repo / "snapshots" / revision)]
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        snap = repo / "snapshots" / commit
        looked.append(str(snap))
        if snap.is_dir():
            return snap
    elif (repo / "snapshots" / revision).is_dir():
        return repo / "snapshots" / revision
    raise CheckpointError(
        f"{repo_id} is not in the local Hugging Face cache (sd35fp8 never downloads). Looked for: "
        f"{'; '.join(looked)}. Download it first (e.g. `hf download {repo_id}`), or set HF_HUB_CACHE / HF_HOME "
        "to the cache that holds it, or pass a file or folder path.", repo_id)
