"""Gradual unfreezing in a training loop: the phases of param_groups.json, applied in order.

    optimizer = finetune_prep.build_optimizer(model, path)      # phase 0's groups
    schedule = finetune_prep.Schedule(model, optimizer, path)
    for epoch in range(epochs):
        schedule.step(epoch=epoch)      # at a boundary: requires_grad, new groups, eval modules
        schedule.train_mode()           # model.train(), this phase's frozen norm layers in eval
        ...

A transition sets `requires_grad` as the phase says, adds the phase's groups with
`optimizer.add_param_group` (the state of earlier groups is kept) and logs what changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from finetune_prep import paramfile
from finetune_prep.errors import FinetunePrepError
from finetune_prep.train import apply, wrappers

log = logging.getLogger("finetune_prep")


class Schedule:
    """The phases of one plan, applied to `model` and `optimizer` as training reaches them."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 path: str | os.PathLike) -> None:
        self.model, self.optimizer, self.path = model, optimizer, path
        document = self.document = paramfile.read(path)
        self.phases: list[dict[str, Any]] = document.get("schedule", [])
        self.eval_modules: list[str] = list(document.get("eval_modules", []))
        self.phase = 0
        self._groups0 = len(document["groups"])
        if len(optimizer.param_groups) != self._groups0:
            raise FinetunePrepError(
                f"{path}: the optimizer has {len(optimizer.param_groups)} param groups, phase 0 "
                f"of the plan has {self._groups0}; build it with "
                "finetune_prep.build_optimizer(model, path) (or load_param_groups) first."
            )

    @property
    def unit(self) -> str | None:
        """'epoch' or 'step': what the phase boundaries count (None without phases)."""
        return next(iter(self.phases[0]["at"])) if self.phases else None

    def due(self, epoch: int | None = None, step: int | None = None) -> int:
        """The phase that training at this epoch (or step) is in."""
        if self.unit is None:
            return 0
        now = {"epoch": epoch, "step": step}[self.unit]
        if now is None:
            raise FinetunePrepError(
                f"{self.path}: this schedule's phases start at {self.unit} boundaries; call "
                f"step({self.unit}=...) (both epoch= and step= may be given)."
            )
        return max([0, *(p["phase"] for p in self.phases if now >= p["at"][self.unit])])

    def step(self, epoch: int | None = None, step: int | None = None) -> int:
        """Apply every phase whose boundary this epoch (or step) has reached; the phase now."""
        for index in range(self.phase + 1, self.due(epoch=epoch, step=step) + 1):
            self._apply(self.phases[index - 1])
        return self.phase

    def train_mode(self) -> nn.Module:
        """model.train(), with the current phase's frozen norm layers kept in eval mode."""
        return apply.set_train_mode(self.model, self.eval_modules)

    def plan(self) -> dict[str, Any]:
        """The plan as it stands in the current phase (for `finetune_prep.check`)."""
        return paramfile.at_phase(self.document, self.phase)

    def _apply(self, phase: dict[str, Any]) -> None:
        view = paramfile.at_phase(self.document, phase["phase"])
        frozen = set(view["frozen"])
        for name, param in wrappers.named_parameters(self.model).items():
            param.requires_grad_(name not in frozen)
        for group in apply.tensor_groups(self.model, phase["groups"]):
            self.optimizer.add_param_group(group)
        self.eval_modules = list(view["eval_modules"])
        if self.model.training:
            self.train_mode()
        self.phase = phase["phase"]
        counts = phase["counts"]
        log.info("finetune_prep: phase %d (%s): %s of %s parameters train, %d new param groups",
                 self.phase, _at(phase["at"]), f"{counts['trainable']:,}",
                 f"{counts['total']:,}", len(phase["groups"]))


def _at(at: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in at.items())


__all__: Sequence[str] = ["Schedule"]
