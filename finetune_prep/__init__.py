"""finetune_prep: declarative, checked preparation of a PyTorch model for fine-tuning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_prep.errors import FinetunePrepError

if TYPE_CHECKING:
    from finetune_prep.runner import Prepared

__all__ = ["FinetunePrepError", "build_optimizer", "load_param_groups", "prepare", "train_mode"]


def prepare(cfg: Any, **kwargs: Any) -> Prepared:
    """Build, load, freeze and plan from a composed config; returns a model with real weights."""
    from finetune_prep.runner import prepare as _prepare

    return _prepare(cfg, **kwargs)


def __getattr__(name: str) -> Any:
    """Lazy access to the param-file API, so `import finetune_prep` stays light."""
    if name in ("load_param_groups", "build_optimizer", "train_mode"):
        from finetune_prep import paramfile

        return getattr(paramfile, name)
    raise AttributeError(name)
