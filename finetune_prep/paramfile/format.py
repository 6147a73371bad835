"""Read and write param_groups.json (format finetune_prep/param_groups@2).

The file is read as plain JSON and checked (paramfile.validate) before anything uses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune_prep.errors import FinetunePrepError
from finetune_prep.paramfile.validate import content_problems

FORMAT = "finetune_prep/param_groups@2"  # @2 added `schedule` (the phases of gradual unfreezing)


READABLE = ("finetune_prep/param_groups@1", FORMAT)  # an @1 file is an @2 file without phases


def dumps(document: dict[str, Any]) -> str:
    """The file's text: stable key order and indentation, so equal plans give equal bytes."""
    return json.dumps(document, indent=2, allow_nan=False) + "\n"  # strict JSON: no NaN


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a param_groups.json; errors say what is wrong with the file."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FinetunePrepError(f"{path} does not exist; run finetune_prep to make it.") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FinetunePrepError(
            f"{path} is not valid JSON ({err}); it was edited or truncated. "
            "Run finetune_prep again to rewrite it."
        ) from err
    except RecursionError as err:
        raise FinetunePrepError(
            f"{path} is nested too deeply to be a param-group file; prepare the file again."
        ) from err
    if not isinstance(document, dict) or document.get("format") not in READABLE:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise FinetunePrepError(
            f"{path} has format {found!r}; this finetune_prep reads {' and '.join(READABLE)}. "
            "Run the finetune_prep that wrote it, or prepare the file again."
        )
    problems = content_problems(document)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise FinetunePrepError(f"{path} is not a valid param-group file: {shown}. "
                                "Prepare the file again instead of editing it.")
    return document


def at_phase(document: dict[str, Any], phase: int) -> dict[str, Any]:
    """The plan as it stands in `phase` of its schedule: every group added so far, and that
    phase's frozen parameters and eval modules (phase 0 is the document itself)."""
    schedule = document.get("schedule") or []
    if not 0 <= phase <= len(schedule):
        raise FinetunePrepError(
            f"phase {phase} is not in this plan: it has phases 0..{len(schedule)}.")
    if phase == 0:
        return document
    current = schedule[phase - 1]
    return {**document,
            "groups": document["groups"] + [g for p in schedule[:phase] for g in p["groups"]],
            "frozen": current["frozen"], "eval_modules": current["eval_modules"],
            "counts": current["counts"]}
