"""Models and adapters named the way the Hugging Face Hub names them: OWNER/NAME[@REVISION].

huggingface_hub downloads the repository's files into its own cache (HF_HOME; HF_TOKEN for gated
and private repositories; a progress bar per file) and gives the snapshot's folder, which the
loaders then read like any local folder. When the Hub cannot be reached, the cached snapshot of
that revision is used; HF_HUB_OFFLINE=1 skips the network altogether.
"""
from __future__ import annotations

import re
from pathlib import Path

from core.errors import UserError, first_line

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
COMMIT = re.compile(r"[0-9a-f]{40}")
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model"]  # what a Hugging Face folder needs, not .bin/.gguf copies
ADAPTER_FILES = ["*.safetensors", "*.pth"]


def is_hub_id(name: str) -> bool:
    """OWNER/NAME[@REVISION] that is not a local path."""
    return bool(HUB_ID.fullmatch(name)) and not Path(name.partition("@")[0]).expanduser().exists()


def snapshot(spec: str, patterns: list[str], what: str = "model") -> Path:
    """The local folder of OWNER/NAME[@REVISION]'s files matching `patterns`, or a one-line error
    saying what to do (log in for a gated one, check the name, connect once)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.constants import HF_HUB_CACHE
    repo, _, revision = spec.partition("@")
    try:
        if COMMIT.fullmatch(revision):  # a commit never changes: its cached snapshot needs no Hub (which,
            try:                        # unreachable, huggingface_hub retries for 23 s before using the cache)
                return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True))
            except LocalEntryNotFoundError:
                pass
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns))
    except GatedRepoError:
        raise UserError(f"{repo} is gated: accept its terms at https://huggingface.co/{repo} while logged in, "
                        "then set HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo}: no such {what} repository on the Hub (or a private one: set HF_TOKEN); "
                        f"accepted: OWNER/NAME[@REVISION] or a local path") from None
    except RevisionNotFoundError:
        raise UserError(f"{repo} has no revision {revision!r}; accepted: one of its branches, tags or commits") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{spec} is not in the Hugging Face cache ({HF_HUB_CACHE}) and the Hub cannot be reached: "
                        "connect once to download it, or give a local path") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"{spec}: the Hub download failed ({first_line(e, 160)})") from None


def adapter_file(spec: str) -> Path:
    """The adapter file in repository OWNER/NAME[@REVISION]: its adapter.safetensors, else its only
    .safetensors or .pth file."""
    folder = snapshot(spec, ADAPTER_FILES, "adapter")
    files = sorted(p for pattern in ADAPTER_FILES for p in folder.rglob(pattern))
    named = [p for p in files if p.name == "adapter.safetensors"]
    if named or len(files) == 1:
        return (named or files)[0]
    listed = ", ".join(str(p.relative_to(folder)) for p in files[:5]) or "none"
    raise UserError(f"{spec} holds {len(files)} adapter files ({listed}); accepted: a repository with an "
                    "adapter.safetensors or one .safetensors/.pth file, or a local path")
