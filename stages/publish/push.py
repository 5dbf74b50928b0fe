"""Push a staged folder to a hub model repo as one commit holding exactly what changed.

The remote tree is compared with the folder first (LFS files by sha256, others by git blob id),
so a rerun with nothing changed makes no commit, and weight files the folder no longer has (stale
shards of an earlier, differently sharded build) are deleted in the same commit. Other remote
files (a user's images, .gitattributes) are left alone.

The token is huggingface_hub's business (HF_TOKEN or `hf auth login`): this module only asks
whether there is one, and never prints, logs or stores it.
"""
from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

from ..common.digest import artifact_files, file_sha256
from ..common.errors import PublishError

MANAGED_STALE = ["*.safetensors", "*.safetensors.index.json"]  # remote files deleted when no longer staged


def git_blob_id(path: Path) -> str:
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def unchanged(local: Path, remote) -> bool:
    if remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == file_sha256(local)
    return remote.blob_id == git_blob_id(local)


def push(folder: Path, repo_id: str, private: bool, message: str, api=None) -> dict:
    """{'commit': sha of the new commit or None when nothing changed, 'head': the repo's head,
    'url', 'added': [...], 'deleted': [...]}."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    if api is None:
        if get_token() is None:
            raise PublishError(f"push to '{repo_id}' needs a hub token: set HF_TOKEN or run `hf auth login`")
        api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, repo_type="model")
                  if hasattr(f, "blob_id")}
        local = {rel: Path(folder) / rel for rel in artifact_files(folder)}
        added = [rel for rel, p in local.items() if rel not in remote or not unchanged(p, remote[rel])]
        deleted = sorted(rel for rel in remote if rel not in local
                         and any(fnmatch.fnmatch(rel, pat) for pat in MANAGED_STALE))
        if not added and not deleted:
            head = api.repo_info(repo_id, repo_type="model").sha
            return {"commit": None, "head": head, "url": f"https://huggingface.co/{repo_id}", "added": [],
                    "deleted": []}
        operations = ([CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local[rel])) for rel in added]
                      + [CommitOperationDelete(path_in_repo=rel) for rel in deleted])
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    except PublishError:
        raise
    except Exception as exc:  # HTTP, auth and hub errors arrive as many types; the token is in none of them
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise PublishError(f"push to '{repo_id}': {type(exc).__name__}: {first}") from None
    return {"commit": info.oid, "head": info.oid, "url": info.commit_url, "added": added, "deleted": deleted}
