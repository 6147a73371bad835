"""Each config group's presets with what they do (their first comment line), for --help."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from finetune_prep.config import PRESET_GROUPS

GROUPS = PRESET_GROUPS


def describe(folder: Path) -> str:
    """A preset file's first comment line: what the preset does."""
    try:
        with open(folder, encoding="utf-8") as f:
            for line in f:
                text = line.strip()
                if text.startswith("#") and not text.startswith("# @package"):
                    return text.lstrip("# ").strip()
    except OSError:
        pass
    return ""


def listing(config_dirs: Sequence[Path]) -> str:
    """`group: name  what it does` for every preset in the folders, the first folder's winning."""
    lines = []
    for group in GROUPS:
        found: dict[str, str] = {}
        for folder in config_dirs:
            for path in sorted(Path(folder, group).glob("*.yaml")):
                found.setdefault(path.stem, describe(path))
        if found:
            lines.append(f"{group}:")
            width = max(len(name) for name in found) + 2
            lines += [f"  {name:<{width}}{what}".rstrip() for name, what in found.items()]
    return "\n".join(lines)
