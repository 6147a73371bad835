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

import torch
from torch import nn

from finetune_prep.errors import FinetunePrepError
from finetune_prep.paramfile.format import Phase, Plan, as_plan
from finetune_prep.train import apply, wrappers

log = logging.getLogger("finetune_prep")


class Schedule:
    """The phases of one plan, applied to `model` and `optimizer` as training reaches them."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 plan: Plan | str | os.PathLike) -> None:
        self.model, self.optimizer = model, optimizer
        self.full = as_plan(plan)  # the whole plan, phase 0 and its schedule
        self.phases: tuple[Phase, ...] = self.full.schedule
        self.eval_modules: list[str] = list(self.full.eval_modules)
        self.phase = 0
        self._groups0 = len(self.full.groups)
        if len(optimizer.param_groups) != self._groups0:
            raise FinetunePrepError(
                f"{self.full.origin}: the optimizer has {len(optimizer.param_groups)} param "
                f"groups, phase 0 of the plan has {self._groups0}; build it with "
                "finetune_prep.build_optimizer(model, path) (or load_param_groups) first."
            )

    @property
    def unit(self) -> str | None:
        """'epoch' or 'step': what the phase boundaries count (None without phases)."""
        return self.phases[0].unit.value if self.phases else None

    def due(self, epoch: int | None = None, step: int | None = None) -> int:
        """The phase that training at this epoch (or step) is in."""
        if self.unit is None:
            return 0
        now = {"epoch": epoch, "step": step}[self.unit]
        if now is None:
            raise FinetunePrepError(
                f"{self.full.origin}: this schedule's phases start at {self.unit} boundaries; call "
                f"step({self.unit}=...) (both epoch= and step= may be given)."
            )
        return max([0, *(p.index for p in self.phases if now >= p.at)])

    def step(self, epoch: int | None = None, step: int | None = None) -> int:
        """Apply every phase whose boundary this epoch (or step) has reached; the phase now."""
        for index in range(self.phase + 1, self.due(epoch=epoch, step=step) + 1):
            self._apply(self.phases[index - 1])
        return self.phase

    def train_mode(self) -> nn.Module:
        """model.train(), with the current phase's frozen norm layers kept in eval mode."""
        return apply.set_train_mode(self.model, self.eval_modules)

    def plan(self) -> Plan:
        """The plan as it stands in the current phase (for `finetune_prep.check`)."""
        return self.full.at_phase(self.phase)

    def _apply(self, phase: Phase) -> None:
        view = self.full.at_phase(phase.index)
        frozen = set(view.frozen)
        for name, param in wrappers.named_parameters(self.model).items():
            param.requires_grad_(name not in frozen)
        for group in apply.tensor_groups(self.model, phase.groups):
            self.optimizer.add_param_group(group)
        self.eval_modules = list(view.eval_modules)
        if self.model.training:
            self.train_mode()
        self.phase = phase.index
        log.info("finetune_prep: phase %d (%s %d): %s of %s parameters train, %d new param groups",
                 self.phase, phase.unit.value, phase.at, f"{phase.counts['trainable']:,}",
                 f"{phase.counts['total']:,}", len(phase.groups))


__all__: Sequence[str] = ["Schedule"]
