"""freeze.rules_file: freeze rules read from a YAML file of their own.

Hydra composes inline rules (freeze.rules) at about 1-2 ms a rule (PyYAML's Python loader,
OmegaConf nodes, deepcopies and merges), so thousands of generated rules go into a file that is
read here in plain Python with libyaml (`yaml.CSafeLoader`, else `yaml.SafeLoader`), never
through OmegaConf. The file holds the list alone, in the form of freeze.rules:

    - freeze: "*"
    - unfreeze: "layer4"

and its rules are checked by the code that checks freeze.rules (config.rule_list,
plan.rules.parse_rules), with the file's name and the rule's index in place of
`freeze.rules[i]`. It is untrusted input: read through checkpoint.integrity.read_regular (a FIFO
is refused rather than waited on, the size is bounded). A relative path is taken from the folder
the run started in, as checkpoint.path is (the CLI never changes folder). The plan's provenance
records the file's absolute path, its sha256 and the number of rules (`record`), so a changed
file shows; the composed config keeps only the path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from finetune_prep.checkpoint import integrity
from finetune_prep.config import FreezeConfig, rule_list
from finetune_prep.errors import FinetunePrepError
from finetune_prep.plan.rules import Rule, parse_rules

KEY = "freeze.rules_file"
# bytes of a rules file: about 2 million rules of 30 characters, 20x the largest rule set
# planned (100,000); a larger file is not a rule list, and libyaml would take minutes on it
MAX_BYTES = 64 << 20
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it
FORM = '- freeze: "PATTERN" / - unfreeze: "PATTERN", one rule a line'


@dataclass(frozen=True)
class RulesFile:
    """A rules file as read: what the provenance records."""

    path: str  # absolute
    sha256: str  # of the file's bytes
    rules: int  # how many it holds

    def record(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "rules": self.rules}


def freeze_rules(freeze: FreezeConfig) -> tuple[list[Rule], RulesFile | None]:
    """Phase 0's rules: freeze.rules, or those of freeze.rules_file (config.validate has made
    sure not both are set) with the file as read."""
    if freeze.rules_file is None:
        return parse_rules(freeze.rules), None
    return read(freeze.rules_file)


def read(given: str | os.PathLike) -> tuple[list[Rule], RulesFile]:
    """The rules of the file `given` (as the config names it), checked; one clear error naming
    freeze.rules_file for a missing or special file, a YAML error, or a top level that is not
    a list."""
    shown = os.fspath(given)
    file = os.path.abspath(os.path.expanduser(shown))
    try:
        data = integrity.read_regular(file, MAX_BYTES, shown, KEY)
    except FileNotFoundError as err:
        raise FinetunePrepError(
            f"{KEY}={shown} does not exist (looked for {file}; a relative path is taken from the "
            "folder you ran from).") from err
    except PermissionError as err:
        raise FinetunePrepError(f"{KEY}={shown} cannot be read (permission denied).") from err
    except OSError as err:
        raise FinetunePrepError(f"{KEY}={shown} cannot be read ({err.strerror or err}).") from err
    items = parse(data, shown)
    rules = parse_rules(rule_list(items, shown), shown)
    return rules, RulesFile(file, hashlib.sha256(data).hexdigest(), len(rules))


def parse(data: bytes, shown: str) -> list[Any]:
    """The file's list of rule items (their shape is checked by the caller)."""
    try:
        items = yaml.load(data, Loader=LOADER)  # a safe loader: plain data only
    except yaml.YAMLError as err:
        raise FinetunePrepError(f"{KEY}={shown} is not valid YAML: {_yaml_problem(err)}. "
                                f"It holds a list of rules: {FORM}.") from None
    if isinstance(items, list):
        return items
    if items is None:
        raise FinetunePrepError(f"{KEY}={shown} is empty: it holds a list of rules ({FORM}); "
                                "write [] for none.")
    if isinstance(items, Mapping) and "rules" in items:
        raise FinetunePrepError(
            f"{KEY}={shown} holds a mapping with a rules key (the form of a freeze preset); a "
            f"rules file holds the list alone: drop the `rules:` line, {FORM}.")
    raise FinetunePrepError(f"{KEY}={shown} holds {_kind(items)}, not a list of rules: {FORM}.")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """libyaml's message with its line and column (1-based), without the stream's name."""
    if isinstance(err, yaml.reader.ReaderError):  # not text: bad UTF-8, control characters
        char = err.character
        shown = f"0x{char:02x}" if isinstance(char, int) else repr(char)
        return f"{err.reason} ({shown} at byte {err.position})"
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if not problem:
        return str(err).strip()
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    return (f"{context}{_at(start)}, " if context else "") + f"{problem}{_at(mark)}"


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, str):
        return f"the text {value[:60]!r}"
    return f"a {type(value).__name__} ({value!r:.60})"
