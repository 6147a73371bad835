"""Read and write param_groups.json (format finetune_prep/param_groups@2) as a typed `Plan`.

The file is read as plain JSON and checked (paramfile.validate) before anything uses it; a `Plan`
is the checked document seen through frozen dataclasses, so the training side reads it once and
never parses strings or indexes dicts. `Plan.save` writes back the same bytes it was read from.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from finetune_prep.atomic import write_atomic
from finetune_prep.errors import FinetunePrepError
from finetune_prep.paramfile import allowlist
from finetune_prep.paramfile.validate import GROUP_KEYS, content_problems

FORMAT = "finetune_prep/param_groups@2"  # @2 added `schedule` (the phases of gradual unfreezing)
READABLE = ("finetune_prep/param_groups@1", FORMAT)  # an @1 file is an @2 file without phases


def dumps(document: dict[str, Any]) -> str:
    """The file's text: stable key order and indentation, so equal plans give equal bytes."""
    return json.dumps(document, indent=2, allow_nan=False) + "\n"  # strict JSON: no NaN


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a param_groups.json; errors say what is wrong with the file."""
    return load_plan(path).to_document()


def _load_json(path: Path) -> Any:
    """The file's JSON (no check of its content yet); errors name the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FinetunePrepError(f"{path} does not exist; run finetune_prep to make it.") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FinetunePrepError(
            f"{path} is not valid JSON ({err}); it was edited or truncated. "
            "Run finetune_prep again to rewrite it."
        ) from err
    except RecursionError as err:
        raise FinetunePrepError(
            f"{path} is nested too deeply to be a param-group file; prepare the file again."
        ) from err


def at_phase(document: dict[str, Any], phase: int) -> dict[str, Any]:
    """The plan as it stands in `phase` of its schedule: every group added so far, that phase's
    frozen parameters and eval modules, and the phases still to come (phase 0 is the document)."""
    schedule = document.get("schedule") or []
    if not 0 <= phase <= len(schedule):
        raise FinetunePrepError(
            f"phase {phase} is not in this plan: it has phases 0..{len(schedule)}.")
    if phase == 0:
        return document
    current = schedule[phase - 1]
    return {**document,
            "groups": document["groups"] + [g for p in schedule[:phase] for g in p["groups"]],
            "frozen": current["frozen"], "eval_modules": current["eval_modules"],
            "counts": current["counts"], "schedule": schedule[phase:]}


PlanLike = "Plan | str | os.PathLike[str]"  # what every training-side API accepts


class Unit(str, Enum):
    """What a phase boundary of the schedule counts."""

    EPOCH = "epoch"
    STEP = "step"


@dataclass(frozen=True)
class Group:
    """One optimizer group: absolute lr and weight decay, and its parameters by name."""

    name: str
    lr: float
    weight_decay: float
    params: tuple[str, ...]
    info: Mapping[str, Any] = field(default_factory=dict)  # other keys (lr_scale, layer, ...)

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Group:
        """The group of a checked document."""
        info = {k: v for k, v in raw.items() if k not in ("name", "params", *GROUP_KEYS)}
        return cls(str(raw.get("name", "")), raw["lr"], raw["weight_decay"],
                   tuple(raw["params"]), MappingProxyType(info))

    def optimizer_args(self) -> dict[str, float]:
        """What torch.optim takes beside `params`: the absolute lr and weight decay only."""
        return {"lr": self.lr, "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class Phase:
    """A later phase of gradual unfreezing: from `at` (`unit`s), its new groups train too."""

    index: int
    unit: Unit
    at: int
    rules: tuple[str, ...]
    groups: tuple[Group, ...]
    frozen: tuple[str, ...]
    eval_modules: tuple[str, ...]
    counts: Mapping[str, int]

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> Phase:
        """The phase of a checked document's `schedule`."""
        ((unit, at),) = raw["at"].items()
        return cls(raw["phase"], Unit(unit), at, tuple(raw["rules"]),
                   tuple(Group.of(g) for g in raw["groups"]), tuple(raw["frozen"]),
                   tuple(raw["eval_modules"]), MappingProxyType(dict(raw["counts"])))


@dataclass(frozen=True)
class ModelBlock:
    """The model a plan was made for: enough to name it, and (`fields`) to rebuild it."""

    source: str
    arch: str
    num_outputs: int | None
    heads: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]
    fields: Mapping[str, Any]  # the whole block as the file has it (kwargs, target, input_size)

    @classmethod
    def of(cls, raw: Mapping[str, Any]) -> ModelBlock:
        """The model block of a checked document (an @1 file may lack `heads`)."""
        heads = raw.get("heads") or ([raw["head"]] if raw.get("head") else [])
        return cls(str(raw.get("source", "?")), str(raw.get("arch", "?")), raw.get("num_outputs"),
                   tuple(heads), tuple(tuple(s) for s in raw.get("stages", [])),
                   MappingProxyType(copy.deepcopy(dict(raw))))


@dataclass(frozen=True)
class Plan:
    """A checked param_groups.json: phase 0's groups, frozen names and eval modules, the
    optimizer, the model and the later phases. `origin` names where it came from, for messages."""

    groups: tuple[Group, ...]
    frozen: tuple[str, ...]
    eval_modules: tuple[str, ...]
    optimizer: Mapping[str, Any]
    model: ModelBlock
    schedule: tuple[Phase, ...]
    counts: Mapping[str, int]
    document: Mapping[str, Any] = field(repr=False)  # the JSON as read, for save() and tools
    origin: str = "the plan"

    @classmethod
    def from_document(cls, document: Mapping[str, Any], origin: str = "the plan") -> Plan:
        """A Plan from a document, checked as a file is (a document is untrusted too)."""
        check_document(document, origin)
        return cls._of_checked(copy.deepcopy(dict(document)), origin)

    @classmethod
    def _of_checked(cls, document: dict[str, Any], origin: str) -> Plan:
        return cls(
            groups=tuple(Group.of(g) for g in document["groups"]),
            frozen=tuple(document["frozen"]),
            eval_modules=tuple(document.get("eval_modules", [])),
            optimizer=MappingProxyType(
                dict(document.get("optimizer") or allowlist.DEFAULT_OPTIMIZER)),
            model=ModelBlock.of(document.get("model") or {}),
            schedule=tuple(Phase.of(p) for p in document.get("schedule", [])),
            counts=MappingProxyType(dict(document.get("counts") or {})),
            document=MappingProxyType(document), origin=origin)

    @property
    def trainable(self) -> tuple[str, ...]:
        """The names that train in this phase, group by group."""
        return tuple(n for g in self.groups for n in g.params)

    @property
    def adapter(self) -> Mapping[str, Any] | None:
        """The adapters peft built on the model (peft's config, the adapter parameters), or
        None for a plan without adapters."""
        block = self.document.get("adapter")
        return MappingProxyType(block) if block is not None else None

    @property
    def names(self) -> tuple[str, ...]:
        """Every parameter the plan lists: trainable, then frozen."""
        return self.trainable + self.frozen

    def at_phase(self, phase: int) -> Plan:
        """The plan as it stands in `phase` of its schedule (0 is the plan itself)."""
        if phase == 0:
            return self
        return Plan._of_checked(copy.deepcopy(at_phase(dict(self.document), phase)), self.origin)

    def to_document(self) -> dict[str, Any]:
        """A plain, mutable copy of the JSON document."""
        return copy.deepcopy(dict(self.document))

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan to `path` atomically (never through a link), as the CLI writes it."""
        write_atomic(path, dumps(self.to_document()))


def check_document(document: Any, origin: str) -> None:
    """Refuse a document of another format or with any content problem, naming `origin`."""
    if not isinstance(document, Mapping) or document.get("format") not in READABLE:
        found = document.get("format") if isinstance(document, Mapping) else type(document).__name__
        raise FinetunePrepError(
            f"{origin} has format {found!r}; this finetune_prep reads {' and '.join(READABLE)}. "
            "Run the finetune_prep that wrote it, or prepare the file again."
        )
    problems = content_problems(dict(document))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise FinetunePrepError(f"{origin} is not a valid param-group file: {shown}. "
                                "Prepare the file again instead of editing it.")


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check a param_groups.json into a `Plan`."""
    return Plan.from_document(_load_json(Path(path)), str(path))


def as_plan(plan: Plan | str | os.PathLike) -> Plan:
    """`plan` itself, or the Plan read from a path: what every training-side API accepts."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    raise FinetunePrepError(
        f"expected a Plan or the path of a param_groups.json, got a {type(plan).__name__}; "
        "use finetune_prep.load_plan(path) or pass the path.")
