"""Readable, filesystem-safe names for multirun job folders, as an OmegaConf resolver.

`hydra.sweep.subdir: ${hydra.job.num}_${fp_jobname:${hydra.overrides.task},${hydra.sweep.dir}}`
names a job after its overrides (`3_freeze=last_stage,model.arch=resnet50`). When the sweep
plan that `sweep.SweepSummary` writes at the start of a multirun is there, only the keys that
differ between jobs are kept, so constant overrides do not make every name long. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "fp_jobname"
PLAN_FILE = ".sweep_plan.json"  # written by sweep.SweepSummary.on_multirun_start
MAX_LEN = 60  # longer names end in a hash of the full text
_UNSAFE = re.compile(r"[^A-Za-z0-9._+@-]+")  # '=' and ',' only separate keys and overrides


def job_name(overrides: Sequence[str], sweep_dir: str | None = None) -> str:
    """The job's overrides as one safe folder name (no '/'), at most MAX_LEN characters."""
    varying = _varying_keys(sweep_dir)
    kept = [o for o in overrides if varying is None or _key(o) in varying]
    text = ",".join(f"{_safe(_key(o))}={_safe(o.partition('=')[2])}" for o in kept)
    if len(text) > MAX_LEN:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        text = f"{text[: MAX_LEN - 9].rstrip('._,')}_{digest}"
    return text or "job"


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _varying_keys(sweep_dir: str | None) -> set[str] | None:
    if not sweep_dir:
        return None
    try:
        plan = json.loads((Path(sweep_dir) / PLAN_FILE).read_text(encoding="utf-8"))
        return set(plan["varying"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def register_resolvers() -> None:
    """Register `fp_jobname` with OmegaConf (idempotent); call before Hydra resolves configs."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(
            RESOLVER, lambda overrides, sweep_dir=None: job_name(list(overrides), sweep_dir)
        )
