"""The trust boundary of a plan file: all that reading a param_groups.json may make this process do.

People commit, share and download param_groups.json, so a plan file is untrusted input. It is
read as plain JSON (`json.loads`: never OmegaConf, never Hydra's `instantiate`, so no
interpolation is resolved and no `_target_` is called), and the only names in it that this
process ever looks up and calls are:

- the optimizer class: `torch.optim.<Name>`, a subclass of `torch.optim.Optimizer` found as an
  attribute of the already imported `torch.optim`; any other class only when the caller allows
  it (`build_optimizer(model, path, optimizers=[timm.optim.Lamb])`, or its dotted name), and
  only if the file's `_target_` names exactly that class;
- the model: an architecture name in the torchvision or timm registry, a Hugging Face model
  folder on this machine (never its remote code), or the `_target_` class the caller passes
  (`build_model(path, target=MyNet)`) when the file's `_target_` names exactly that class;
- the adapters: peft's LoraConfig, IA3Config or LoHaConfig, chosen by the block's `peft_type`
  out of `PEFT_TYPES`, with only the fields of `ADAPTER_FIELDS` taken from the file (each
  checked); every other field must hold the class's default.

Every other value the library uses (optimizer arguments, model kwargs, a target's arguments) must
be plain data: numbers, strings, bools, null, lists and objects with no Hydra key (`_target_`,
`_args_`, `_partial_`, ...) at any depth and no `${...}` interpolation. The user's own Hydra
config is trusted and is instantiated by `app.proof.optimizer_factory` (plan time); nothing read
from a file ever reaches that factory or `models._target`.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from finetune_prep.errors import FinetunePrepError

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW"}
HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
TARGET_TOP_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_"})  # Hydra's own
SOURCES = ("torchvision", "timm", "target", "hf")
# keyword arguments a file may not pass to a model builder: they make it read files, download
# or run code (beside the ones models.RESERVED_KWARGS keeps for the builder itself)
FILE_REFUSED_KWARGS = {
    "timm": ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
             "pretrained"),
    "hf": ("trust_remote_code", "auto_map", "cache_dir", "force_download", "resume_download",
           "proxies", "token", "use_auth_token", "revision", "code_revision", "subfolder",
           "local_files_only", "return_unused_kwargs", "num_labels"),
}
OptimizerSpec = type | str  # what a caller may allow: the class, or its dotted name


class Fields(dict):
    """A plain dict whose keys also read as attributes: what `models.build_model` reads off a
    config, without OmegaConf (so nothing in it is ever resolved or interpolated)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


# --------------------------------------------------------------------------- plain data


def data_problems(value: Any, where: str) -> list[str]:
    """Why `value`, read from a file, is not plain data: a Hydra key at any depth, or an
    interpolation string. Iterative, so any depth json.loads accepted is walked."""
    problems, todo = [], [(value, where)]
    while todo:
        item, at = todo.pop()
        if isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                if key in HYDRA_KEYS:
                    problems.append(f"{at}.{key} is a Hydra key inside what must be plain data "
                                    "(a plan file never instantiates anything)")
                else:
                    todo.append((sub, f"{at}.{key}"))
        elif isinstance(item, list):
            todo.extend((sub, f"{at}[{i}]") for i, sub in reversed(list(enumerate(item))))
        elif isinstance(item, str) and "${" in item:
            problems.append(f"{at} is {item!r}: an interpolation; a plan file is plain data "
                            "and is never resolved (write the value itself)")
    return problems


def optimizer_problems(spec: Any) -> list[str]:
    """What is wrong with a file's `optimizer` block as data (the class is checked when built)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("_target_"), str):
        return ["'optimizer' must be an object with a '_target_' string"]
    problems = data_problems(spec["_target_"], "optimizer._target_")
    for key, value in spec.items():
        if key != "_target_":
            problems += data_problems({key: value}, "optimizer")
    return problems


def model_problems(info: Any) -> list[str]:
    """The types of the `model` block's fields that `build_model` and the messages read."""
    if not isinstance(info, dict):
        return ["'model' must be an object"]
    problems = []

    def check(key: str, ok: Callable[[Any], bool], what: str) -> None:
        if key in info and not ok(info[key]):
            problems.append(f"model.{key} is {short(info[key])}; it must be {what}")

    check("source", lambda v: v in SOURCES, f"one of {', '.join(SOURCES)}")
    check("arch", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    check("num_outputs", lambda v: whole(v) and v >= 1, "a whole number >= 1")
    check("head", lambda v: v is None or isinstance(v, str), "a module name or null")
    check("heads", lambda v: strings(v), "a list of module names")
    check("head_mode", lambda v: v in ("replace", "keep", "none"), "replace, keep or none")
    check("stages", lambda v: v is None or isinstance(v, list) and all(
        isinstance(s, str) or strings(s) for s in v), "a list of lists of names, or null")
    check("kwargs", lambda v: v is None or isinstance(v, dict), "an object or null")
    check("target", lambda v: v is None or isinstance(v, dict) and isinstance(
        v.get("_target_"), str), "null or an object with a '_target_' string")
    check("input_size", lambda v: v is None or isinstance(v, list) and all(
        whole(x) and x >= 1 for x in v), "a list of whole numbers >= 1, or null")
    check("hf_class", lambda v: v is None or isinstance(v, str) and v.isidentifier(),
          "a transformers class name or null")
    if problems:
        return problems
    plain = {k: v for k, v in info.items() if k != "target"}
    problems += data_problems(plain, "model")
    target = info.get("target")
    if target:
        if "_partial_" in target:
            problems.append("model.target._partial_: a plan file rebuilds the model itself")
        if "_args_" in target and not isinstance(target["_args_"], list):
            problems.append("model.target._args_ must be a list")
        problems += data_problems(target["_target_"], "model.target._target_")
        problems += data_problems({k: v for k, v in target.items() if k not in TARGET_TOP_KEYS},
                                  "model.target")
    return problems


def whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def strings(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(x, str) for x in items)


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- the optimizer


def torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    """`torch.optim.<Name>` -> class, for every optimizer class torch.optim exports (attribute
    lookups on the imported module: nothing is imported)."""
    return {f"torch.optim.{name}": cls for name, cls in vars(torch.optim).items()
            if not name.startswith("_") and isinstance(cls, type)
            and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer}


def names_class(dotted: str, cls: Any) -> bool:
    """True if `dotted` names `cls`: its qualified name, or an alias in a module that is already
    imported (`timm.optim.Lamb` for `timm.optim.lamb.Lamb`). Imports nothing."""
    if dotted == qualified_name(cls):
        return True
    module, _, attr = dotted.rpartition(".")
    found = sys.modules.get(module)
    return found is not None and vars(found).get(attr) is cls


def qualified_name(obj: Any) -> str:
    """`module.QualName` of a class or function."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def optimizer_class(
    target: str, allowed: Sequence[OptimizerSpec], path: Any
) -> type[torch.optim.Optimizer]:
    """The class a file's optimizer `_target_` may name: a torch.optim optimizer, or one the
    caller allowed (a class, or a dotted name the caller wrote: imported only then)."""
    for entry in allowed:
        if isinstance(entry, str):
            if entry == target:
                return _caller_class(entry)
        elif isinstance(entry, type) and issubclass(entry, torch.optim.Optimizer):
            if names_class(target, entry):
                return entry
        else:
            raise FinetunePrepError(
                f"optimizers=[...] takes torch.optim.Optimizer subclasses or their dotted names; "
                f"got {short(entry)}.")
    known = torch_optimizers()
    if target in known:
        return known[target]
    why = ("the base class, not an optimizer" if target == "torch.optim.Optimizer" else
           "not an optimizer class of torch.optim" if target.startswith("torch.optim.") else
           "not in torch.optim, and the caller did not allow it")
    raise FinetunePrepError(
        f"{path}: optimizer._target_ {target!r} is {why}. A plan file may name a torch.optim "
        f"optimizer ({', '.join(n.rpartition('.')[2] for n in sorted(known))}); to use another "
        "optimizer you trust, pass it: build_optimizer(model, path, optimizers=[MyOptimizer]) "
        "(or FinetunePrepCallback(path, optimizers=[...])).")


def _caller_class(dotted: str) -> type[torch.optim.Optimizer]:
    """Import a class the caller named (the caller's own choice, not the file's)."""
    module, _, attr = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise FinetunePrepError(f"optimizers=[{dotted!r}] cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise FinetunePrepError(f"optimizers=[{dotted!r}] is not a torch.optim.Optimizer "
                                "subclass.")
    return cls


def file_optimizer_factory(
    spec: dict[str, Any], allowed: Sequence[OptimizerSpec], path: Any
) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """`groups -> optimizer` from a file's checked `optimizer` block: the allowed class called
    with the block's plain arguments. The untrusted counterpart of app.proof.optimizer_factory."""
    cls = optimizer_class(spec["_target_"], allowed, path)
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}

    def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        try:
            return cls(groups, **kwargs)
        except (TypeError, ValueError) as err:
            raise FinetunePrepError(
                f"{path}: the optimizer {spec['_target_']} rejects the file's arguments: {err}"
            ) from err

    return build


# --------------------------------------------------------------------------- the model


def model_config(
    info: dict[str, Any], target: Callable[..., Any] | None, path: Any
) -> tuple[Fields, Fields, Callable[[], Any] | None]:
    """From a file's checked `model` block: the model and head configs for
    `models.build_model` (plain Fields, never resolved) and, for a `_target_` model, the
    constructor call of the class the caller passed."""
    source, arch = info.get("source"), info.get("arch")
    if source is None or arch is None:
        raise FinetunePrepError(f"{path}: the model block has no source or arch; prepare the "
                                "file again, or build the model yourself.")
    kwargs = dict(info.get("kwargs") or {})
    refused = [k for k in kwargs if k in FILE_REFUSED_KWARGS.get(source, ()) or k.startswith("_")]
    if refused:
        raise FinetunePrepError(
            f"{path}: model.kwargs.{refused[0]} is not accepted from a plan file ({source} would "
            "read files, download or run code with it). Build the model yourself, or prepare "
            "the file again without it.")
    make = _target_call(info, target, path) if source == "target" else None
    if target is not None and source != "target":
        raise FinetunePrepError(f"{path} describes a {source} model ({arch}), not a _target_ "
                                "one: call build_model(path) without target=.")
    heads = list(info.get("heads") or [info.get("head")])
    model_cfg = Fields(source=source, arch=arch, kwargs=kwargs, target=info.get("target"),
                       stages=info.get("stages") or None, input_size=None,
                       hf_class=info.get("hf_class"))
    mode = info.get("head_mode", "replace")
    head_cfg = Fields(num_outputs=info.get("num_outputs", 1) if mode == "replace" else None,
                      module=heads[0] if heads and heads[0] and mode != "none" else None,
                      mode=mode)
    return model_cfg, head_cfg, make


def _target_call(info: dict[str, Any], target: Callable[..., Any] | None,
                 path: Any) -> Callable[[], Any]:
    spec = info.get("target")
    if not spec:
        raise FinetunePrepError(
            f"{path} names a _target_ model ({info.get('arch')}) but not its arguments (written "
            "by an older finetune_prep): prepare the file again, or build the model yourself.")
    recorded = spec["_target_"]
    if target is None:
        raise FinetunePrepError(
            f"{path} describes a _target_ model ({recorded}); a plan file never imports or calls "
            "a class it names. Pass the class yourself: "
            f"finetune_prep.build_model(path, target={recorded.rpartition('.')[2]}).")
    if not names_class(recorded, target):
        raise FinetunePrepError(
            f"{path} was made for {recorded}, but target= is {qualified_name(target)}: pass the "
            "class the file was made for, or prepare a file for this one.")
    args = list(spec.get("_args_") or [])
    kwargs = {k: v for k, v in spec.items() if k not in TARGET_TOP_KEYS}

    def make() -> Any:
        try:
            return target(*args, **kwargs)
        except Exception as err:  # the caller's own constructor, with the file's plain data
            raise FinetunePrepError(
                f"{path}: {recorded}(**{short(kwargs)}) failed: {type(err).__name__}: {err}"
            ) from err

    return make



# --------------------------------------------------------------------------- the adapters

PEFT_TYPES = ("LORA", "IA3", "LOHA")  # the peft config classes a plan file may name
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
RECORD_ONLY = ("peft_type", "peft_version", "auto_mapping", "base_model_name_or_path")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pattern_map(v: Any, ok: Callable[[Any], bool]) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and ok(x) for k, x in v.items())


def _layers(v: Any) -> bool:
    return v is None or whole(v) or isinstance(v, list) and all(whole(x) for x in v)


_COMMON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task_type": (lambda v: v is None or v in TASK_TYPES, f"null or one of {TASK_TYPES}"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (lambda v: strings(v) and bool(v), "a non-empty list of module names"),
    "exclude_modules": (lambda v: v is None or strings(v), "null or a list of module names"),
    "modules_to_save": (lambda v: v is None or strings(v), "null or a list of module names"),
    "layers_to_transform": (_layers, "null, a layer index or a list of them"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or strings(v),
                       "null, a name or a list of names"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
}
_RANK = (lambda v: whole(v) and v >= 1, "a whole number >= 1")
_ALPHA = (lambda v: _number(v) and v > 0, "a number > 0")
_DROP = (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
_FLAG = (lambda v: isinstance(v, bool), "true or false")
_RANKS = (lambda v: _pattern_map(v, _RANK[0]), "an object of whole numbers >= 1")
_ALPHAS = (lambda v: _pattern_map(v, _ALPHA[0]), "an object of numbers > 0")
# the fields a plan file may set, per peft type; every other field of peft's config class must
# hold the class's default (no megatron_core module to import, no LoftQ/EVA/CorDA
# initialisation that reads data, no remote revision)
ADAPTER_FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "LORA": {**_COMMON, "r": _RANK, "lora_alpha": _ALPHA, "lora_dropout": _DROP,
             "bias": (lambda v: v in ("none", "all", "lora_only"), "none, all or lora_only"),
             "use_rslora": _FLAG, "use_dora": _FLAG, "lora_bias": _FLAG,
             "init_lora_weights": (lambda v: v in (True, False, "gaussian"),
                                   "true, false or gaussian"),
             "rank_pattern": _RANKS, "alpha_pattern": _ALPHAS},
    "IA3": {**_COMMON, "feedforward_modules": (lambda v: v is None or strings(v),
                                               "null or a list of module names"),
            "init_ia3_weights": _FLAG},
    "LOHA": {**_COMMON, "r": _RANK, "alpha": _ALPHA, "rank_dropout": _DROP,
             "module_dropout": _DROP, "use_effective_conv2d": _FLAG, "init_weights": _FLAG,
             "rank_pattern": _RANKS, "alpha_pattern": _ALPHAS},
}


def adapter_problems(block: Any) -> list[str]:
    """What is wrong with a file's `adapter` block as data: the peft type, each field peft's
    config may take from a file, the adapter parameter names, the resumed folder."""
    if not isinstance(block, dict):
        return ["'adapter' must be an object"]
    peft_type, config = block.get("peft_type"), block.get("config")
    if peft_type not in PEFT_TYPES:
        return [f"adapter.peft_type is {short(peft_type)}; it must be one of "
                f"{', '.join(PEFT_TYPES)}"]
    if not isinstance(config, dict):
        return ["adapter.config must be an object (peft's config, as to_dict() gives it)"]
    problems = data_problems(config, "adapter.config")
    if config.get("peft_type", peft_type) != peft_type:
        problems.append(f"adapter.config.peft_type is {short(config['peft_type'])}, the "
                        f"block's {peft_type}")
    for key, (ok, what) in ADAPTER_FIELDS[peft_type].items():
        if key in config and not ok(config[key]):
            problems.append(f"adapter.config.{key} is {short(config[key])}; it must be {what}")
    if "target_modules" not in config:
        problems.append("adapter.config.target_modules is missing")
    if not strings(block.get("params")):
        problems.append("adapter.params must be a list of parameter names")
    resume = block.get("resume")
    if resume is not None and not (isinstance(resume, dict) and isinstance(
            resume.get("path"), str) and whole(resume.get("tensors"))):
        problems.append("adapter.resume must be null or {\"path\": a string, \"tensors\": a "
                        "whole number}")
    return problems


def adapter_kwargs(block: dict[str, Any], defaults: dict[str, Any],
                   path: Any) -> dict[str, Any]:
    """The arguments of peft's config class from a checked `adapter` block: the fields a file
    may set, each checked; every other field must equal `defaults` (the class's own to_dict(),
    JSON-safe), or the file is refused."""
    peft_type, config = block["peft_type"], block["config"]
    allowed = ADAPTER_FIELDS[peft_type]
    kwargs = {}
    for key, value in config.items():
        if key in allowed:
            kwargs[key] = value
        elif key in RECORD_ONLY:
            continue
        elif key not in defaults:
            raise FinetunePrepError(
                f"{path}: adapter.config.{key} is not a field of peft's {peft_type} config (a "
                "newer or older peft wrote it); prepare the file again with this peft.")
        elif value != defaults[key]:
            raise FinetunePrepError(
                f"{path}: adapter.config.{key} is {short(value)}; a plan file may set only "
                f"{', '.join(sorted(allowed))} (other settings can import modules, download or "
                "read data). Build the adapters yourself with peft, or prepare the file again.")
    return kwargs
