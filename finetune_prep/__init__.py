"""finetune_prep: declarative, checked preparation of a PyTorch model for fine-tuning.

`import finetune_prep` registers the config schemas with Hydra (under `finetune_prep/schema`),
so the packaged configs compose with Hydra's own API as well as with `finetune_prep.compose`.
Everything that needs torch is imported on first use, so this import stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_prep.config import CONF_DIR, compose, register_configs
from finetune_prep.errors import FinetunePrepError

if TYPE_CHECKING:
    from finetune_prep.app.pipeline import Prepared, prepare
    from finetune_prep.paramfile.format import Plan, load_plan

__all__ = ["CONF_DIR", "FinetunePrepError", "Plan", "Prepared", "Schedule", "build_model",
           "build_optimizer", "check", "compose", "load_param_groups", "load_plan", "peak_lrs",
           "prepare", "register_configs", "train_mode"]

LAZY = {  # public name -> the module that defines it (imported on first use: it needs torch)
    "prepare": "finetune_prep.app.pipeline",
    "Prepared": "finetune_prep.app.pipeline",
    "load_plan": "finetune_prep.paramfile.format",
    "Plan": "finetune_prep.paramfile.format",
    "load_param_groups": "finetune_prep.train.apply",
    "build_optimizer": "finetune_prep.train.apply",
    "train_mode": "finetune_prep.train.apply",
    "build_model": "finetune_prep.train.apply",
    "check": "finetune_prep.train.check",
    "peak_lrs": "finetune_prep.train.lr",
    "Schedule": "finetune_prep.train.unfreezing",
}

register_configs()


def __getattr__(name: str) -> Any:
    """Lazy access to the training-script API, so `import finetune_prep` stays light."""
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(name)
