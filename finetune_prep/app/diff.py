"""What changed between two plans: `finetune-prep diff OLD.json NEW.json`.

Pure functions on two typed Plans (never the raw JSON: both files are untrusted and are read
only through paramfile.load_plan) build a `Diff`, which renders as text in the summary's style
(per-stage rows, counts) or as JSON. What training does with a plan is compared: which
parameters train and from which phase, each parameter's lr and weight decay, the groups, the
phases, the norm layers kept in eval mode, the model, the checkpoint, the optimizer and the
counts. What only describes how a plan was made is not: provenance, the verification result,
the memory estimate, and the reasons/rules text (a plan made again from the same configs on
another machine or commit is the same plan).

Exit codes of the command: 0 the plans are the same, 1 they differ or a file is not a plan
(the first output line says which), 2 an internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from finetune_prep.app.report import MAX_LABEL, plural, state
from finetune_prep.errors import FinetunePrepError, listing
from finetune_prep.paramfile.allowlist import short
from finetune_prep.paramfile.format import ModelBlock, Plan, load_plan
from finetune_prep.plan.table import covers

SHOWN = 8  # names listed per line of text before "... and N more"
ROWS = 12  # lr changes and phase moves shown as text before "... and N more" (--json: all)
MODEL_KEYS = ("source", "arch", "num_outputs", "heads")  # shown first, in this order
NOT_COMPARED_MODEL = ("head", "stages")  # `head` repeats `heads`; stages are compared apart


@dataclass(frozen=True)
class Change:
    """One value that differs: `what` names it (a key path), `old` and `new` are the values
    (None where a side does not have it)."""

    what: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Training:
    """How one parameter trains in a plan: from which phase, in which group, lr, weight decay."""

    phase: int
    group: str
    lr: float
    weight_decay: float


@dataclass(frozen=True)
class StageRow:
    """One stage (or the head) of the new plan's model: its tensors that both plans list, how
    many train from the start in each, and which start or stop training from the start."""

    label: str
    tensors: int
    old_trainable: int
    new_trainable: int
    started: tuple[str, ...]
    stopped: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.started or self.stopped)


@dataclass(frozen=True)
class RateChange:
    """Parameters that train in both plans whose lr or weight decay differ, bunched by their
    groups and values (one line per old group -> new group)."""

    old_group: str
    new_group: str
    old_lr: float
    new_lr: float
    old_weight_decay: float
    new_weight_decay: float
    params: tuple[str, ...]


@dataclass(frozen=True)
class PhaseMove:
    """Parameters whose first training phase differs (None: never trains), apart from those
    that only start or stop training from the start (the stage rows show those)."""

    old_phase: int | None
    new_phase: int | None
    params: tuple[str, ...]
    stages: Mapping[str, int]  # stage label -> how many of `params` it holds


@dataclass(frozen=True)
class Diff:
    """Everything that differs between two plans, section by section (empty: no change)."""

    old: str
    new: str
    model: tuple[Change, ...] = ()
    checkpoint: tuple[Change, ...] = ()
    optimizer: tuple[Change, ...] = ()
    counts: tuple[Change, ...] = ()
    only_old: tuple[str, ...] = ()  # parameters only the old plan lists
    only_new: tuple[str, ...] = ()
    stages: tuple[StageRow, ...] = ()  # every row, changed or not (for context)
    rates: tuple[RateChange, ...] = ()
    groups_added: tuple[str, ...] = ()
    groups_removed: tuple[str, ...] = ()
    phases: tuple[Change, ...] = ()
    moves: tuple[PhaseMove, ...] = ()
    eval_added: tuple[str, ...] = ()  # norm layers kept in eval mode from the start
    eval_removed: tuple[str, ...] = ()
    phase_starts: tuple[Mapping[str, Any], ...] = field(default=(), repr=False)  # for labels

    @property
    def same(self) -> bool:
        """True when nothing a trainer uses differs."""
        return not self.headlines()

    def headlines(self) -> list[str]:
        """One line per section that differs: the short list of `--check`."""
        lines = [_changes_line("model", self.model), _changes_line("checkpoint", self.checkpoint),
                 _changes_line("optimizer", self.optimizer), _names_line(self),
                 _training_line(self), _rates_line(self.rates), _groups_line(self),
                 _changes_line("phases", self.phases), _moves_line(self.moves),
                 _eval_line(self), _changes_line("counts", self.counts)]
        return [line for line in lines if line]

    def to_json(self) -> dict[str, Any]:
        """The diff as plain data (`--json`): every section in full, and `same`."""
        data = asdict(self)
        data.pop("phase_starts")
        data["same"] = self.same
        data["stages"] = [dict(asdict(r), changed=r.changed) for r in self.stages]
        return data


# --------------------------------------------------------------------------- building a Diff


def diff_plans(old: Plan, new: Plan) -> Diff:
    """What changed from `old` to `new` (both checked Plans)."""
    old_training, new_training = trainings(old), trainings(new)
    old_names, new_names = set(old.names), set(new.names)
    common = [n for n in new.names if n in old_names]
    labels = stage_labels(new.model, new.names)
    old_groups, new_groups = dict.fromkeys(group_names(old)), dict.fromkeys(group_names(new))
    old_eval, new_eval = set(old.eval_modules), set(new.eval_modules)
    return Diff(
        old=old.origin, new=new.origin,
        model=model_changes(old.model, new.model),
        checkpoint=tuple(value_changes("checkpoint", old.document.get("checkpoint"),
                                       new.document.get("checkpoint"))),
        optimizer=tuple(value_changes("optimizer", dict(old.optimizer), dict(new.optimizer))),
        counts=tuple(value_changes("counts", dict(old.counts), dict(new.counts))),
        only_old=tuple(n for n in old.names if n not in new_names),
        only_new=tuple(n for n in new.names if n not in old_names),
        stages=stage_rows(common, labels, old_training, new_training),
        rates=rate_changes(common, old_training, new_training),
        groups_added=tuple(g for g in new_groups if g not in old_groups),
        groups_removed=tuple(g for g in old_groups if g not in new_groups),
        phases=phase_changes(old, new),
        moves=phase_moves(common, labels, old_training, new_training),
        eval_added=tuple(m for m in new.eval_modules if m not in old_eval),
        eval_removed=tuple(m for m in old.eval_modules if m not in new_eval),
        phase_starts=(_starts(old), _starts(new)),
    )


def trainings(plan: Plan) -> dict[str, Training]:
    """Each parameter that trains in some phase, with that phase and its group's values."""
    found = {}
    for phase, groups in [(0, plan.groups), *((p.index, p.groups) for p in plan.schedule)]:
        for g in groups:
            for name in g.params:
                found[name] = Training(phase, g.name, g.lr, g.weight_decay)
    return found


def stage_labels(model: ModelBlock, names: Sequence[str]) -> dict[str, str]:
    """Each parameter's stage as the summary labels it ('4 layer4', 'head fc'), 'other'
    outside every stage; the head wins over a stage that also covers it."""
    stages = _stage_lists(model)
    head = "head " + "+".join(model.heads) if model.heads else "head"
    labels = {}
    for name in names:
        if any(covers(h, name) for h in model.heads):
            labels[name] = head
            continue
        labels[name] = next((f"{i} {'+'.join(s)}" for i, s in enumerate(stages)
                             if any(covers(m, name) for m in s)), "other")
    return labels


def _stage_lists(model: ModelBlock) -> list[list[str]]:
    """The model block's stages as lists of names (a stage may be written as one name)."""
    raw = model.fields.get("stages") or []
    return [[s] if isinstance(s, str) else list(s) for s in raw]


def stage_rows(common: Sequence[str], labels: Mapping[str, str],
               old: Mapping[str, Training], new: Mapping[str, Training]) -> tuple[StageRow, ...]:
    """One row per stage label, in model order: tensors training from the start, before and
    after, and which start or stop training from the start."""
    rows: dict[str, list[str]] = {}
    for name in common:
        rows.setdefault(labels[name], []).append(name)
    return tuple(_row(label, names, old, new)
                 for label, names in sorted(rows.items(), key=lambda kv: _label_order(kv[0])))


def _row(label: str, names: Sequence[str], old: Mapping[str, Training],
         new: Mapping[str, Training]) -> StageRow:
    before = [n for n in names if _from_start(old, n)]
    after = [n for n in names if _from_start(new, n)]
    started = tuple(n for n in after if not _from_start(old, n))
    stopped = tuple(n for n in before if not _from_start(new, n))
    return StageRow(label, len(names), len(before), len(after), started, stopped)


def _from_start(training: Mapping[str, Training], name: str) -> bool:
    t = training.get(name)
    return t is not None and t.phase == 0


def _label_order(label: str) -> tuple[int, int]:
    """Stages by index, then the head, then 'other'."""
    first = label.split(" ", 1)[0]
    if first.isdigit():
        return (0, int(first))
    return (1, 0) if first == "head" else (2, 0)


def rate_changes(common: Sequence[str], old: Mapping[str, Training],
                 new: Mapping[str, Training]) -> tuple[RateChange, ...]:
    """Parameters training in both plans whose lr or weight decay differ, bunched."""
    bunches: dict[tuple, list[str]] = {}
    for name in common:
        a, b = old.get(name), new.get(name)
        if a is None or b is None or (a.lr, a.weight_decay) == (b.lr, b.weight_decay):
            continue
        key = (a.group, b.group, a.lr, b.lr, a.weight_decay, b.weight_decay)
        bunches.setdefault(key, []).append(name)
    return tuple(RateChange(*key, tuple(names)) for key, names in bunches.items())


def group_names(plan: Plan) -> list[str]:
    """Every group's name, phase 0 first, then each later phase's."""
    return [g.name for g in plan.groups] + [g.name for p in plan.schedule for g in p.groups]


def phase_changes(old: Plan, new: Plan) -> tuple[Change, ...]:
    """Phases added or removed, and the start and rules of each phase both plans have."""
    changes = []
    for k in range(max(len(old.schedule), len(new.schedule))):
        a = old.schedule[k] if k < len(old.schedule) else None
        b = new.schedule[k] if k < len(new.schedule) else None
        at = f"phase {k + 1}"
        if a is None or b is None:
            changes.append(Change(at, _start(a), _start(b)))
            continue
        if (a.unit, a.at) != (b.unit, b.at):
            changes.append(Change(f"{at} starts at", _start(a), _start(b)))
        if a.rules != b.rules:
            changes.append(Change(f"{at} rules", list(a.rules), list(b.rules)))
    return tuple(changes)


def _start(phase: Any) -> str | None:
    return None if phase is None else f"{phase.unit.value} {phase.at}"


def _starts(plan: Plan) -> dict[str, Any]:
    """Phase number -> when it starts, for the labels of phase moves."""
    return {str(p.index): _start(p) for p in plan.schedule}


def phase_moves(common: Sequence[str], labels: Mapping[str, str],
                old: Mapping[str, Training], new: Mapping[str, Training]) -> tuple[PhaseMove, ...]:
    """Parameters whose first training phase differs, bunched by (old phase, new phase); a
    parameter that only starts or stops training from the start is left to the stage rows."""
    bunches: dict[tuple[int | None, int | None], list[str]] = {}
    for name in common:
        a, b = _phase(old, name), _phase(new, name)
        if a == b or {a, b} == {None, 0}:
            continue
        bunches.setdefault((a, b), []).append(name)
    moves = []
    for (a, b), names in sorted(bunches.items(), key=lambda kv: (_order(kv[0][1]),
                                                                   _order(kv[0][0]))):
        counts: dict[str, int] = {}
        for name in names:
            counts[labels[name]] = counts.get(labels[name], 0) + 1
        moves.append(PhaseMove(a, b, tuple(names), counts))
    return tuple(moves)


def _phase(training: Mapping[str, Training], name: str) -> int | None:
    t = training.get(name)
    return None if t is None else t.phase


def _order(phase: int | None) -> int:
    return 1 << 30 if phase is None else phase


def model_changes(old: ModelBlock, new: ModelBlock) -> tuple[Change, ...]:
    """Source, arch, num_outputs and heads first, then the stages, then any other field."""
    a = {"source": old.source, "arch": old.arch, "num_outputs": old.num_outputs,
         "heads": list(old.heads)}
    b = {"source": new.source, "arch": new.arch, "num_outputs": new.num_outputs,
         "heads": list(new.heads)}
    changes = value_changes("model", a, b)
    if _stage_lists(old) != _stage_lists(new):
        changes.append(Change("model.stages", _stage_lists(old), _stage_lists(new)))
    skip = (*MODEL_KEYS, *NOT_COMPARED_MODEL)
    changes += value_changes("model", {k: v for k, v in old.fields.items() if k not in skip},
                             {k: v for k, v in new.fields.items() if k not in skip})
    return tuple(changes)


def value_changes(where: str, old: Any, new: Any) -> list[Change]:
    """The keys of two JSON values that differ, one level deep in objects (the rest whole).
    A key one side lacks has None there."""
    if old == new:
        return []
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return [Change(where, old, new)]
    keys = list(dict.fromkeys([*old, *new]))
    return [Change(f"{where}.{k}", old.get(k), new.get(k)) for k in keys
            if old.get(k) != new.get(k) or (k in old) != (k in new)]


# --------------------------------------------------------------------------- headlines


def _changes_line(title: str, changes: Sequence[Change]) -> str:
    if not changes:
        return ""
    shown = "; ".join(f"{c.what.split('.', 1)[-1]} {_value(c.old)} -> {_value(c.new)}"
                      for c in changes[:3])
    more = f"; ... and {len(changes) - 3} more" if len(changes) > 3 else ""
    return f"{title}: {shown}{more}"


def _value(value: Any, limit: int = 60) -> str:
    """A value as the text shows it: numbers with thousands separators, None as '(none)'."""
    if value is None:
        return "(none)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return short(value, limit) if not isinstance(value, str) else (
            value if len(value) <= limit else value[:limit] + "...")
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _names_line(diff: Diff) -> str:
    if not diff.only_old and not diff.only_new:
        return ""
    return (f"parameters: {plural(len(diff.only_new), 'tensor')} only in the new plan, "
            f"{len(diff.only_old):,} only in the old")


def _training_line(diff: Diff) -> str:
    started = [(r.label, len(r.started)) for r in diff.stages if r.started]
    stopped = [(r.label, len(r.stopped)) for r in diff.stages if r.stopped]
    if not started and not stopped:
        return ""
    parts = []
    for verb, rows in (("start", started), ("stop", stopped)):
        if rows:
            where = ", ".join(f"{label}: {n:,}" for label, n in rows)
            parts.append(f"{plural(sum(n for _, n in rows), 'tensor')} {verb} training "
                         f"({where})")
    return "training from the start: " + "; ".join(parts)


def _rates_line(rates: Sequence[RateChange]) -> str:
    if not rates:
        return ""
    tensors = sum(len(r.params) for r in rates)
    return (f"lr / weight decay: {plural(tensors, 'tensor')} change "
            f"({plural(len(rates), 'group pair')})")


def _groups_line(diff: Diff) -> str:
    if not diff.groups_added and not diff.groups_removed:
        return ""
    parts = [listing(label, list(names), 4) for label, names in (
        ("added", diff.groups_added), ("removed", diff.groups_removed)) if names]
    return "groups: " + "; ".join(parts)


def _moves_line(moves: Sequence[PhaseMove]) -> str:
    if not moves:
        return ""
    return (f"schedule: {plural(sum(len(m.params) for m in moves), 'tensor')} start training "
            "in another phase")


def _eval_line(diff: Diff) -> str:
    if not diff.eval_added and not diff.eval_removed:
        return ""
    return (f"norm layers in eval mode from the start: {len(diff.eval_added):,} added, "
            f"{len(diff.eval_removed):,} removed")


# --------------------------------------------------------------------------- text


def render(diff: Diff, check: bool = False) -> str:
    """The diff as text: a verdict line, then the short list (`check`) or every section."""
    heads = diff.headlines()
    if not heads:
        return (f"Same plan: {diff.old} and {diff.new} train the same parameters with the same "
                "settings.\n")
    verdict = f"Plans differ: {diff.old} -> {diff.new}"
    if check:
        return "\n".join([verdict, *(f"  {h}" for h in heads)]) + "\n"
    sections: list[Callable[[Diff], str]] = [
        _model_text, _checkpoint_text, _optimizer_text, _counts_text, _names_text, _stages_text,
        _rates_text, _groups_text, _phases_text, _moves_text, _eval_text]
    parts = [verdict, *(s(diff) for s in sections)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _change_lines(title: str, changes: Sequence[Change]) -> str:
    if not changes:
        return ""
    lines = [title]
    for c in changes:
        lines.append(f"  {c.what.split('.', 1)[-1]}: {_value(c.old, 200)} -> "
                     f"{_value(c.new, 200)}")
    return "\n".join(lines)


def _model_text(diff: Diff) -> str:
    return _change_lines("Model:", diff.model)


def _checkpoint_text(diff: Diff) -> str:
    return _change_lines("Checkpoint:", diff.checkpoint)


def _optimizer_text(diff: Diff) -> str:
    return _change_lines("Optimizer:", diff.optimizer)


def _counts_text(diff: Diff) -> str:
    if not diff.counts:
        return ""
    lines = ["Parameters (numbers, from the start):"]
    for c in diff.counts:
        delta = ""
        if isinstance(c.old, int) and isinstance(c.new, int):
            delta = f" ({c.new - c.old:+,})"
        lines.append(f"  {c.what.split('.', 1)[-1]}: {_value(c.old)} -> {_value(c.new)}{delta}")
    return "\n".join(lines)


def _names_text(diff: Diff) -> str:
    lines = [f"  {listing(what, list(names), SHOWN)}" for what, names in (
        ("tensors only in the new plan", diff.only_new),
        ("tensors only in the old plan", diff.only_old)) if names]
    return "\n".join(["Parameter names (another model, or another head):", *lines]) if lines \
        else ""


def _stages_text(diff: Diff) -> str:
    """The summary's stage table, in tensors, with the state before and after."""
    if not any(r.changed for r in diff.stages):
        return ""
    title = f"Training from the start, per stage ({plural(len(diff.stages), 'row')}; tensors)"
    width = min(max(24, *(len(r.label) for r in diff.stages)), MAX_LABEL)
    lines = [title, f"{'Stage':<{width}}  {'Before':<10} {'After':<10} {'Tensors':>8} "
                    f"{'Started':>8} {'Stopped':>8}"]
    for r in diff.stages:
        label = r.label if len(r.label) <= width else r.label[: width - 3] + "..."
        lines.append(f"{label:<{width}}  {state(r.old_trainable, r.tensors):<10} "
                     f"{state(r.new_trainable, r.tensors):<10} {r.tensors:>8,} "
                     f"{len(r.started):>8,} {len(r.stopped):>8,}")
    started = [n for r in diff.stages for n in r.started]
    stopped = [n for r in diff.stages for n in r.stopped]
    lines += [f"  {listing(what, names, SHOWN)}" for what, names in (
        ("start training", started), ("stop training", stopped)) if names]
    return "\n".join(lines)


def _rates_text(diff: Diff) -> str:
    if not diff.rates:
        return ""
    lines = ["Learning rate and weight decay (tensors training in both plans):"]
    for r in diff.rates[:ROWS]:
        group = r.old_group if r.old_group == r.new_group else f"{r.old_group} -> {r.new_group}"
        values = []
        if r.old_lr != r.new_lr:
            values.append(f"lr {r.old_lr:g} -> {r.new_lr:g}")
        if r.old_weight_decay != r.new_weight_decay:
            values.append(f"weight_decay {r.old_weight_decay:g} -> {r.new_weight_decay:g}")
        lines.append(f"  {group}: {', '.join(values)}, {plural(len(r.params), 'tensor')} "
                     f"({', '.join(r.params[:3])}{' ...' if len(r.params) > 3 else ''})")
    if len(diff.rates) > ROWS:
        lines.append(f"  ... and {len(diff.rates) - ROWS} more (--json lists them all)")
    return "\n".join(lines)


def _groups_text(diff: Diff) -> str:
    lines = [f"  {listing(what, list(names), SHOWN)}" for what, names in (
        ("groups added", diff.groups_added), ("groups removed", diff.groups_removed)) if names]
    return "\n".join(["Param groups:", *lines]) if lines else ""


def _phases_text(diff: Diff) -> str:
    return _change_lines("Phases (freeze.schedule):", diff.phases)


def _moves_text(diff: Diff) -> str:
    if not diff.moves:
        return ""
    old_starts, new_starts = diff.phase_starts or ({}, {})
    lines = ["First training phase (tensors):"]
    for m in diff.moves[:ROWS]:
        where = ", ".join(f"{label}: {n:,}" for label, n in m.stages.items())
        lines.append(f"  {_phase_label(m.old_phase, old_starts)} -> "
                     f"{_phase_label(m.new_phase, new_starts)}: "
                     f"{plural(len(m.params), 'tensor')} ({where})")
    if len(diff.moves) > ROWS:
        lines.append(f"  ... and {len(diff.moves) - ROWS} more (--json lists them all)")
    return "\n".join(lines)


def _phase_label(phase: int | None, starts: Mapping[str, Any]) -> str:
    if phase is None:
        return "never"
    if phase == 0:
        return "from the start"
    return f"phase {phase} ({starts.get(str(phase), '?')})"


def _eval_text(diff: Diff) -> str:
    lines = [f"  {listing(what, list(names), SHOWN)}" for what, names in (
        ("now kept in eval mode", diff.eval_added),
        ("now in train mode", diff.eval_removed)) if names]
    return "\n".join(["Norm layers (eval_modules, from the start):", *lines]) if lines else ""


# --------------------------------------------------------------------------- command


def parser() -> argparse.ArgumentParser:
    """`finetune-prep diff`'s options; a usage mistake is a FinetunePrepError (exit 1)."""
    p = argparse.ArgumentParser(
        prog="finetune-prep diff",
        description="What changed between two param_groups.json plans. Exit 0 when they are "
                    "the same, 1 when they differ or a file is not a plan, 2 on an internal "
                    "error. Provenance, verification, the memory estimate and reason texts are "
                    "not compared.")
    p.add_argument("old", metavar="OLD.json", help="the plan to compare against (committed)")
    p.add_argument("new", metavar="NEW.json", help="the plan just made")
    p.add_argument("--check", action="store_true",
                   help="print only the verdict and one line per section that differs")
    p.add_argument("--json", action="store_true", help="print the diff as JSON")

    def error(message: str) -> None:
        raise FinetunePrepError(f"diff: {message}. Usage: finetune-prep diff OLD.json NEW.json "
                                "[--check] [--json]")

    p.error = error  # type: ignore[method-assign]
    return p


def main(argv: Sequence[str]) -> int:
    """Run `diff ARGV`: print the result and return the exit code (0 same, 1 differ or bad
    input, 2 internal error)."""
    try:
        args = parser().parse_args(list(argv))
        result = diff_plans(load_plan(args.old), load_plan(args.new))
    except FinetunePrepError as err:
        print(f"[ERROR] {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - reported as an internal error, exit 2
        print(f"[ERROR] internal error in diff ({type(err).__name__}: {err}); please report "
              "it with the traceback below", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    else:
        sys.stdout.write(render(result, check=args.check))
    return 0 if result.same else 1
