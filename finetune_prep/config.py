"""The config schema: dataclasses registered in Hydra's ConfigStore.

A misspelt key or a wrong type fails at start-up with Hydra's own message. The YAML files in
conf/ document every key; this module only fixes their types and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    source: str = "torchvision"
    arch: str = "resnet18"
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Any | None = None
    stages: list[Any] | None = None
    input_size: list[int] | None = None


@dataclass
class HeadConfig:
    num_outputs: int = 1
    module: str | None = None


@dataclass
class CheckpointConfig:
    path: str | None = None
    strict: bool = True
    key: str | None = None
    prefix: str | None = None
    exclude_head: bool = False


@dataclass
class FreezeConfig:
    rules: list[dict[str, str]] = field(default_factory=list)
    bn_stats: str = "eval"


@dataclass
class GroupRule:
    match: str = "???"
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    name: str | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    no_decay: list[str] = field(default_factory=lambda: ["@bias", "@norm", "@ndim<=1"])
    groups: list[GroupRule] = field(default_factory=list)
    layer_decay: float | None = None
    layer_decay_granularity: str = "block"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"_target_": "torch.optim.AdamW"})


@dataclass
class ReportConfig:
    grouped: bool = True


@dataclass
class VerifyConfig:
    backward: bool | None = None
    max_params: int = 100_000_000
    batch_size: int = 2
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)


def register() -> None:
    """Make the schema available to the defaults lists as `schema/...`."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="config", node=Config)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="freeze", node=FreezeConfig)
    cs.store(group="schema", name="optim", node=OptimConfig)
