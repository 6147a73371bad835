"""The pattern language and the ordered freeze/unfreeze evaluation.

A pattern selects parameters by name, anchored (never a bare substring):
- a glob over the full name or any enclosing module name: `layer4` covers `layer4.0.conv1.weight`,
  `*.bn1` covers `layer1.0.bn1.weight`, `*` covers everything;
- `re:REGEX`, matched with fullmatch against full parameter names, by RE2 (linear time whatever
  the pattern, so no backtracking blow-up; no backreferences or lookaround);
- an alias: `@head`, `@stage[i]`, `@stages[a:b]` (Python indexing, negatives too), `@norm`,
  `@bias`, `@ndim<=1`, `@no_weight_decay` (what the model itself excludes from weight decay:
  timm's `no_weight_decay()`, a torchvision ViT's class token and position embedding), `@all`.
A pattern that selects nothing is an error naming close matches: a typo must never freeze nothing.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.plan.table import ParamTable

ALIASES = ("@head", "@stage[i]", "@stages[a:b]", "@norm", "@bias", "@ndim<=1",
           "@no_weight_decay", "@all")
ACTIONS = ("freeze", "unfreeze")
_FORM = "{freeze: PATTERN} or {unfreeze: PATTERN}"
_STAGE = re.compile(r"@stage\[\s*(-?\d+)\s*\]")
_STAGES = re.compile(r"@stages\[\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?\]")


@dataclass(frozen=True)
class Rule:
    """One freeze/unfreeze step, with where it came from for messages."""

    action: str  # "freeze" or "unfreeze"
    pattern: str
    where: str  # e.g. "freeze.rules[1]"

    def __str__(self) -> str:
        return f"{self.where} {{{self.action}: {self.pattern}}}"


@dataclass(frozen=True)
class FreezePlan:
    """The outcome of the rules: who trains, and which rule decided it."""

    trainable: Mapping[str, bool]
    decided_by: Mapping[str, str | None]  # parameter -> the rule that set it last (None: default)
    shadowed: tuple[str, ...]  # rules whose every parameter a later rule overrides
    empty: tuple[str, ...] = ()  # alias rules that select nothing on this model


def match(pattern: str, table: ParamTable) -> list[str]:
    """Parameter names selected by `pattern`, in model order (possibly none)."""
    if pattern.startswith("@"):
        return _alias(pattern, table)
    if pattern.startswith("re:"):
        regex = _compile(pattern)
        return [n for n in table.names if regex.fullmatch(n)]
    check_glob(pattern)
    return [n for n in table.names if any(fnmatch.fnmatchcase(c, pattern) for c in _scopes(n))]


_SLICE_LIKE = re.compile(r"\[[^\]]*:[^\]]*\]")


def check_glob(pattern: str) -> None:
    """A glob `[...]` holding ':' looks like a slice (`layer[1:3]`) but matches ONE character
    from the brackets; no module or parameter name holds ':', so it is always a mistake (it
    would silently select layer1 and layer3 only)."""
    if m := _SLICE_LIKE.search(pattern):
        raise FinetunePrepError(
            f"{pattern!r}: {m.group()} is a glob character class (one character out of "
            f"{m.group()[1:-1]!r}), not a slice; names never hold ':'. To select stages by "
            "position write @stages[a:b]; to name modules list them (layer1, layer2) or use a "
            "class of single characters (layer[1-3]).")


def select(pattern: str, table: ParamTable, where: str) -> list[str]:
    """Like `match`, but a name, glob or regex that selects nothing is an error with suggestions.

    An alias may select nothing (a model without norm layers has no `@norm`): no typo there.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise FinetunePrepError(f"{where}: the pattern is empty; write a name, glob, re: or alias.")
    try:
        names = match(pattern, table)
    except FinetunePrepError as err:
        raise FinetunePrepError(f"{where}: {err}") from None
    if not names and not pattern.startswith("@"):
        raise FinetunePrepError(
            f"{where}: {pattern!r} matches no parameter.{_hint(pattern, table)}"
        )
    return names


def parse_rules(items: Sequence[Any], where: str = "freeze.rules") -> list[Rule]:
    """Check the shape of each rule item: a mapping with exactly one of freeze/unfreeze."""
    rules = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        keys = list(item.keys()) if isinstance(item, Mapping) else None
        if keys is None:
            raise FinetunePrepError(
                f"{at} is {item!r}; a rule is a mapping: {_FORM}."
            )
        if not keys:
            raise FinetunePrepError(f"{at} is empty; write {_FORM}.")
        if len(keys) > 1 or keys[0] not in ACTIONS:
            raise FinetunePrepError(
                f"{at} has keys {', '.join(map(str, keys))}; a rule has exactly one key, freeze or "
                "unfreeze. To do both, write two rules in the order they should apply."
            )
        rules.append(Rule(keys[0], item[keys[0]], at))
    return rules


def model_start(table: ParamTable) -> FreezePlan:
    """freeze.start=model: the state the model's constructor left (what it froze stays frozen
    until a rule unfreezes it)."""
    frozen = table.model_frozen
    return FreezePlan({n: n not in frozen for n in table.names},
                      {n: "the model's constructor" if n in frozen else None for n in table.names},
                      ())


def evaluate(
    rules: Sequence[Rule], table: ParamTable, start: FreezePlan | None = None
) -> FreezePlan:
    """Apply rules in order, to an all-trainable model or to the state `start` left; later
    rules win. All patterns are matched in one batch (`select_all`)."""
    trainable = dict(start.trainable) if start else dict.fromkeys(table.names, True)
    decided_by: dict[str, str | None] = (dict(start.decided_by) if start
                                         else dict.fromkeys(table.names))
    labels = [str(r) for r in rules]
    selections = select_all([r.pattern for r in rules], table, labels)
    for rule, label, names in zip(rules, labels, selections, strict=True):
        value = rule.action == "unfreeze"
        for name in names:
            trainable[name] = value
            decided_by[name] = label
    empty = tuple(label for label, names in zip(labels, selections, strict=True) if not names)
    return FreezePlan(trainable, decided_by, _shadowed(labels, selections), empty)


def select_all(patterns: Sequence[Any], table: ParamTable,
               wheres: Sequence[str]) -> list[list[str]]:
    """`select` for many patterns at once, same results and the same first error (in pattern
    order): names, globs and regexes run as RE2 sets over the parameter names (each name is
    read once per set, not once per pattern), aliases and repeated patterns are resolved once.
    Identical patterns share one list: do not change the lists in place."""
    for pattern, where in zip(patterns, wheres, strict=True):
        if not isinstance(pattern, str) or not pattern.strip():
            raise FinetunePrepError(
                f"{where}: the pattern is empty; write a name, glob, re: or alias.")
    found, errors = _match_batch(patterns, table)
    for pattern, where in zip(patterns, wheres, strict=True):
        if pattern in errors:
            raise FinetunePrepError(f"{where}: {errors[pattern]}") from None
        if not found[pattern] and not pattern.startswith("@"):
            raise FinetunePrepError(
                f"{where}: {pattern!r} matches no parameter.{_hint(pattern, table)}")
    return [found[p] for p in patterns]


def match_all(patterns: Sequence[str], table: ParamTable) -> list[list[str]]:
    """`match` for many patterns at once (possibly selecting none); the first malformed pattern
    raises `match`'s own error."""
    found, errors = _match_batch(patterns, table)
    for pattern in patterns:
        if pattern in errors:
            raise FinetunePrepError(errors[pattern])
    return [found[p] for p in patterns]


SET_CHUNK = 1000  # patterns per RE2 set: small enough that its DFA stays within max_mem


def _match_batch(patterns: Sequence[str], table: ParamTable
                 ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Pattern -> selected names (model order), and pattern -> error text for malformed ones.
    Aliases and globs with a [...] class take `match` (exact fnmatch semantics); plain globs and
    re: patterns are RE2 full-match sets: a glob G selects a name when the name is G, or G
    followed by '.' and more (G covers a module, so it covers what the module holds)."""
    found: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    batch: list[tuple[str, str]] = []  # (pattern, RE2 source)
    for pattern in dict.fromkeys(patterns):
        if pattern.startswith("re:"):
            batch.append((pattern, pattern[3:]))
        elif pattern.startswith("@") or "[" in pattern:
            try:
                found[pattern] = match(pattern, table)
            except FinetunePrepError as err:
                errors[pattern] = str(err)
        else:
            batch.append((pattern, _glob_source(pattern)))
    for start in range(0, len(batch), SET_CHUNK):
        _run_set(batch[start:start + SET_CHUNK], table, found, errors)
    return found, errors


def _run_set(chunk: Sequence[tuple[str, str]], table: ParamTable,
             found: dict[str, list[str]], errors: dict[str, str]) -> None:
    """Match one chunk of (pattern, RE2 source) against every name with one RE2 set."""
    rset = re2.Set.FullMatchSet(_SET_OPTIONS)
    index: dict[int, str] = {}
    for pattern, source in chunk:
        try:
            index[rset.Add(source)] = pattern
        except re2.error:
            try:
                _compile(pattern)  # raises the message that says why
            except FinetunePrepError as err:
                errors[pattern] = str(err)
    for pattern in index.values():
        found[pattern] = []
    if not index:
        return
    rset.Compile()
    for name in table.names:
        for i in rset.Match(name) or ():
            found[index[i]].append(name)


def _glob_source(pattern: str) -> str:
    """The RE2 source of a glob without [...]: `*` is any run (dots included), `?` one
    character, everything else literal; then an optional `.rest` for what a module holds."""
    parts = []
    for c in pattern:
        parts.append(".*" if c == "*" else "." if c == "?" else re2.escape(c))
    return f"(?s)(?:{''.join(parts)})(?:\\..*)?"


def _shadowed(labels: Sequence[str], selections: Sequence[list[str]]) -> tuple[str, ...]:
    later: set[str] = set()
    shadowed = []
    for label, names in zip(reversed(labels), reversed(selections), strict=True):
        if names and later.issuperset(names):
            shadowed.append(label)
        later.update(names)
    return tuple(reversed(shadowed))


def _scopes(name: str) -> list[str]:
    """The parameter name and every enclosing module name."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _compile(pattern: str) -> Any:
    """The RE2 program of a `re:` pattern: matching takes time linear in the name, whatever the
    pattern (Python's re backtracks: `(a+)+$` against a long name never returns)."""
    source = pattern[3:]
    try:
        return re2.compile(source, options=_RE2_OPTIONS)
    except re2.error as err:
        reason = err.args[0].decode(errors="replace") if err.args and isinstance(
            err.args[0], bytes) else str(err)
    try:
        re.compile(source)
    except re.error as err:
        raise FinetunePrepError(
            f"{pattern!r} is not a valid regular expression ({err}); fix it, or use a glob."
        ) from None
    raise FinetunePrepError(
        f"{pattern!r} is not supported by RE2, the engine of re: patterns ({reason}). RE2 "
        "matches in linear time whatever the pattern, but has no backreferences or lookaround, "
        r"no counted repeat above {1000}, and spells \Z as \z. Use a glob (e.g. 'layer4' or "
        "'*.bn1') or a simpler regex."
    )


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own parse error on stderr
    return options


_RE2_OPTIONS = _re2_options()
_SET_OPTIONS = _re2_options()
_SET_OPTIONS.max_mem = 256 << 20  # a set of SET_CHUNK patterns builds one DFA


def _alias(pattern: str, table: ParamTable) -> list[str]:
    simple = {
        "@all": lambda: list(table.names),
        "@head": table.head_params,
        "@norm": lambda: [n for n in table.names if table.owner[n] in table.norm_modules],
        "@bias": lambda: [n for n in table.names if n.rpartition(".")[2] == "bias"],
        "@ndim<=1": lambda: [n for n in table.names if len(table.shapes[n]) <= 1],
        "@no_weight_decay": lambda: [n for n in table.names if n in table.no_weight_decay],
    }
    if pattern == "@head" and not table.head:
        raise FinetunePrepError(
            "@head: this model has no head (head.mode=none), so @head would select nothing. "
            "Remove the rule (or choose a freeze preset without @head), or give the model a "
            "head with head.mode=replace or keep.")
    if pattern in simple:
        return simple[pattern]()
    if m := _STAGE.fullmatch(pattern):
        return table.stage_params(_stage_at(table, int(m.group(1)), pattern))
    if m := _STAGES.fullmatch(pattern):
        start, stop, step = (int(g) if g else None for g in m.groups())
        if step == 0:
            raise FinetunePrepError(
                f"{pattern}: a slice step of 0 selects no stage (Python's slice step is never 0). "
                "Write @stages[a:b] for stages a..b-1, or a step >= 1 (@stages[::2]) or < 0.")
        picked = range(len(table.stages))[slice(start, stop, step)]
        return [n for i in picked for n in table.stage_params(i)]
    raise FinetunePrepError(
        f"{pattern!r} is not an alias. Aliases: {', '.join(ALIASES)}."
        f"{did_you_mean(pattern, ALIASES, cutoff=0.5)}"
    )


def _stage_at(table: ParamTable, index: int, pattern: str) -> int:
    n = len(table.stages)
    if not -n <= index < n:
        listing = ", ".join(f"{i}: {table.stage_label(i)}" for i in range(n))
        raise FinetunePrepError(
            f"{pattern}: this model has {n} stages, so the index must be in {-n}..{n - 1}. "
            f"Stages: {listing}."
        )
    return index


def _hint(pattern: str, table: ParamTable) -> str:
    words = list(dict.fromkeys(s for n in table.names for s in _scopes(n)))
    close = did_you_mean(pattern.removeprefix("re:"), words, cutoff=0.5)
    tops = ", ".join(dict.fromkeys(n.split(".")[0] for n in table.names))
    return f"{close} Top-level modules: {tops}."


def frozen_stat_layers(table: ParamTable, trainable: Mapping[str, bool]) -> list[str]:
    """Layers with running statistics (BatchNorm and kin) none of whose parameters train."""
    owned: dict[str, list[str]] = {}
    for name in table.names:
        owned.setdefault(table.owner[name], []).append(name)
    return [m for m in table.module_types
            if m in table.stat_modules and owned.get(m)
            and not any(trainable[n] for n in owned[m])]
