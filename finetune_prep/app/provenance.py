"""Where a plan came from: the composed config's hash, the overrides, versions, git state."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def config_sha256(config_text: str) -> str:
    """Hash of the fully composed config (as text: config.config_text), so equal configs give
    equal hashes."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


@functools.cache
def _installed() -> dict[str, str]:
    found = {}
    for package in ("finetune_prep", "torch", "torchvision", "hydra-core", "omegaconf", "timm"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def versions() -> dict[str, str]:
    """Versions of finetune_prep and the libraries that shape the plan (read once a process:
    a package is not swapped under a running interpreter)."""
    return dict(_installed())


def git_states_soon(folders: Sequence[str | Path]) -> Callable[[], list[dict[str, Any]]]:
    """git_state of each folder, worked out in a thread while the caller goes on (its git
    processes, about 10 ms, overlap the model build); call the result to have them."""
    found: list[Any] = []
    worker = threading.Thread(target=lambda: found.extend(git_state(d) for d in folders),
                              name="finetune_prep-git", daemon=True)
    worker.start()

    def result() -> list[dict[str, Any]]:
        worker.join()
        if len(found) != len(folders):  # the thread died (git_state itself never raises)
            return [git_state(d) for d in folders]
        return list(found)

    return result


NOT_VERSIONED = "not under version control"


def git_state(folder: str | Path) -> dict[str, Any]:
    """The git state of a config folder, never raising: commit, branch and counts of modified,
    untracked and ignored files under it; or a `git` note when git does not track the folder
    (not a work tree, ignored by .gitignore, nothing of it committed)."""
    folder = Path(folder)
    base: dict[str, Any] = {"config_dir": str(folder)}
    if not folder.is_dir():
        return {**base, "git": "folder not found"}
    try:
        top = Path(_git(folder, "rev-parse", "--show-toplevel"))
    except FileNotFoundError:
        return {**base, "git": "git is not installed"}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return {**base, "git": f"not in a git work tree: {NOT_VERSIONED}"}
    try:
        return {**base, **_tracked_state(folder, top)}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        return {**base, "git": f"git failed ({' '.join(err.cmd[3:5])})"}
    except (OSError, ValueError) as err:  # a folder git places elsewhere than we resolve it
        return {**base, "git": f"git state unknown ({err})"}


def _tracked_state(folder: Path, top: Path) -> dict[str, Any]:
    """git_state inside a work tree `top`."""
    relative = folder.resolve().relative_to(top.resolve()).as_posix()
    if relative != "." and _is_ignored(top, relative):
        return {"git": f"ignored by git (a .gitignore of {top}): {NOT_VERSIONED}"}
    if not _git(folder, "ls-files", "--", "."):
        return {"git": f"no file of it is tracked in {top}: {NOT_VERSIONED}"}
    try:
        commit, branch = _git(folder, "rev-parse", "HEAD", "--abbrev-ref", "HEAD").splitlines()
    except subprocess.CalledProcessError:
        return {"git": f"no commit yet in {top}: {NOT_VERSIONED}"}
    codes = [line[:2] for line in _git(folder, "status", "--porcelain", "--ignored",
                                       "--untracked-files=all", "--", ".").splitlines()]
    untracked, ignored = codes.count("??"), codes.count("!!")
    modified = len(codes) - untracked - ignored
    return {"commit": commit, "branch": branch, "dirty": bool(modified or untracked),
            "modified": modified, "untracked": untracked, "ignored": ignored}


def _is_ignored(top: Path, relative: str) -> bool:
    """Whether .gitignore (or .git/info/exclude) ignores the folder or a folder above it."""
    done = subprocess.run(["git", "-C", str(top), "check-ignore", "-q", relative],
                          capture_output=True, text=True, timeout=10)
    return done.returncode == 0


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), *args],
        capture_output=True, text=True, check=True, timeout=10,
    )
    return done.stdout.strip()


def record(config_text: str, overrides: Sequence[str], git: Sequence[dict[str, Any]],
           rerun: str | None = None, rules_file: Mapping[str, Any] | None = None) -> dict:
    """The provenance block of param_groups.json. `git`: the git_state of each config folder;
    `rerun`: the run's config file composed again, when the plan was made from one;
    `rules_file`: the freeze.rules_file read, as {path, sha256, rules}: the config holds its
    path only, so its content is hashed here."""
    found = {
        "config_sha256": config_sha256(config_text),
        "overrides": list(overrides),
        "versions": versions(),
        "git": list(git),
    }
    if rerun:
        found["rerun"] = rerun
    if rules_file:
        found["rules_file"] = dict(rules_file)
    return found


def describe_git(entry: Mapping[str, Any]) -> str:
    """One config folder's state in words: `commit 1c54287 on main, clean` or the note."""
    if "commit" not in entry:
        return str(entry.get("git", "unknown"))
    counts = [f"{entry.get(k, 0)} {k}" for k in ("modified", "untracked", "ignored")
              if entry.get(k)]
    if entry.get("dirty"):
        state = f"dirty ({', '.join(counts)}): the plan may not match the commit"
    else:
        state = "clean" + (f" ({', '.join(counts)})" if counts else "")
    return f"commit {entry['commit'][:12]} on {entry.get('branch', '?')}, {state}"


def summary_lines(prov: Mapping[str, Any] | None, packaged: str | Path) -> list[str]:
    """The summary's provenance section: each config folder (searched first to last) with its
    git state, the run's config file a rerun composed again, and the overrides."""
    if not prov:
        return []
    lines = ["Config folders (searched first to last):"]
    for entry in prov.get("git", []):
        folder = entry.get("config_dir", "?")
        label = " (packaged)" if _same(folder, packaged) else ""
        lines.append(f"  {folder}{label}: {describe_git(entry)}")
    if prov.get("rerun"):
        lines.append(f"Rerun of: {prov['rerun']} (with the packaged settings)")
    rules = prov.get("rules_file")
    if isinstance(rules, Mapping):
        lines.append(f"Rules file: {rules.get('path', '?')} ({rules.get('rules', '?')} rules, "
                     f"sha256 {str(rules.get('sha256', '?'))[:12]})")
    overrides = prov.get("overrides") or []
    lines.append(f"Overrides: {' '.join(overrides) if overrides else 'none'}")
    return lines


def _same(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
