"""Where a plan came from: the composed config's hash, the overrides, versions, git state."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def config_sha256(config_text: str) -> str:
    """Hash of the fully composed config (as text: config.config_text), so equal configs give
    equal hashes."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


def versions() -> dict[str, str]:
    """Versions of finetune_prep and the libraries that shape the plan."""
    found = {}
    for package in ("finetune_prep", "torch", "torchvision", "hydra-core", "omegaconf", "timm"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_state(folder: str | Path) -> dict[str, Any]:
    """Commit, branch and dirtiness of the git work tree holding `folder`; never raises."""
    folder = Path(folder)
    base = {"config_dir": str(folder)}
    if not folder.is_dir():
        return {**base, "git": "folder not found"}
    try:
        commit = _git(folder, "rev-parse", "HEAD")
        branch = _git(folder, "rev-parse", "--abbrev-ref", "HEAD")
        dirty = bool(_git(folder, "status", "--porcelain", "--", "."))
    except FileNotFoundError:
        return {**base, "git": "git is not installed"}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {**base, "git": "not in a git work tree (or no commit yet)"}
    return {**base, "commit": commit, "branch": branch, "dirty": dirty}


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), *args],
        capture_output=True, text=True, check=True, timeout=10,
    )
    return done.stdout.strip()


def record(config_text: str, overrides: Sequence[str], config_dirs: Sequence[str]) -> dict:
    """The provenance block of param_groups.json."""
    return {
        "config_sha256": config_sha256(config_text),
        "overrides": list(overrides),
        "versions": versions(),
        "git": [git_state(d) for d in config_dirs],
    }
