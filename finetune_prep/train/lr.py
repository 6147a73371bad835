"""Learning-rate schedulers on a plan: per-group peaks, so layer decay and multipliers survive.

The file's `lr` is absolute and the optimizer groups built from it carry no `lr_scale`, so a
scheduler that scales each group's own lr (torch's CosineAnnealingLR, LinearLR, timm's
schedulers) keeps the plan's ratios. One that sets a value for every group must get one value
per group: `OneCycleLR(optimizer, max_lr=peak_lrs(optimizer), ...)`.
"""

from __future__ import annotations

import torch

from finetune_prep.errors import FinetunePrepError


def peak_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's lr as the plan set it, in group order: OneCycleLR's `max_lr`.

    Call it before building a scheduler: a scheduler changes `lr` (and records `initial_lr`).
    """
    changed = [i for i, g in enumerate(optimizer.param_groups) if "initial_lr" in g]
    if changed:
        raise FinetunePrepError(
            f"optimizer group(s) {', '.join(map(str, changed))} have an initial_lr: a scheduler "
            "already changed their lr. Call finetune_prep.peak_lrs(optimizer) right after "
            "building the optimizer, before any scheduler."
        )
    return [float(g["lr"]) for g in optimizer.param_groups]
