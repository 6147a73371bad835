"""The trainability summary: the text the console shows and trainability.txt keeps.

It grows from the seed script's grouped view, with a third state (Partial) where a top-level
module is half frozen, parameter counts on every row, and each norm layer's train/eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_prep.app import provenance
from finetune_prep.app.proof import FAILURES
from finetune_prep.config import CONF_DIR
from finetune_prep.plan.table import ParamTable, covers

MAX_LABEL = 60  # longer stage labels are clipped so the columns stay aligned
COMPACT_AFTER = 6  # more layer-decay groups than this are summarized by their first and last


def plural(count: int, word: str) -> str:
    """'1 tensor', '2 tensors', '1,000 tensors'."""
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def share(part: int, total: int) -> str:
    """A percentage that is 0% or 100% only when exact: 513 of 11 M is '<0.01%', not '0.00%'."""
    if total <= 0 or part <= 0:
        return "0%"
    if part >= total:
        return "100%"
    pct = 100.0 * part / total
    if pct < 0.01:
        return "<0.01%"
    return ">99.99%" if pct > 99.99 else f"{pct:.2f}%"


def state(trainable: int, total: int) -> str:
    """Trainable, Frozen, or Partial for a half-frozen group."""
    if trainable == 0:
        return "Frozen"
    return "Trainable" if trainable == total else "Partial"


def top_level_rows(
    table: ParamTable, trainable: Mapping[str, bool]
) -> list[tuple[str, int, int]]:
    """(top-level module, trainable count, total count), in model order. A wrapper that holds
    every parameter but the head (a Hugging Face model's `vit`, `model`) is shown opened."""
    wrapper = _wrapper(table)
    rows: dict[str, list[int]] = {}
    for name in table.names:
        parts = name.split(".")
        row = rows.setdefault(".".join(parts[:2 if parts[0] == wrapper else 1]), [0, 0])
        row[0] += table.numel(name) if trainable[name] else 0
        row[1] += table.numel(name)
    return [(top, t, n) for top, (t, n) in rows.items()]


def _wrapper(table: ParamTable) -> str | None:
    """The one top-level module that holds every parameter outside the head, if there is one."""
    heads = set(table.head_params())
    tops = {n.split(".")[0] for n in table.names if n not in heads}
    if len(tops) != 1 or any(covers(t, h) for t in tops for h in table.head):
        return None
    top = tops.pop()
    return top if any(n.count(".") >= 2 for n in table.names if n not in heads) else None


def render(
    document: Mapping[str, Any],
    table: ParamTable,
    trainable: Mapping[str, bool],
    grouped: bool,
) -> str:
    """The summary as text (Prepared.summary adds the warnings after it)."""
    parts = [
        _header(document, table),
        _grouped(table, trainable, document) if grouped else _detailed(table, trainable),
        _stages(table, trainable),
        _totals(document["counts"]),
        _groups(document),
        _memory(document.get("memory")),
        _phases(document),
        _verified(document.get("verified")),
        "\n".join(provenance.summary_lines(document.get("provenance"), CONF_DIR)),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def _header(document: Mapping[str, Any], table: ParamTable) -> str:
    model, ckpt = document["model"], document["checkpoint"]
    heads = ", ".join(f"{h} ({table.module_types.get(h, '?')})" for h in table.head)
    outputs = model.get("num_outputs")
    lines = [
        f"Model: {model['arch']} ({model['source']})"
        + (f", {plural(outputs, 'output')}" if outputs else ""),
        f"Head: {heads or 'none'}" + (f" (head.mode={model['head_mode']})"
                                      if model.get("head_mode", "replace") != "replace" else ""),
    ]
    lines += _checkpoint_lines(ckpt)
    return "\n".join(lines)


def _checkpoint_lines(ckpt: Mapping[str, Any] | None) -> list[str]:
    if not ckpt or not ckpt.get("sources"):
        return ["Checkpoint: none (random init)"]
    lines = []
    for src in ckpt["sources"]:
        lines.append(f"Checkpoint: {src['path']} ({plural(src['loaded'], 'tensor')} loaded)")
        lines += [f"  unwrapped: {step}" for step in src.get("unwrapped", [])]
        for key in ("missing", "unexpected", "excluded"):
            if src.get(key):
                lines.append(f"  {key} ({len(src[key])}): {', '.join(src[key][:6])}"
                             + (" ..." if len(src[key]) > 6 else ""))
        for s in src.get("skipped", []):
            lines.append(f"  skipped (shape mismatch): {s['key']} checkpoint {s['checkpoint']}"
                         f" vs model {s['model']}")
    return lines


def _grouped(table: ParamTable, trainable: Mapping[str, bool], document: Mapping) -> str:
    eval_modules = set(document.get("eval_modules", []))
    stat_modules = sorted(table.stat_modules)
    rows = top_level_rows(table, trainable)
    width = max([20, *(len(top) + 1 for top, _, _ in rows)])
    lines = [f"{'Module':<{width}} {'State':<10} {'Trainable':>13} / {'Total':<13} Norm mode"]
    for top, t, n in rows:
        stats = [m for m in stat_modules if covers(top, m)]
        mode = _mode(stats, eval_modules)
        lines.append(f"{top:<{width}} {state(t, n):<10} {t:>13,} / {n:<13,} {mode}".rstrip())
    return "\n".join(lines)


def _mode(stats: Sequence[str], eval_modules: set[str]) -> str:
    if not stats:
        return ""
    in_eval = sum(m in eval_modules for m in stats)
    if in_eval == 0:
        return "train"
    return "eval" if in_eval == len(stats) else f"mixed ({in_eval}/{len(stats)} eval)"


def _stages(table: ParamTable, trainable: Mapping[str, bool]) -> str:
    """One row per stage (the units that @stage[i] and layer decay index), then the head."""
    rows = [(f"{i} {table.stage_label(i)}", table.stage_params(i))
            for i in range(len(table.stages))]
    rows.append(("head " + "+".join(table.head), table.head_params()))
    title = f"Stages ({len(table.stages)}) and head"
    width = min(max(len(title), *(len(label) for label, _ in rows)), MAX_LABEL)
    lines = [f"{title:<{width}}  {'State':<10} {'Trainable':>13} / Total"]
    for label, names in rows:
        t = table.count([n for n in names if trainable[n]])
        n = table.count(names)
        lines.append(f"{_clip(label, width):<{width}}  {state(t, n):<10} {t:>13,} / {n:,}")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _detailed(table: ParamTable, trainable: Mapping[str, bool]) -> str:
    width = max((len(n) for n in table.names), default=10) + 2
    lines = [f"{'Parameter':<{width}} {'State':<10} Shape"]
    for name in table.names:
        shape = "x".join(map(str, table.shapes[name])) or "scalar"
        lines.append(f"{name:<{width}} {'Trainable' if trainable[name] else 'Frozen':<10} {shape}")
    return "\n".join(lines)


def _totals(counts: Mapping[str, int]) -> str:
    pct = share(counts["trainable"], counts["total"])
    return "\n".join([
        f"Total parameters:     {counts['total']:,}",
        f"Trainable parameters: {counts['trainable']:,} ({pct})",
        f"Frozen parameters:    {counts['frozen']:,}",
    ])


def _groups(document: Mapping[str, Any]) -> str:
    optimizer = document.get("optimizer", {}).get("_target_", "?")
    groups = document["groups"]
    if not groups:
        return f"Param groups for {optimizer}: none (nothing trains)"
    if len(groups) > COMPACT_AFTER and all(_decay_step(g) for g in groups):
        return _layer_groups(optimizer, groups)
    lines = [f"Param groups for {optimizer}:"]
    for g in groups:
        why = f"  [{'; '.join(g['reasons'])}]" if g.get("reasons") else ""
        lines.append(f"  {g['name']}: lr={g['lr']:g} weight_decay={g['weight_decay']:g}, "
                     f"{plural(len(g['params']), 'tensor')}{why}")
    return "\n".join(lines)


def _decay_step(group: Mapping[str, Any]) -> tuple[str, int] | None:
    """(factor, depth) of a group's layer decay, if it has one (files before @2's
    `layer_decay` field had it only in a reason: their summary lists every group)."""
    decay = group.get("layer_decay")
    return (f"{decay['factor']:g}", decay["depth"]) if decay else None


def _layer_groups(optimizer: str, groups: Sequence[Mapping[str, Any]]) -> str:
    """Layer decay in three lines: the lr of the lowest and highest training layer, counts,
    and the weight decays (the file lists every group)."""
    lrs: dict[int, set[float]] = {}
    heads: set[int] = set()
    top = 0
    for g in groups:
        factor, exponent = _decay_step(g)  # type: ignore[misc]
        for layer in set(g["layer_ids"]):
            lrs.setdefault(layer, set()).add(g["lr"])
            top = max(top, layer + exponent)
            heads |= {layer} if g["name"].split("/")[0] == "head" else set()

    def at(layer: int) -> str:
        values = "|".join(f"{v:g}" for v in sorted(lrs[layer]))
        return f"{values} (layer {layer}{', head' if layer in heads else ''})"

    first, last = min(lrs), max(lrs)
    decays: dict[float, list[int]] = {}
    for g in groups:
        decays.setdefault(g["weight_decay"], []).append(len(g["params"]))
    no_decay = list(dict.fromkeys(f"optim.no_decay ({p})" for g in groups
                                  for p in g.get("no_decay", [])))
    tensors = sum(len(g["params"]) for g in groups)
    return "\n".join([
        f"Param groups for {optimizer}: {plural(len(groups), 'group')}, "
        f"{plural(tensors, 'tensor')}",
        f"  layer decay {factor}: {len(lrs)} of {plural(top + 1, 'layer')} train, "
        f"lr {at(first)} ... {at(last)}",
        "  " + "; ".join(f"weight_decay {wd:g}: {plural(sum(decays[wd]), 'tensor')}"
                         for wd in sorted(decays, reverse=True))
        + (f"  [{'; '.join(no_decay)}]" if no_decay else ""),
    ])


def _memory(memory: Mapping[str, Any] | None) -> str:
    if not memory:
        return ""
    line = (f"Training memory (fp32 params + grads + optimizer state): "
            f"{_size(memory['plan_bytes'])} for this plan, "
            f"{_size(memory['full_finetune_bytes'])} for full fine-tuning")
    bf16 = memory.get("bf16")
    if bf16:
        line += (f"\n  in bf16 (weights, grads and optimizer state): "
                 f"{_size(bf16['plan_bytes'])} for this plan, "
                 f"{_size(bf16['full_finetune_bytes'])} for full fine-tuning "
                 "(activations not included)")
    return line


def _size(n_bytes: int) -> str:
    """MiB below 10 GiB (as before), GiB above: which GPU a plan fits on, at a glance."""
    gib = n_bytes / 2**30
    return f"{gib:,.1f} GiB" if gib >= 10 else f"{n_bytes / 2**20:,.1f} MiB"


def _phases(document: Mapping[str, Any]) -> str:
    """The phase table of gradual unfreezing: when each phase starts and what trains then."""
    schedule = document.get("schedule") or []
    if not schedule:
        return ""
    mib = 1024 * 1024
    rows = [("0", "start", document["counts"], document["memory"], len(document["groups"]))]
    rows += [(str(p["phase"]), " ".join(f"{k} {v}" for k, v in p["at"].items()), p["counts"],
              p["memory"], len(p["groups"])) for p in schedule]
    lines = [f"Phases ({len(rows)}; freeze.schedule)",
             f"{'Phase':<6} {'Starts at':<12} {'Trainable':>13} {'Share':>8} "
             f"{'New groups':>10}  Training memory"]
    for phase, at, counts, memory, groups in rows:
        lines.append(f"{phase:<6} {at:<12} {counts['trainable']:>13,} "
                     f"{share(counts['trainable'], counts['total']):>8} {groups:>10}  "
                     f"{memory['plan_bytes'] / mib:,.1f} MiB")
    return "\n".join(lines)


def _verified(verified: Mapping[str, Any] | None) -> str:
    if not verified or not verified.get("backward"):
        reason = (verified or {}).get("reason", "not requested")
        return f"Verified: no backward pass ({reason})"
    status = "OK" if verified["ok"] else "FAILED"
    phase = f" (last phase, {verified['phase']})" if "phase" in verified else ""
    lines = [f"Verified{phase}: one forward/backward/optimizer step on a random batch "
             f"{verified['input']}: {status}"]
    labels = {**FAILURES, "trainable_unchanged": "trainable parameters the step did not change"}
    for key, label in labels.items():
        if verified.get(key):
            lines.append(f"  {label}: {', '.join(verified[key][:8])}"
                         + (" ..." if len(verified[key]) > 8 else ""))
    if verified["ok"]:
        lines.append("  frozen: no gradient, unchanged; trainable: all got a gradient")
    return "\n".join(lines)
