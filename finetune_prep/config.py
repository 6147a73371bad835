"""The config schema (dataclasses), its registration with Hydra, and composing it from Python.

The YAML files in finetune_prep/conf/ document every key; this module fixes their types and
defaults. A library registers its schemas and leaves the app to call it (Hydra's structured
config tutorial): `register_configs()` stores them under `finetune_prep/schema`, and
`import finetune_prep` calls it, so Hydra's own compose API works without the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune_prep.errors import FinetunePrepError, did_you_mean

_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"  # where a wheel ships conf/
# the packaged presets: inside the package when installed from a wheel, else conf/ at the top of
# the repository (a checkout or an editable install)
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else _PACKAGED_CONF.parent.parent / "conf"
SCHEMA_GROUP = "finetune_prep/schema"
PROVIDER = "finetune_prep"
# free-form by design
OPEN_KEYS = ("model.kwargs", "model.target", "optim.optimizer", "adapter.options")
PRESET_GROUPS = ("model", "freeze", "optim", "adapter", "sweep")  # the packaged config groups
DEFAULT_GROUPS = PRESET_GROUPS[:4]  # chosen by config.yaml's defaults (a rerun replaces them)
PRIMARY = "config"  # the packaged primary config's name
RERUN_GROUP = "finetune_prep/rerun"  # where a run's own config.yaml is stored to compose it again


class ModelSource(str, Enum):
    """Where model.arch is looked up."""

    torchvision = "torchvision"
    timm = "timm"
    target = "target"
    hf = "hf"


class BnStats(str, Enum):
    """What frozen BatchNorm layers do with their running statistics in train mode."""

    eval = "eval"
    train = "train"


class HeadMode(str, Enum):
    """What happens to the model's head: a fresh one, the model's own, or none."""

    replace = "replace"
    keep = "keep"
    none = "none"


class FreezeStart(str, Enum):
    """Where the freeze rules start: every parameter trainable, or the constructor's state."""

    all = "all"
    model = "model"


class Section:
    """`.get(key, default)` on a typed section, as on the DictConfig the model builders also
    accept (a test or a notebook may hand them either)."""

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


@dataclass
class ModelConfig(Section):
    source: ModelSource = ModelSource.torchvision
    arch: str = "resnet18"
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Any | None = None
    stages: list[Any] | None = None
    input_size: list[int] | None = None
    hf_class: str = "AutoModelForImageClassification"


@dataclass
class HeadConfig(Section):
    num_outputs: int | None = 1
    module: str | None = None
    mode: HeadMode = HeadMode.replace


@dataclass
class CheckpointConfig(Section):
    path: str | None = None
    strict: bool = True
    key: str | None = None
    prefix: str | None = None
    exclude_head: bool = False


@dataclass
class PhaseConfig(Section):
    at: dict[str, int] = field(default_factory=dict)
    rules: list[dict[str, str]] = field(default_factory=list)
    each_stage: bool = False
    every: int = 1
    lr: float | None = None
    lr_mult: float | None = None
    weight_decay: float | None = None


@dataclass
class FreezeConfig(Section):
    rules: list[dict[str, str]] = field(default_factory=list)
    rules_file: str | None = None  # the rules in a YAML file of their own (app.rulesfile)
    bn_stats: BnStats = BnStats.eval
    start: FreezeStart = FreezeStart.all
    schedule: list[PhaseConfig] = field(default_factory=list)


@dataclass
class GroupRule(Section):
    match: str = "???"
    lr_mult: float = 1.0
    wd_mult: float = 1.0
    name: str | None = None


@dataclass
class OptimConfig(Section):
    lr: float = 1e-3
    weight_decay: float = 0.05
    no_decay: list[str] = field(
        default_factory=lambda: ["@bias", "@norm", "@ndim<=1", "@no_weight_decay"])
    groups: list[GroupRule] = field(default_factory=list)
    layer_decay: float | None = None
    layer_decay_granularity: str = "block"
    optimizer: dict[str, Any] = field(default_factory=lambda: {"_target_": "torch.optim.AdamW"})


class AdapterMethod(str, Enum):
    """The PEFT method peft builds on the model (none: plain fine-tuning)."""

    none = "none"
    lora = "lora"
    ia3 = "ia3"
    loha = "loha"


@dataclass
class AdapterConfig(Section):
    method: AdapterMethod = AdapterMethod.none
    target_modules: list[str] = field(default_factory=list)
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    bias: str | None = None
    modules_to_save: list[str] | None = None
    feedforward_modules: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    resume: str | None = None


@dataclass
class ReportConfig(Section):
    grouped: bool = True


@dataclass
class VerifyConfig(Section):
    backward: bool | None = None
    max_params: int = 100_000_000
    batch_size: int = 2
    seed: int = 0


@dataclass
class Config(Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)


# Rule lists: each item would be an OmegaConf node merged and validated one by one (about 2 ms
# a rule), so Hydra's schema types them Any and `validate` checks them once in plain Python.
RULE_LISTS = ("freeze.rules", "freeze.schedule", "optim.groups", "optim.no_decay")
LIST_ITEMS = {"optim.groups": GroupRule, "freeze.schedule": PhaseConfig}  # item schemas
CHECKED_HERE = ("freeze.rules", "optim.groups", "optim.no_decay")  # validate checks them itself
# (freeze.schedule is checked by the schema's merge)


@functools.cache
def loose_schema(schema: type, path: str = "") -> type:
    """`schema` with the RULE_LISTS fields typed Any: what Hydra composes onto (scalars keep
    their types, so a wrong value still fails at start-up). One class per section (cached), so
    a preset's `/finetune_prep/schema/freeze@_here_` merges onto the same class."""
    hints = typing.get_type_hints(schema)
    fields = []
    for f in dataclasses.fields(schema):
        key, hint = f"{path}{f.name}", hints[f.name]
        default: dict[str, Any] = ({"default": f.default} if f.default is not dataclasses.MISSING
                                   else {"default_factory": f.default_factory})
        if key in RULE_LISTS:
            hint = Any
        elif dataclasses.is_dataclass(hint):
            hint = loose_schema(hint, f"{key}.")
            default = {"default_factory": hint}
        fields.append((f.name, hint, field(**default)))
    loose = dataclasses.make_dataclass(schema.__name__, fields)
    _STRICT[loose] = schema
    return loose


_STRICT: dict[type, type] = {}  # loose_schema class -> the schema it loosens


def _strict(value: Any) -> Any:
    """An instance of a loose_schema class as one of the schema it loosens (fields alike)."""
    schema = _STRICT.get(type(value))
    if schema is None:
        return value
    return schema(**{f.name: _strict(getattr(value, f.name)) for f in dataclasses.fields(value)})


def _stored(store: ConfigStore, name: str) -> bool:
    """Whether register_configs already stored schema `name` (a test may clear the store)."""
    group: Any = store.repo
    for part in SCHEMA_GROUP.split("/"):
        group = group.get(part, {}) if isinstance(group, dict) else {}
    found = group.get(f"{name}.yaml") if isinstance(group, dict) else None
    return getattr(found, "provider", None) == PROVIDER


SCHEMAS = {"config": Config, "model": ModelConfig, "head": HeadConfig,
           "checkpoint": CheckpointConfig, "freeze": FreezeConfig, "optim": OptimConfig,
           "adapter": AdapterConfig}


def register_configs() -> None:
    """Store the schemas as `finetune_prep/schema/NAME` (e.g. `/finetune_prep/schema/freeze@_here_`
    at the top of a preset's defaults list), rule lists loose (`loose_schema`). Idempotent: a
    schema already stored by this function is not stored again (12 ms each time)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        if _stored(store, name):
            continue
        prefix = "" if name == "config" else f"{name}."
        store.store(group=SCHEMA_GROUP, name=name, node=loose_schema(node, prefix),
                    provider=PROVIDER)


@dataclass(frozen=True)
class Origin:
    """Where a composed config came from: what `prepare` records as its provenance."""

    overrides: tuple[str, ...]  # the user's overrides, as given
    config_dirs: tuple[str, ...]  # the config folders searched, the packaged one first
    rerun: str | None = None  # a run's own config file composed again (see rerun_overrides)


_ORIGINS: dict[int, tuple[weakref.ref, Origin]] = {}


def remember_origin(cfg: DictConfig, origin: Origin) -> None:
    """Attach `origin` to the config object (for as long as it lives; copies do not keep it)."""
    key = id(cfg)
    _ORIGINS[key] = (weakref.ref(cfg, lambda _: _ORIGINS.pop(key, None)), origin)


def origin_of(cfg: Any) -> Origin | None:
    """The Origin `compose()` recorded for this very config object, else None."""
    found = _ORIGINS.get(id(cfg))
    return found[1] if found and found[0]() is cfg else None


def shadowed_presets(user_dirs: Sequence[str | Path]) -> list[str]:
    """User preset files with the name of a packaged preset. Hydra searches the packaged
    conf/ first, so such a file would be silently ignored: one message per file."""
    found = []
    for folder in user_dirs:
        for group in PRESET_GROUPS:
            for path in sorted(Path(folder, group).glob("*.yaml")):
                if (CONF_DIR / group / path.name).is_file():
                    found.append(
                        f"{path} has the name of the packaged preset {group}={path.stem}, which "
                        f"Hydra reads instead of yours (the packaged conf/ is searched first). "
                        f"Rename it (e.g. {group}/my_{path.name}) and select it with "
                        f"{group}=my_{path.stem}.")
    return found


def check_user_dirs(user_dirs: Sequence[str | Path]) -> None:
    """Refuse user config folders whose presets would be silently shadowed by packaged ones."""
    found = shadowed_presets(user_dirs)
    if found:
        raise FinetunePrepError("\n".join(found))


def rerun_overrides(folder: str | Path, name: str, overrides: Sequence[str]) -> list[str]:
    """Overrides that compose a run's own config file FOLDER/NAME.yaml (e.g. a run's
    `.hydra/config.yaml`) on top of the packaged primary config, so Hydra's and finetune_prep's
    packaged settings (log name, lock, console, run folder) stay; [] when there is no such file.

    Hydra alone would take the packaged config.yaml (searched first) and silently drop the
    run's values; a file named otherwise would replace the packaged primary config, settings
    and all. The packaged presets are dropped (the run's file holds their values); a preset
    choice on the command line is refused, as the run's values would override it."""
    path = Path(folder, f"{name}.yaml")
    if not path.is_file():
        return []
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors and the like
        raise FinetunePrepError(f"{path}: not a readable config ({err}).") from err
    if not isinstance(node, DictConfig) or "defaults" in node or "hydra" in node:
        if name != PRIMARY:
            return []  # the user's own primary config: Hydra's behaviour
        raise FinetunePrepError(
            f"{path} has the name of the packaged primary config, which Hydra reads instead "
            "of yours. A run's .hydra/config.yaml is composed again as it is; a primary "
            "config of your own needs another name: --config-name NAME.")
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in DEFAULT_GROUPS]
    if chosen:
        raise FinetunePrepError(
            f"{chosen[0]}: a rerun of {path} keeps the run's own values, which would override "
            "the preset. Change single values instead (e.g. head.num_outputs=5), or choose "
            "the preset in a run of the packaged config (without --config-dir).")
    ConfigStore.instance().store(group=RERUN_GROUP, name=name, node=node, provider=PROVIDER)
    return [*(f"~{g}" for g in DEFAULT_GROUPS), f"+{RERUN_GROUP}@_global_={name}"]


def is_rerun_override(override: str) -> bool:
    """An override `rerun_overrides` added (kept out of the recorded provenance); a sweep
    job's overrides spell `~model` as `~model=null`."""
    deleted = override.removesuffix("=null")
    return deleted in {f"~{g}" for g in DEFAULT_GROUPS} or override.startswith(
        f"+{RERUN_GROUP}@_global_=")


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """The config the CLI gets for the same overrides (`--config-dir` = `config_dir`), with
    its origin (overrides, config folders) remembered for `prepare`'s provenance. A
    `config_dir` holding config.yaml (a run's `.hydra`) composes that run's config again.

    For notebooks and tests: `finetune_prep.prepare(finetune_prep.compose(["freeze=full"]))`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    given = [o for o in overrides if not o.startswith("hydra.searchpath=")]
    folders, extra, rerun = _user_folders(config_dir, overrides)
    previous = GlobalHydra.instance().is_initialized()
    if previous:
        raise FinetunePrepError(
            "finetune_prep.compose() cannot run inside another Hydra initialize() block; "
            "call hydra.compose(config_name='config', ...) there instead."
        )
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[*given, *extra])
    except FinetunePrepError:
        raise
    except Exception as err:  # Hydra's own config errors: a bad override, an unknown preset
        cause = str(err.__cause__ or "").strip().splitlines()
        detail = f": {cause[0]}" if cause else ""
        raise FinetunePrepError(f"invalid config: {err}{detail}") from err
    recorded = tuple(o for o in overrides if not o.startswith("hydra."))  # as the CLI's
    remember_origin(cfg, Origin(recorded, (str(CONF_DIR), *map(str, folders)), rerun))
    return cfg


def _user_folders(config_dir: str | Path | None, overrides: Sequence[str]
                  ) -> tuple[list[Path], list[str], str | None]:
    """compose()'s user folders (config_dir first, then hydra.searchpath ones, the order
    the CLI searches them), checked; the overrides that add them (one hydra.searchpath); the
    rerun config file."""
    folders, extra, rerun = [], [], None
    if config_dir is not None:
        folder = Path(config_dir).expanduser().resolve()
        if not folder.is_dir():
            raise FinetunePrepError(f"config_dir={config_dir} is not a folder.")
        folders.append(folder)
        extra = rerun_overrides(
            folder, PRIMARY, [o for o in overrides if not o.startswith("hydra.searchpath=")])
        rerun = str(folder / f"{PRIMARY}.yaml") if extra else None
    folders += [p.expanduser().resolve() for p in searchpath_dirs(overrides)]
    check_user_dirs(folders)
    packages = [e for e in searchpath_entries(overrides) if e.startswith("pkg://")]
    entries = [*(f"file://{f}" for f in folders), *packages]
    if entries:
        extra.append(f"hydra.searchpath=[{','.join(entries)}]")
    return folders, extra, rerun


def searchpath_entries(overrides: Sequence[str]) -> list[str]:
    """The entries of a `hydra.searchpath=[...]` override, as given."""
    found = []
    for arg in overrides:
        if arg.startswith("hydra.searchpath="):
            items = (i.strip().strip("'\"") for i in arg.split("=", 1)[1].strip("[]").split(","))
            found += [i for i in items if i]
    return found


def searchpath_dirs(overrides: Sequence[str]) -> list[Path]:
    """The folders of a `hydra.searchpath=[...]` override (file:// or plain paths; pkg://
    entries are packages, not folders, and are left out)."""
    return [Path(i.replace("file://", "", 1)) for i in searchpath_entries(overrides)
            if "://" not in i.replace("file://", "", 1)]


def validate(cfg: Any) -> Config:
    """The typed Config of a DictConfig, plain dict or Config; one clear error for an unknown
    key (also one added with `+`), a wrong type, a required value left as ??? or a number out of
    range.
    Rule lists (freeze.rules, optim.groups, optim.no_decay) are checked in plain Python, the rest
    by OmegaConf against the schema."""
    plain = _plain(cfg)
    unknown = unknown_keys(plain, Config)
    if unknown:
        raise FinetunePrepError("\n".join(unknown))
    missing = _left_missing(plain)
    if missing:
        raise FinetunePrepError(
            f"{missing[0]} is ??? (a value still to be set): give it on the command line "
            f"({missing[0]}=VALUE) or in a preset." + (f" Also ??? : {', '.join(missing[1:])}."
                                                       if missing[1:] else ""))
    lists = {key: plain[section].pop(name) for key in CHECKED_HERE
             for section, name in [key.split(".")]
             if isinstance(plain.get(section), Mapping) and name in plain[section]}
    typed = _composed(cfg, plain)
    if typed is None:
        try:
            typed = OmegaConf.to_object(OmegaConf.merge(_schema(), plain))  # merge copies
        except OmegaConfBaseException as err:
            raise FinetunePrepError(f"invalid config: {err}") from err
    if "freeze.rules" in lists:
        typed.freeze.rules = rule_list(lists["freeze.rules"], "freeze.rules")
    _check_rules_file(typed.freeze, cfg)
    if "optim.groups" in lists:
        typed.optim.groups = group_rules(lists["optim.groups"])
    if "optim.no_decay" in lists:
        typed.optim.no_decay = patterns(lists["optim.no_decay"], "optim.no_decay")
    _check_ranges(typed)
    return typed


def _left_missing(value: Any, path: str = "") -> list[str]:
    """The keys whose value is OmegaConf's ??? (merged into the schema, ??? would silently
    become the schema's default), freeze.schedule's items included; the other rule lists
    check their own items."""
    if path in OPEN_KEYS or path in CHECKED_HERE:
        return []
    if isinstance(value, Mapping):
        return [m for k, v in value.items() for m in _left_missing(v, f"{path}.{k}".lstrip("."))]
    if isinstance(value, list):
        return [m for i, v in enumerate(value) for m in _left_missing(v, f"{path}[{i}]")]
    return [path] if value == "???" else []


def _composed(cfg: Any, plain: Mapping[str, Any]) -> Config | None:
    """The typed config of one Hydra composed onto the loose schema, which checked every
    scalar there (15 ms less than merging it into the schema again); None for anything else,
    and for a freeze.schedule, whose items only the schema's merge checks."""
    if not OmegaConf.is_config(cfg) or _STRICT.get(OmegaConf.get_type(cfg)) is not Config:
        return None
    if (plain.get("freeze") or {}).get("schedule", []) != []:
        return None  # anything but the default: typed and checked by the schema's merge
    try:
        return _strict(OmegaConf.to_object(cfg))
    except OmegaConfBaseException:
        return None  # the schema's merge says what is wrong


@functools.cache
def _schema() -> DictConfig:
    """The schema as an OmegaConf node, made once (OmegaConf.merge never changes its first
    argument)."""
    return OmegaConf.structured(Config)


def _check_rules_file(freeze: FreezeConfig, cfg: Any) -> None:
    """freeze.rules_file is null or a path, and the rules come from one place: the file (read
    by app.rulesfile) or freeze.rules, never both (which would win is nowhere obvious)."""
    given = freeze.rules_file
    if given is None:
        return
    if not given.strip():
        raise FinetunePrepError(
            "freeze.rules_file is empty: give the YAML file that holds the rules, or null to use "
            "freeze.rules.")
    if not freeze.rules:
        return
    count = len(freeze.rules)
    raise FinetunePrepError(
        f"freeze.rules_file={given} and freeze.rules ({count} rule{'s' * (count != 1)}, set by "
        f"{_rules_source(cfg)}) are both set; the rules come from one place. Either put "
        f"`rules_file: {given}` into a freeze preset of your own (DIR/freeze/NAME.yaml; choosing "
        "it with --config-dir DIR freeze=NAME replaces the preset's rules), or clear the rules "
        f"beside it: freeze.rules=[] freeze.rules_file={given}.")


def _rules_source(cfg: Any) -> str:
    """What set freeze.rules, in words: an override of freeze.rules, else the freeze preset
    (Hydra's choice in a CLI job, or the last freeze=NAME compose() recorded)."""
    origin = origin_of(cfg)
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        overrides, preset = list(hc.overrides.task), hc.runtime.choices.get("freeze")
    elif origin is not None and not origin.rerun:
        overrides, preset = list(origin.overrides), "head_only"  # config.yaml's default
    else:
        return "a freeze preset or an override"
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key == "freeze.rules" or key.startswith("freeze.rules."):
            return f"the override {override}"
        if key == "freeze" and value:
            preset = value
    return f"the freeze preset {preset}" if preset else "a freeze preset or an override"


def _plain(cfg: Any) -> dict[str, Any]:
    """cfg as plain containers, interpolations resolved; each section a fresh dict (validate
    takes the rule lists out of it, never out of the caller's dict)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else \
            to_plain(cfg) if isinstance(cfg, Config) else cfg
    except OmegaConfBaseException as err:
        raise FinetunePrepError(f"invalid config: {err}") from err
    if not isinstance(plain, Mapping):
        raise FinetunePrepError(f"the config is a {type(cfg).__name__}, not a mapping.")
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in plain.items()}


RULE_FORM = "{freeze: PATTERN} or {unfreeze: PATTERN}"


def _seq(value: Any, where: str, form: str) -> Sequence[Any]:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise FinetunePrepError(f"{where}={value!r}: must be a list of {form}.")
    return value


def pattern_text(value: Any, where: str) -> str:
    """A pattern as text: a number or bool becomes its text, as the typed schema made it; a
    list, mapping or null is an error."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (Mapping, Sequence)):
        raise FinetunePrepError(f"{where}={value!r}: a pattern is one string (a name, glob, "
                                "re:REGEX or @alias).")
    return str(value)


def patterns(value: Any, where: str) -> list[str]:
    """A list of patterns (optim.no_decay)."""
    return [pattern_text(v, f"{where}[{i}]") for i, v in enumerate(_seq(value, where, "patterns"))]


def rule_list(value: Any, where: str) -> list[Any]:
    """A list of rules with their patterns as text; the shape of each item (one key, freeze or
    unfreeze) is checked by plan.rules.parse_rules, which names the rule."""
    items = []
    for i, item in enumerate(_seq(value, where, RULE_FORM)):
        if isinstance(item, Mapping):
            item = {k: pattern_text(v, f"{where}[{i}].{k}") for k, v in item.items()}
        items.append(item)
    return items


def group_rules(value: Any) -> list[GroupRule]:
    """optim.groups as GroupRule items: match required, the numbers checked by check_optim."""
    rules = []
    form = "{match: PATTERN, lr_mult: x, wd_mult: y, name: optional}"
    for i, item in enumerate(_seq(value, "optim.groups", form)):
        where = f"optim.groups[{i}]"
        if isinstance(item, GroupRule):
            rules.append(item)
            continue
        if not isinstance(item, Mapping):
            raise FinetunePrepError(f"{where}={item!r}: a group rule is a mapping {form}.")
        if item.get("match") in (None, "???"):
            raise FinetunePrepError(f"{where}.match is missing: every group rule names the "
                                    f"parameters it sets, {form}.")
        name = item.get("name")
        rules.append(GroupRule(
            match=pattern_text(item["match"], f"{where}.match"),
            lr_mult=_number(item.get("lr_mult", 1.0)), wd_mult=_number(item.get("wd_mult", 1.0)),
            name=None if name is None else pattern_text(name, f"{where}.name")))
    return rules


def _number(value: Any) -> Any:
    """An int as a float, as the schema's float field made it; other values as they are (the
    range checks name the key)."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


# Bounds of the numbers a plan writes or uses. Learning rates and weight decays are applied in
# float32 (or narrower) arithmetic: below the smallest normal float32 an lr is zero or subnormal
# (no update survives), above the largest it is inf.
F32_TINY = 1.1754943508222875e-38  # numpy.finfo(numpy.float32).tiny
F32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
MAX_OUTPUTS = 10**12  # head.num_outputs: far above any classifier, far below int64 overflow
MAX_BATCH = 4096  # verify.batch_size: the proof needs one small batch (2 covers BatchNorm)
MAX_DIM = 2**20  # each model.input_size entry
MAX_SAMPLE = 2**31 - 1  # elements of one input sample (C*H*W)
MAX_RANK = 4  # model.input_size entries: [C, H, W] for images, [C, T, H, W] for video
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
MAX_COUNT = 2**53  # epochs/steps of a schedule: exact in every JSON reader (a double)
IMAGE_SOURCES = ("torchvision", "timm")  # their models take [C, H, W]


def check_number(key: str, value: Any, ok: Callable[[float], bool], bound: str,
                 fix: str = "") -> None:
    """A finite number for which `ok` holds, else one error: `KEY=VALUE: must be a finite
    number BOUND; FIX.`"""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok(value)):
        raise FinetunePrepError(f"{key}={value}: must be a finite number {bound}"
                                f"{'; ' + fix if fix else ''}.")


LR_BOUND = "> 0 that float32 can apply (1.2e-38 .. 3.4e38)"
LR_FIX = ("below 1.2e-38, the smallest normal float32, every update underflows to zero and "
          "nothing trains; above 3.4e38 it is inf (a usual lr is 1e-5 .. 1e-1)")


def check_lr(key: str, value: Any) -> None:
    """A learning rate float32 arithmetic can apply: a normal float32 (so > 0)."""
    check_number(key, value, lambda x: F32_TINY <= x <= F32_MAX, LR_BOUND, LR_FIX)


def check_int(key: str, value: Any, low: int, high: int, fix: str = "") -> None:
    """A whole number in [low, high], else one error: `KEY=VALUE: must be a whole number
    >= LOW and <= HIGH; FIX.`"""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FinetunePrepError(f"{key}={value}: must be a whole number >= {low} and <= "
                                f"{high:,}{'; ' + fix if fix else ''}.")


def to_plain(value: Any) -> Any:
    """A typed config (or any part) as plain dicts, lists and scalars, enums as their values."""
    if isinstance(value, (str, int, float, type(None))):  # enums are str: value below
        return value.value if isinstance(value, Enum) else value
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Section):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if OmegaConf.is_config(value):
        return to_plain(OmegaConf.to_container(value, resolve=True))
    return value.value if isinstance(value, Enum) else value


def config_text(cfg: Any) -> str:
    """The config as canonical JSON text in schema order (what provenance hashes): C-speed, so a
    config with 100,000 rules costs a fraction of a second (a YAML dump costs seconds)."""
    return json.dumps(to_plain(cfg), ensure_ascii=False, separators=(",", ":"))


def _check_ranges(cfg: Config) -> None:
    """Every number and size of the schema that the types allow but no run can use (the keys
    that name patterns, modules or files are checked where they are resolved)."""
    _check_verify(cfg.verify)
    n = cfg.head.num_outputs
    if n is None and cfg.head.mode == HeadMode.replace:
        raise FinetunePrepError(
            "head.num_outputs=null with head.mode=replace: a fresh head needs a size. Set "
            "head.num_outputs to the number of classes, or head.mode=keep to keep the model's own.")
    if n is not None and not 1 <= n <= MAX_OUTPUTS:
        raise FinetunePrepError(
            f"head.num_outputs={n}: a head needs at least one output and at most "
            f"{MAX_OUTPUTS:,}. Set head.num_outputs to the number of classes (1 for a binary "
            "logit).")
    _check_input_size(cfg.model)
    check_optim(cfg.optim)
    for i, phase in enumerate(cfg.freeze.schedule):
        _check_phase(phase, f"freeze.schedule[{i}]")
    _check_adapter(cfg.adapter)


def _check_adapter(adapter: AdapterConfig) -> None:
    """The adapter's numbers (null = the preset's or peft's default)."""
    if adapter.r is not None:
        check_int("adapter.r", adapter.r, 1, 2**20, "the rank of the update matrices (4 .. 64)")
    if adapter.alpha is not None:
        check_number("adapter.alpha", adapter.alpha, lambda v: v > 0, "> 0")
    if adapter.dropout is not None:
        check_number("adapter.dropout", adapter.dropout, lambda v: 0 <= v < 1, "in [0, 1)")


def _check_verify(v: VerifyConfig) -> None:
    if not 1 <= v.batch_size <= MAX_BATCH:
        raise FinetunePrepError(
            f"verify.batch_size={v.batch_size}: the proof needs a batch of at least 1 (2 or "
            f"more for BatchNorm in train mode) and at most {MAX_BATCH:,}; 2 is enough.")
    check_int("verify.max_params", v.max_params, 0, 2**63 - 1,
              "models with more parameters skip the proof")
    check_int("verify.seed", v.seed, 0, MAX_SEED, "the random seed of the proof's batch")


def _check_input_size(model: ModelConfig) -> None:
    size = model.input_size
    if size is None:
        return
    size = list(size)
    source = str(getattr(model.source, "value", model.source))
    ranks = (3,) if source in IMAGE_SOURCES else tuple(range(1, MAX_RANK + 1))
    shape = "[C, H, W]" if ranks == (3,) else f"1 to {MAX_RANK} sizes ([C, H, W] for an image)"
    fix = (f"give {shape} with every size >= 1 and <= {MAX_DIM:,} (e.g. [3, 224, 224]), "
           "or null for the model's own")
    if len(size) not in ranks or any(isinstance(d, bool) or not isinstance(d, int)
                                     or not 1 <= d <= MAX_DIM for d in size):
        raise FinetunePrepError(f"model.input_size={size}: {fix}.")
    if math.prod(size) > MAX_SAMPLE:
        raise FinetunePrepError(f"model.input_size={size}: {math.prod(size):,} elements per "
                                f"sample, more than {MAX_SAMPLE:,}; {fix}.")


def check_optim(optim: Any) -> None:
    """optim's own numbers (groups.build_groups checks what each group ends up with); optim a
    typed OptimConfig or a DictConfig section."""
    check_lr("optim.lr", optim.lr)
    check_number("optim.weight_decay", optim.weight_decay, lambda x: 0 <= x <= F32_MAX,
                 f">= 0 and <= {F32_MAX:.1e} (e.g. 0.05)")
    if optim.layer_decay is not None:
        check_number("optim.layer_decay", optim.layer_decay, lambda x: 0 < x <= 1,
                     "in (0, 1] (e.g. 0.75), or null")
    for i, rule in enumerate(group_rules(optim.groups)):
        check_mult(f"optim.groups[{i}].lr_mult", rule.lr_mult)
        check_number(f"optim.groups[{i}].wd_mult", rule.wd_mult, lambda x: 0 <= x <= F32_MAX,
                     f">= 0 and <= {F32_MAX:.1e}")


def check_mult(key: str, value: Any) -> None:
    """An lr multiplier: > 0 (lr 0 would keep a 'trainable' parameter still) and finite in
    float32."""
    zero = isinstance(value, (int, float)) and value <= 0
    check_number(key, value, lambda x: 0 < x <= F32_MAX, f"> 0 and <= {F32_MAX:.1e}",
                 "a trainable parameter at lr 0 never moves, yet counts as trainable: freeze "
                 "it instead ({freeze: PATTERN})" if zero else "")


def _check_phase(phase: PhaseConfig, where: str) -> None:
    for unit, value in dict(phase.at or {}).items():
        check_int(f"{where}.at.{unit}", value, 1, MAX_COUNT,
                  "phase 0 (freeze.rules) is the start")
    check_int(f"{where}.every", phase.every, 1, MAX_COUNT)
    if phase.lr is not None:
        check_lr(f"{where}.lr", phase.lr)
    if phase.lr_mult is not None:
        check_mult(f"{where}.lr_mult", phase.lr_mult)
    if phase.weight_decay is not None:
        check_number(f"{where}.weight_decay", phase.weight_decay, lambda x: 0 <= x <= F32_MAX,
                     f">= 0 and <= {F32_MAX:.1e}")


def unknown_keys(given: Mapping, schema: type, where: str = "") -> list[str]:
    """Messages for keys of `given` that the dataclass `schema` does not have, with the close
    ones; nested sections and optim.groups items are checked too."""
    nested = _hints(schema)
    fields = nested
    found = []
    for key, value in given.items():
        path = f"{where}{key}"
        if path in OPEN_KEYS:
            continue
        if key not in fields:
            found.append(_unknown(path, [f"{where}{k}" for k in fields]))
        elif isinstance(value, Mapping) and dataclasses.is_dataclass(nested[key]):
            found += unknown_keys(value, nested[key], f"{path}.")
        elif isinstance(value, Sequence) and not isinstance(value, str) and (
                item := LIST_ITEMS.get(path) or _item_schema(nested[key])):
            found += [m for i, entry in enumerate(value) if isinstance(entry, Mapping)
                      for m in unknown_keys(entry, item, f"{path}[{i}].")]
    return found


@functools.cache
def _hints(schema: type) -> dict[str, Any]:
    """The resolved field types of a schema dataclass (looked up once: thousands of optim.groups
    items are checked against the same one)."""
    return typing.get_type_hints(schema)


def _item_schema(hint: Any) -> type | None:
    """The dataclass of a `list[Dataclass]` field (optim.groups, freeze.schedule), else None."""
    args = typing.get_args(hint)
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _unknown(path: str, options: list[str]) -> str:
    hint = did_you_mean(path, options, n=3, cutoff=0.6) or f" Keys here: {', '.join(options)}."
    return (f"{path} is not a config key of finetune_prep, so it would be ignored.{hint} "
            "A '+' in front of a key adds it, but finetune_prep does not read it.")
