"""Lightning integration (`pip install 'finetune_prep[lightning]'`): a Callback that holds a plan
through `Trainer.fit`.

Lightning switches the whole LightningModule to train mode when fitting starts (and restores or
resets modes around validation), which would let frozen BatchNorm layers update their running
statistics. The callback applies the file's requires_grad in `setup` (before
`configure_optimizers` and before any DDP wrapping), builds the optimizer from the file when
`configure_optimizers` returns None, puts the file's `eval_modules` back in eval mode at train
start, every epoch start, after every validation loop and before every training batch, and runs
`finetune_prep.check` at fit start. A plan with phases (`freeze.schedule`) is applied at the
epoch (or step) boundaries through `finetune_prep.Schedule`, each transition checked.
Plain loops use `finetune_prep.train_mode` (and `Schedule`) instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from finetune_prep.errors import FinetunePrepError
from finetune_prep.paramfile import allowlist
from finetune_prep.paramfile.format import Plan, as_plan
from finetune_prep.train import apply, wrappers
from finetune_prep.train.check import check
from finetune_prep.train.unfreezing import Schedule

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "finetune_prep.train.lightning needs Lightning: "
        "pip install 'finetune_prep[lightning]'"
    ) from err


class FinetunePrepCallback(Callback):
    """Hold the plan in `path` through fitting. `module` names the attribute of the
    LightningModule that holds the planned model (e.g. "net"); None finds the one submodule
    (or the LightningModule itself) whose parameter names are exactly the file's. `optimizers`
    allows optimizer classes beyond torch.optim for the file's `_target_`, as in
    `finetune_prep.build_optimizer` (a file names nothing else that is called)."""

    def __init__(self, plan: Plan | str | os.PathLike, module: str | None = None,
                 optimizers: Sequence[allowlist.OptimizerSpec] = ()) -> None:
        self.plan = as_plan(plan)  # read once: every hook below uses it
        self.module = module
        self.optimizers = tuple(optimizers)
        # refuse a file whose optimizer is not allowed now, not when fitting starts
        allowlist.optimizer_class(self.plan.optimizer["_target_"], self.optimizers,
                                  self.plan.origin)
        self.names = list(self.plan.names)
        self.eval_modules = list(self.plan.eval_modules)
        self._original: Any = None
        self._model: nn.Module | None = None
        self.schedule: Schedule | None = None  # the plan's phases (freeze.schedule), if any
        self._resumed: tuple[int, int] | None = None  # (epoch, step) of a checkpoint resumed

    def model(self, pl_module: LightningModule) -> nn.Module:
        """The planned model inside `pl_module`."""
        if self.module is not None:
            return pl_module.get_submodule(self.module)
        wanted = set(self.names)
        modules = wrappers.named_modules(pl_module)
        first = self.names[0]
        for name in wrappers.named_parameters(pl_module):
            if name == first or name.endswith("." + first):
                candidate = modules[name[: -len(first)].rstrip(".")]
                if set(wrappers.named_parameters(candidate)) == wanted:
                    return candidate
        raise FinetunePrepError(
            f"no submodule of {type(pl_module).__name__} has exactly the {len(wanted)} parameters "
            f"of {self.plan.origin}: build the model the file was made for, or name the attribute "
            "that holds it: FinetunePrepCallback(path, module='net')."
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """requires_grad from the file, before the optimizer and any wrapper are built."""
        if stage != "fit":
            return
        model = self._model = self.model(pl_module)
        apply.load_param_groups(model, self.plan)
        self._provide_optimizer(pl_module, model)

    def _provide_optimizer(self, pl_module: LightningModule, model: nn.Module) -> None:
        """configure_optimizers returning None gets the file's optimizer (its _target_)."""
        original = pl_module.configure_optimizers
        self._original = original

        def configure_optimizers() -> Any:
            result = original()
            if result is not None:
                return result
            return apply.build_optimizer(model, self.plan, optimizers=self.optimizers)

        pl_module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._model = None
        if self._original is not None:
            pl_module.configure_optimizers = self._original  # type: ignore[method-assign]
            self._original = None

    def hold(self, pl_module: LightningModule) -> None:
        """The file's eval_modules back in eval mode (nothing else changes mode)."""
        apply.hold_eval(self._model or self.model(pl_module), self.eval_modules)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.hold(pl_module)
        model = self._model or self.model(pl_module)
        check(model, trainer.optimizers, self.plan)
        if self.plan.schedule:
            strategy = type(trainer.strategy).__name__
            if "DDP" in strategy or "FSDP" in strategy:
                raise FinetunePrepError(
                    f"{self.plan.origin} has phases (freeze.schedule), and Lightning's {strategy} "
                    "builds "
                    "its wrapper once: parameters unfrozen later would never be all-reduced. "
                    "Run each phase as its own fit, or train in a plain loop that wraps again "
                    "after each transition (README: Gradual unfreezing)."
                )
            self.schedule = Schedule(model, trainer.optimizers[0], self.plan)
            if self._resumed is not None:  # the saved optimizer state holds those phases' groups
                self.schedule.step(epoch=self._resumed[0], step=self._resumed[1])

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Resuming: remember where training was, so the phases it had reached are applied
        before Lightning restores the optimizer's state (which has their groups)."""
        last_step = max(int(checkpoint.get("global_step", 0)) - 1, 0)
        self._resumed = (int(checkpoint.get("epoch", 0)), last_step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.hold(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._advance(trainer)
        self.hold(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.hold(pl_module)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._advance(trainer)
        self.hold(pl_module)

    def _advance(self, trainer: Trainer) -> None:
        """Gradual unfreezing: apply the phases this epoch (or step) has reached, then check."""
        if self.schedule is None:
            return
        before = self.schedule.phase
        if self.schedule.step(epoch=trainer.current_epoch, step=trainer.global_step) != before:
            self.eval_modules = self.schedule.eval_modules
            check(self.schedule.model, self.schedule.optimizer, self.plan,
                  phase=self.schedule.phase)
