"""PEFT adapters (LoRA, IA3, LoHa) on a built model, built by the peft library itself.

The config names target modules in the tool's own pattern language (plan.rules: globs, `re:`,
`@stage[i]`, `@head`, typos caught with suggestions); they are resolved here to an explicit list
of module names, and peft's `get_peft_model` builds the adapters from that list, so nothing about
an adapter is written by hand. The adapted model is described under the names of the model
inside the PeftModel (`base_model.model.` stripped): peft's inserted segments (`base_layer`,
`lora_A.default`, `modules_to_save.default`, `original_module`) appear in the names, and the
head is the trainable copy only, never peft's frozen `original_module` or `base_layer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from finetune_prep.checkpoint import integrity
from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.model.describe import BuiltModel, describe
from finetune_prep.plan.rules import select
from finetune_prep.plan.table import ParamTable, covers

METHODS = ("lora", "ia3", "loha")
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "loha": "LOHA"}  # method -> peft's PeftType value
CONFIG_CLASSES = {"LORA": "LoraConfig", "IA3": "IA3Config", "LOHA": "LoHaConfig"}
ADAPTER_PREFIXES = {"LORA": "lora_", "IA3": "ia3_", "LOHA": "hada_"}  # peft's tuner prefixes
ADAPTER_NAME = "default"  # peft's adapter name
# layer classes (by name) peft can adapt, per method
SUPPORTED = {
    "lora": ("Linear", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d", "Conv3d",
             "Embedding", "Conv1D", "MultiheadAttention"),
    "loha": ("Linear", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d"),
    "ia3": ("Linear", "NonDynamicallyQuantizableLinear", "Conv2d", "Conv3d", "Conv1D"),
}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # PeftModel.save_pretrained
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's names in front of the model's own


@dataclass
class Adapted:
    """A model with peft's adapters: the PeftModel, its description, what the file records."""

    peft_model: nn.Module  # the PeftModel (names `base_model.model.` + the model's own)
    built: BuiltModel  # the model inside it (peft's layers injected) and its table
    record: dict[str, Any]  # the param file's `adapter` block
    config: Any = None  # peft's config object the adapters were built from


def method_of(adapter_cfg: Any) -> str:
    """The configured method's name ("none" when there are no adapters)."""
    if adapter_cfg is None:
        return "none"
    method = adapter_cfg.get("method", "none")
    return str(getattr(method, "value", method))


def peft_kwargs(adapter_cfg: Any, table: ParamTable, model: nn.Module) -> dict[str, Any]:
    """The arguments of peft's config class for `adapter_cfg`, with every pattern resolved to
    an explicit list of module names of `model`."""
    method = method_of(adapter_cfg)
    options = dict(adapter_cfg.get("options") or {})
    kwargs: dict[str, Any] = {
        "target_modules": target_modules(adapter_cfg.get("target_modules") or [], table, model,
                                         method),
        "modules_to_save": _modules_to_save(adapter_cfg.get("modules_to_save"), table),
    }
    names = {"lora": {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                      "bias": "bias"},
             "loha": {"r": "r", "alpha": "alpha", "dropout": "rank_dropout"},
             "ia3": {}}[method]
    for key in ("r", "alpha", "dropout", "bias"):
        value = adapter_cfg.get(key)
        if value is None:
            continue
        if key not in names:
            raise FinetunePrepError(
                f"adapter.{key}={value} is not a setting of adapter={method}; set it to null "
                f"(its settings: {', '.join(f'adapter.{k}' for k in names) or 'target_modules'})")
        _check_value(key, value)
        kwargs[names[key]] = value
    if method == "ia3":
        ff = adapter_cfg.get("feedforward_modules") or []
        kwargs["feedforward_modules"] = target_modules(ff, table, model, method,
                                                       "adapter.feedforward_modules")
        missing = sorted(set(kwargs["feedforward_modules"]) - set(kwargs["target_modules"]))
        if missing:
            raise FinetunePrepError(
                f"adapter.feedforward_modules selects {missing[0]}, which is not a target "
                "module; every feedforward module must be among adapter.target_modules.")
    elif adapter_cfg.get("feedforward_modules"):
        raise FinetunePrepError(f"adapter.feedforward_modules is for adapter=ia3, not {method}; "
                                "set it to [].")
    clash = sorted(set(options) & {*kwargs, "target_modules", "modules_to_save"})
    if clash:
        raise FinetunePrepError(
            f"adapter.options.{clash[0]} repeats a key of adapter itself; set it there.")
    return {**kwargs, **options}


def _check_value(key: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          "alpha": lambda v: number and v > 0,
          "dropout": lambda v: number and 0 <= v < 1,
          "bias": lambda v: v in ("none", "all", "lora_only")}[key]
    what = {"r": "a whole number >= 1", "alpha": "a number > 0", "dropout": "in [0, 1)",
            "bias": "none, all or lora_only"}[key]
    if not ok(value):
        raise FinetunePrepError(f"adapter.{key}={value}: must be {what}.")


def target_modules(patterns: Sequence[str], table: ParamTable, model: nn.Module, method: str,
                   where: str = "adapter.target_modules") -> list[str]:
    """Module names of the layers peft can adapt that `patterns` cover, in model order. A
    pattern that selects no parameter is an error with suggestions; one that covers only layers
    peft cannot adapt is an error naming them."""
    if isinstance(patterns, str):
        patterns = [patterns]
    modules = dict(model.named_modules())
    kinds = SUPPORTED[method] if method in SUPPORTED else ()
    chosen: list[str] = []
    for i, pattern in enumerate(patterns):
        try:
            names = select(pattern, table, f"{where}[{i}]")
        except FinetunePrepError as err:
            raise FinetunePrepError(f"{err} Set {where} to layers of this model (the presets "
                                    f"aim at attention layers), e.g. {where}='[layer4]' or "
                                    f"'[@stage[-1]]'.") from err
        owners = dict.fromkeys(table.owner[n] for n in names)
        fit = [m for m in owners if type(modules[m]).__name__ in kinds]
        if not fit:
            seen = ", ".join(f"{m} ({type(modules[m]).__name__})" for m in list(owners)[:4])
            raise FinetunePrepError(
                f"{where}[{i}] {pattern!r} covers no layer adapter={method} can adapt "
                f"({', '.join(kinds)}); it covers {seen}. Point it at the Linear/Conv layers.")
        chosen += [m for m in fit if m not in chosen]
    return _outside_attention(chosen, modules, where)


def _outside_attention(chosen: list[str], modules: Mapping[str, nn.Module],
                       where: str) -> list[str]:
    """nn.MultiheadAttention reads its out_proj's weight itself (never calls the layer), so an
    adapter there would get no gradient: peft adapts the MultiheadAttention as a whole."""
    attention = [m for m in chosen if type(modules[m]).__name__ == "MultiheadAttention"]
    inside = [m for m in chosen if any(covers(a, m) and a != m for a in attention)]
    chosen = [m for m in chosen if m not in inside]
    bare = [m for m in chosen if "." in m and type(
        modules.get(m.rpartition(".")[0])).__name__ == "MultiheadAttention"]
    if bare:
        raise FinetunePrepError(
            f"{where} selects {bare[0]}, the out_proj of an nn.MultiheadAttention, which reads "
            "its weight directly (an adapter there never gets a gradient). Target the attention "
            f"module itself ({bare[0].rpartition('.')[0]}): peft adapts it whole, e.g. "
            r"'re:.*self_attention\.in_proj_weight'.")
    if where == "adapter.target_modules" and not chosen:
        raise FinetunePrepError(
            "adapter.target_modules is empty: name the layers that get adapters, e.g. "
            r"adapter.target_modules='[re:.*attn\.(qkv|proj)\.weight]' or '[@stage[-1]]'.")
    return chosen


def _modules_to_save(patterns: Sequence[str] | None, table: ParamTable) -> list[str]:
    """Module names trained in full beside the adapters; null = the replaced head(s)."""
    if patterns is None:
        return list(table.head)
    owners = []
    for i, pattern in enumerate(patterns):
        names = select(pattern, table, f"adapter.modules_to_save[{i}]")
        owners += [m for m in _top_modules(names, table) if m not in owners]
    return owners


def _top_modules(names: Sequence[str], table: ParamTable) -> list[str]:
    """The outermost modules all of whose parameters are in `names` (a head, not its Linear's
    weight alone): peft wraps whole modules."""
    chosen = set(names)
    found: list[str] = []
    for name in names:
        parts = table.owner[name].split(".")
        best = table.owner[name]
        for i in range(1, len(parts)):
            scope = ".".join(parts[:i])
            if all(n in chosen for n in table.names if covers(scope, n)):
                best = scope
                break
        if best and best not in found:
            found.append(best)
    return found


def peft_config(peft_type: str, kwargs: Mapping[str, Any]) -> Any:
    """peft's config object of `peft_type` (LORA, IA3, LOHA) with `kwargs`; a rejected argument
    is a FinetunePrepError naming it."""
    import peft  # the optional extra finetune_prep[peft]

    cls = getattr(peft, CONFIG_CLASSES[peft_type])
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        raise FinetunePrepError(
            f"adapter.options.{unknown[0]} is not an argument of peft.{cls.__name__}."
            f"{did_you_mean(unknown[0], sorted(fields))}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise FinetunePrepError(f"peft.{cls.__name__} rejects the adapter settings: {err}") \
            from err


def config_defaults(peft_type: str) -> dict[str, Any]:
    """peft's config class of `peft_type` with no arguments, as JSON-safe to_dict()."""
    import peft

    return json_safe(getattr(peft, CONFIG_CLASSES[peft_type])().to_dict())


def require_peft() -> None:
    """A clear error when the optional dependency is missing."""
    try:
        import peft  # noqa: F401  (the optional extra finetune_prep[peft])
    except ImportError as err:
        raise FinetunePrepError(
            "adapters need the peft library: pip install 'finetune_prep[peft]'.") from err


def wrap(model: nn.Module, config: Any, meta: bool) -> nn.Module:
    """peft's `get_peft_model` (on the meta device: adapters created there too, no tensor)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config, low_cpu_mem_usage=meta)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise FinetunePrepError(f"peft cannot add the adapters: {err}") from err


def adapt(built: BuiltModel, adapter_cfg: Any, meta: bool, config: Any = None) -> Adapted:
    """`built` with peft's adapters: resolve the patterns, let peft build, describe the result.
    `config`: peft's config object to use as is (a plan file's, already checked)."""
    require_peft()
    if config is None:
        method = method_of(adapter_cfg)
        kwargs = peft_kwargs(adapter_cfg, built.table, built.model)
        config = peft_config(PEFT_TYPES[method], kwargs)
    peft_model = wrap(built.model, config, meta)
    inner = peft_model.base_model.model
    table = adapted_table(inner, built.table, str(config.peft_type.value))
    adapted = dataclasses.replace(built, model=inner, table=table)
    return Adapted(peft_model, adapted, record(config, table, inner), config)


def base_name(name: str, peft_type: str) -> str:
    """The name in the model before peft: its inserted segments removed
    (`q.lora_A.default.weight` -> `q.weight`, `head.modules_to_save.default.bias` -> `head.bias`,
    `q.base_layer.weight` -> `q.weight`, an IA3 vector `k.ia3_l.default` -> `k`)."""
    prefix = ADAPTER_PREFIXES.get(peft_type, "lora_")
    parts = name.split(".")
    kept, i = [], 0
    while i < len(parts):
        part, nxt = parts[i], parts[i + 1] if i + 1 < len(parts) else None
        if part in ("base_layer", "original_module"):
            i += 1
        elif (part == "modules_to_save" or part.startswith(prefix)) and nxt == ADAPTER_NAME:
            i += 2
        else:
            kept.append(part)
            i += 1
    return ".".join(kept)


def is_adapter_param(name: str, peft_type: str) -> bool:
    """True for a parameter of an adapter (lora_A/B, ia3_l, hada_*), not of the model."""
    prefix = ADAPTER_PREFIXES.get(peft_type, "lora_")
    parts = name.split(".")
    return any(p.startswith(prefix) and nxt == ADAPTER_NAME
               for p, nxt in zip(parts, parts[1:], strict=False))


def adapted_layers(params: Sequence[str], peft_type: str) -> list[str]:
    """The layers that hold adapters, from the adapter parameters' names, in order (an adapter
    peft nests under a base layer, as nn.MultiheadAttention's out_proj, counts for its layer)."""
    prefix = ADAPTER_PREFIXES.get(peft_type, "lora_")
    layers: dict[str, None] = {}
    for name in params:
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.startswith(prefix) or p == "base_layer"),
                   len(parts))
        layers[".".join(parts[:cut])] = None
    return list(layers)


def frozen_copy(name: str, peft_type: str) -> bool:
    """peft's frozen copies: the original of a modules_to_save module, an adapted layer's base
    (not an adapter peft nests under a base layer, as in nn.MultiheadAttention's out_proj)."""
    inside = ".original_module." in f".{name}" or ".base_layer." in f".{name}"
    return inside and not is_adapter_param(name, peft_type)


def adapted_table(inner: nn.Module, base: ParamTable, peft_type: str) -> ParamTable:
    """The table of the adapted model: stages, layers and no-decay names carried over from the
    base model's table through `base_name`; the head is what trains under the head module."""
    names = [n for n, _ in inner.named_parameters()]
    module_layer: dict[str, int] = {}
    for n, layer in base.layers.items():
        for scope in _scopes(n):
            module_layer.setdefault(scope, layer)
    layers = {}
    for n in names:
        b = base_name(n, peft_type)
        found = base.layers.get(b, module_layer.get(b))
        if found is not None:
            layers[n] = found
    nwd = frozenset(n for n in names if base_name(n, peft_type) in base.no_weight_decay)
    head = []
    for h in base.head:
        under = [n for n in names if covers(h, n)]
        live = [n for n in under if not frozen_copy(n, peft_type)]
        owners = [m for m in dict.fromkeys(n.rpartition(".")[0] for n in live) if m not in head]
        head += owners if len(live) < len(under) else [h]
    stages = [[e2 for e in stage for e2 in _renamed(e, names, peft_type)] for stage in base.stages]
    return describe(inner, head, stages, layers if len(layers) == len(names) else {}, nwd)


def _renamed(entry: str, names: Sequence[str], peft_type: str) -> list[str]:
    """A stage entry in the adapted model: itself if it still covers a name, else the names
    peft made of it (an entry that named a parameter peft moved under base_layer)."""
    if any(covers(entry, n) for n in names):
        return [entry]
    return [n for n in names if base_name(n, peft_type) == entry]


def _scopes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def json_safe(value: Any) -> Any:
    """peft's to_dict() as plain JSON: enums by value, sets as sorted lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise FinetunePrepError(f"the adapter config holds {type(value).__name__} {value!r}, which "
                            "a plan file cannot record; use plain values in adapter.options.")


def record(config: Any, table: ParamTable, inner: nn.Module) -> dict[str, Any]:
    """The param file's `adapter` block: peft's config (to_dict, JSON-safe) and the adapter
    parameters by name."""
    peft_type = str(config.peft_type.value)
    return {"peft_type": peft_type, "config": json_safe(config.to_dict()),
            "params": [n for n in table.names if is_adapter_param(n, peft_type)],
            "resume": None}


# --------------------------------------------------------------------------- adapter folders


def check_folder(folder: str | os.PathLike) -> Path:
    """An adapter folder PeftModel.save_pretrained wrote, or an error naming what is missing."""
    path = Path(os.path.expanduser(os.fspath(folder)))
    if not path.is_dir():
        raise FinetunePrepError(f"adapter.resume={folder} is not a folder; give the folder "
                                "PeftModel.save_pretrained wrote (adapter_config.json + "
                                "adapter_model.safetensors).")
    for name in ADAPTER_FILES:
        try:
            mode = os.stat(path / name).st_mode  # never blocks, not even on a FIFO
        except OSError:
            mode = None
        if mode is None:
            raise FinetunePrepError(f"adapter.resume={folder} has no {name}; give the folder "
                                    "PeftModel.save_pretrained wrote (adapter_model.bin is not "
                                    "read: save with safe_serialization=True).")
        if not stat.S_ISREG(mode):
            raise FinetunePrepError(
                f"adapter.resume={folder}: {name} is not a regular file but "
                f"{integrity.file_type(mode)}; give the folder PeftModel.save_pretrained wrote.")
    return path


CONFIG_LIMIT = 1 << 20  # bytes of adapter_config.json (peft writes about 1 KiB)


def folder_config(folder: Path) -> dict[str, Any]:
    """The folder's adapter_config.json as plain JSON (checked by the caller)."""
    try:
        data = json.loads(integrity.read_regular(
            str(folder / "adapter_config.json"), CONFIG_LIMIT, str(folder), "adapter.resume"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FinetunePrepError(f"{folder}/adapter_config.json is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise FinetunePrepError(f"{folder}/adapter_config.json is not a JSON object.")
    return data


def check_matches(folder: Path, saved: Mapping[str, Any], config: Any) -> None:
    """The folder's adapters are the ones configured: same method, rank and layers."""
    ours = json_safe(config.to_dict())
    for key in ("peft_type", "r", "target_modules", "modules_to_save", "feedforward_modules"):
        a, b = json_safe(saved.get(key)), ours.get(key)
        if isinstance(a, list) and isinstance(b, list):
            a, b = sorted(map(str, a)), sorted(map(str, b))
        if key in ours and a != b:
            raise FinetunePrepError(
                f"adapter.resume={folder} holds other adapters than configured: its {key} is "
                f"{a!r}, the config gives {b!r}. Configure the same adapters, or resume another "
                "folder.")


@contextlib.contextmanager
def open_weights(folder: Path) -> Iterator[Any]:
    """The folder's adapter_model.safetensors opened by safetensors through a pinned descriptor
    (integrity.pinned): a FIFO, planted or swapped in after check_folder, is refused with an
    error naming adapter.resume, never waited on."""
    from safetensors import safe_open

    with integrity.pinned(str(folder / WEIGHTS), f"{folder}: {WEIGHTS}",
                          "adapter.resume") as path:
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as err:  # safetensors' own errors for a damaged file
            raise FinetunePrepError(f"{folder}/{WEIGHTS} cannot be read: {err}") from err
        with handle as f:
            yield f


def _shapes(folder: Path, f: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes in an opened adapter_model.safetensors (its header only)."""
    try:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors' own errors for a damaged file
        raise FinetunePrepError(f"{folder}/{WEIGHTS} cannot be read: {err}") from err


def folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes in adapter_model.safetensors (its header only)."""
    with open_weights(folder) as f:
        return _shapes(folder, f)


def check_weights(folder: Path, peft_model: nn.Module) -> int:
    """Every tensor of the folder fits an adapter of `peft_model` and every adapter tensor is
    in the folder; the number of tensors."""
    return _check_fit(folder, peft_model, folder_shapes(folder))


def _check_fit(folder: Path, peft_model: nn.Module, found: Mapping[str, tuple[int, ...]]) -> int:
    from peft.utils import get_peft_model_state_dict

    wanted = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(found) if wanted[k] != found[k])
    if missing or extra or wrong:
        what = (f"missing {missing[0]}" if missing else f"has {extra[0]}, which no adapter holds"
                if extra else f"{wrong[0]} is {found[wrong[0]]}, the adapter {wanted[wrong[0]]}")
        raise FinetunePrepError(
            f"adapter.resume={folder}: {WEIGHTS} does not fit the configured adapters ({what}; "
            f"{len(missing)} missing, {len(extra)} extra, {len(wrong)} of another shape). "
            "Configure the adapters the folder was saved from.")
    return len(found)


def load_weights(folder: Path, peft_model: nn.Module) -> None:
    """The folder's adapter weights into `peft_model` by peft's own setter, read from one
    pinned open of the file (its header checked first). What peft's load_peft_weights does for
    a local adapter_model.safetensors (safetensors.torch.load_file = safe_open + get_tensors;
    no key renaming without key_mapping), minus the open by path a FIFO would block."""
    from peft.utils import set_peft_model_state_dict

    with open_weights(folder) as f:
        _check_fit(folder, peft_model, _shapes(folder, f))
        try:
            state = f.get_tensors()
        except Exception as err:  # safetensors' own errors for a damaged file
            raise FinetunePrepError(f"{folder}/{WEIGHTS} cannot be read: {err}") from err
    set_peft_model_state_dict(peft_model, state)
