"""finetune_prep: declarative, checked preparation of a PyTorch model for fine-tuning.

`import finetune_prep` registers the config schemas with Hydra (under `finetune_prep/schema`),
so the packaged configs compose with Hydra's own API as well as with `finetune_prep.compose`.
Everything that needs torch is imported on first use, so this import stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_prep.config import CONF_DIR, CONF_MODULE, compose, register_configs
from finetune_prep.errors import FinetunePrepError

if TYPE_CHECKING:
    from finetune_prep.runner import Prepared

__all__ = ["CONF_DIR", "CONF_MODULE", "FinetunePrepError", "Schedule", "build_model",
           "build_optimizer", "check", "compose", "load_param_groups", "peak_lrs", "prepare",
           "register_configs", "train_mode"]

LAZY = {  # public name -> the module that defines it (imported on first use: it needs torch)
    "load_param_groups": "finetune_prep.paramfile",
    "build_optimizer": "finetune_prep.paramfile",
    "train_mode": "finetune_prep.paramfile",
    "build_model": "finetune_prep.paramfile",
    "check": "finetune_prep.integrations.check",
    "peak_lrs": "finetune_prep.integrations.schedules",
    "Schedule": "finetune_prep.integrations.unfreezing",
}

register_configs()


def prepare(cfg: Any, **kwargs: Any) -> Prepared:
    """Build, load, freeze and plan from a composed config (see `finetune_prep.runner.prepare`)."""
    from finetune_prep.runner import prepare as _prepare

    return _prepare(cfg, **kwargs)


def __getattr__(name: str) -> Any:
    """Lazy access to the training-script API, so `import finetune_prep` stays light."""
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(name)
