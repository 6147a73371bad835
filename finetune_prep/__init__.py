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

__all__ = ["CONF_DIR", "CONF_MODULE", "FinetunePrepError", "build_optimizer", "compose",
           "load_param_groups", "prepare", "register_configs", "train_mode"]

register_configs()


def prepare(cfg: Any, **kwargs: Any) -> Prepared:
    """Build, load, freeze and plan from a composed config (see `finetune_prep.runner.prepare`)."""
    from finetune_prep.runner import prepare as _prepare

    return _prepare(cfg, **kwargs)


def __getattr__(name: str) -> Any:
    """Lazy access to the param-file API, so `import finetune_prep` stays light."""
    if name in ("load_param_groups", "build_optimizer", "train_mode"):
        from finetune_prep import paramfile

        return getattr(paramfile, name)
    raise AttributeError(name)
