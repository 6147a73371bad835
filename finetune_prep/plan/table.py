"""The parameter table: what planning knows about a model (names, shapes, modules, stages, head).

Torch-free, so rules, groups and phases run on names alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

GRANULARITIES = ("block", "stage")  # what optim.layer_decay counts as one layer


def covers(prefix: str, name: str) -> bool:
    """True if `prefix` is `name` or an enclosing module of it (dot boundary)."""
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class ParamTable:
    """What the pure stages of the pipeline know about a model: names, shapes and structure.

    It is the one place that says which parameters a stage or the head holds.
    """

    names: tuple[str, ...]  # parameters in model order, tied weights once
    shapes: Mapping[str, tuple[int, ...]]
    owner: Mapping[str, str]  # parameter name -> the module that holds it ("" for the root)
    module_types: Mapping[str, str]  # module name -> class name, model order
    norm_modules: frozenset[str]  # normalization layers (BatchNorm, LayerNorm, GroupNorm, ...)
    stat_modules: frozenset[str]  # modules with running statistics (BatchNorm and kin)
    head: tuple[str, ...]  # head modules: the main head first, then auxiliary heads
    stages: tuple[tuple[str, ...], ...]  # each stage: module or parameter names, model order
    layers: Mapping[str, int] = field(default_factory=dict)  # block-level layer id, head last
    no_weight_decay: frozenset[str] = frozenset()  # the model's own no-weight-decay parameters
    model_frozen: frozenset[str] = frozenset()  # requires_grad=False as the constructor left them

    def numel(self, name: str) -> int:
        """Number of elements of one parameter."""
        return math.prod(self.shapes[name])

    def count(self, names: Sequence[str] | None = None) -> int:
        """Number of elements of `names` (all parameters by default)."""
        return sum(self.numel(n) for n in (self.names if names is None else names))

    def params_under(self, entries: Sequence[str]) -> list[str]:
        """Parameters that any of `entries` (module or parameter names) covers, model order."""
        return [n for n in self.names if any(covers(e, n) for e in entries)]

    def stage_params(self, index: int) -> list[str]:
        """Parameters of stage `index` (Python indexing), in model order."""
        return self.params_under(self.stages[index])

    def head_params(self) -> list[str]:
        """Parameters of the head module(s), in model order."""
        return self.params_under(self.head)

    def stage_label(self, index: int) -> str:
        """A short readable name for a stage, for people (files keep the list)."""
        return "+".join(self.stages[index])

    def stage_lists(self) -> list[list[str]]:
        """The stages as JSON-ready lists of module/parameter names."""
        return [list(s) for s in self.stages]

    @cached_property
    def position(self) -> Mapping[str, int | None]:
        """Each parameter's stage index; the head's is len(stages); None outside every stage."""
        positions: dict[str, int | None] = dict.fromkeys(self.names)
        for i in range(len(self.stages)):
            positions.update(dict.fromkeys(self.stage_params(i), i))
        positions.update(dict.fromkeys(self.head_params(), len(self.stages)))
        return positions

    def layer_ids(self, granularity: str = "block") -> dict[str, int]:
        """Each parameter's layer id for layer-wise lr decay: 0 the stem ... the highest the
        head. `block`: one per block (see stages.derive_layers); `stage`: the stage index
        (head len(stages); a parameter outside every stage 0)."""
        if granularity == "block" and self.layers:
            return dict(self.layers)
        return {n: p or 0 for n, p in self.position.items()}
