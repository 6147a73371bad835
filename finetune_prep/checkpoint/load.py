"""Load a checkpoint's tensors into a model: read the data (mmap'd or from safetensors),
assign onto meta tensors or copy into real ones, keep tied weights tied, and give every
tensor the checkpoint did not provide a fresh init."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from finetune_prep.checkpoint import dcp, integrity
from finetune_prep.checkpoint.fit import Fit
from finetune_prep.checkpoint.read import Checkpoint, first_line
from finetune_prep.errors import FinetunePrepError

log = logging.getLogger("finetune_prep")

def load_tensors(ckpt: Checkpoint, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Real CPU tensors for `keys`: the mmap'd ones as they are, safetensors and DCP ones read
    now, each file once. Raises if a file changed since the checkpoint was opened."""
    keys = list(keys)
    integrity.check_unchanged(ckpt.files, ckpt.path)
    lazy = [k for k in keys if k in ckpt.stored and ckpt.tensors[k].is_meta]
    out = {k: ckpt.tensors[k] for k in keys if k not in set(lazy)}
    by_file: dict[str, dict[str, str]] = {}
    for k in lazy:
        file, name = ckpt.stored[k]
        by_file.setdefault(file, {})[k] = name
    for file, names in by_file.items():
        out.update(_read_lazy(ckpt, file, names))
    return {k: out[k] for k in keys}


def _read_lazy(ckpt: Checkpoint, file: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Tensors key -> name in `file` (a safetensors file or a DCP folder), read in one pass."""
    if ckpt.format == "dcp":
        return dcp.load(file, names, {k: ckpt.tensors[k].dtype for k in names},
                        {k: tuple(ckpt.tensors[k].shape) for k in names})
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(name) for k, name in names.items()}
    except Exception as err:
        raise FinetunePrepError(
            f"checkpoint.path={ckpt.path} could not be read ({first_line(str(err))[:120]}): "
            "was it changed or truncated since it was opened? Save or copy it again."
        ) from err


def load_into(
    model: nn.Module, ckpt: Checkpoint, fit: Fit, rebuild: Callable[[], nn.Module]
) -> None:
    """Load `fit.loaded` into the model (assigned on meta, copied on CPU), then give every
    tensor still on meta a fresh init: `reset_parameters()` or, failing that, `rebuild()`."""
    ties = _tied(model)
    current = model.state_dict(keep_vars=True)
    data = load_tensors(ckpt, fit.loaded)
    casts = Counter(f"{v.dtype} -> {current[k].dtype}".replace("torch.", "")
                    for k, v in data.items() if v.dtype != current[k].dtype)
    for cast, n in casts.items():
        log.info("checkpoint.path=%s: cast %d tensors %s", ckpt.path, n, cast)
    data = {k: v.to(current[k].dtype) for k, v in data.items()}  # no copy when dtypes agree
    assign = _versioned(model, {k: v for k, v in data.items() if current[k].is_meta})
    copy = _versioned(model, {k: v for k, v in data.items() if not current[k].is_meta})
    if assign:
        model.load_state_dict(assign, strict=False, assign=True)
    if copy:
        with torch.no_grad():
            model.load_state_dict(copy, strict=False)
    _retie(ties, set(fit.loaded))
    _init_remaining_meta_tensors(model, rebuild)
    _retie(ties, set(fit.loaded))
    left = [n for n, t in _all_tensors(model) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")


def _versioned(model: nn.Module, tensors: dict[str, torch.Tensor]) -> OrderedDict:
    """A state dict carrying the model's module versions, so no legacy migration kicks in."""
    sd: OrderedDict = OrderedDict(tensors)
    sd._metadata = {name: {"version": getattr(m, "_version", 1)}  # type: ignore[attr-defined]
                    for name, m in model.named_modules()}
    return sd


Slot = tuple[nn.Module, str, str, str]  # (module, "_parameters"/"_buffers", attribute, full name)


def _slots(model: nn.Module) -> list[Slot]:
    """Every parameter and buffer slot, tied ones under each of their names."""
    out = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            for attr, t in getattr(module, kind).items():
                if t is not None:
                    out.append((module, kind, attr, f"{prefix}.{attr}" if prefix else attr))
    return out


def _all_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, getattr(m, kind)[attr]) for m, kind, attr, name in _slots(model)]


def _tied(model: nn.Module) -> list[list[Slot]]:
    """Groups of slots that hold the same tensor object (tied weights)."""
    groups: dict[int, list[Slot]] = {}
    for slot in _slots(model):
        m, kind, attr, _ = slot
        groups.setdefault(id(getattr(m, kind)[attr]), []).append(slot)
    return [g for g in groups.values() if len({(id(s[0]), s[2]) for s in g}) > 1]


def _retie(ties: list[list[Slot]], loaded: set[str]) -> None:
    """Make each tied group share one tensor again: a loaded one if any, else a real one."""
    for group in ties:
        held = [(s, getattr(s[0], s[1])[s[2]]) for s in group]
        real = [(s, t) for s, t in held if not t.is_meta]
        best = next(((s, t) for s, t in real if s[3] in loaded), real[0] if real else None)
        if best is None:
            continue
        for m, kind, attr, _ in group:
            getattr(m, kind)[attr] = best[1]


def _init_remaining_meta_tensors(model: nn.Module, rebuild: Callable[[], nn.Module]) -> None:
    """Real tensors for everything still on meta: reset leaf modules, copy the rest from a
    freshly built model (built once, only if needed)."""
    pending: list[Slot] = []
    for prefix, module in model.named_modules():
        slots = _slots_of(module, prefix)
        meta = [s for s in slots if getattr(module, s[1])[s[2]].is_meta]
        if not meta:
            continue
        if len(meta) == len(slots) and _resettable(module):
            if _reset(module):
                continue
            pending += slots
            continue
        for s in meta:
            if s[2] == "num_batches_tracked":  # an old checkpoint's BatchNorm: start counting at 0
                module._buffers[s[2]] = torch.tensor(0, dtype=torch.long)
            else:
                pending.append(s)
    if pending:
        _copy_fresh(pending, rebuild())


def _slots_of(module: nn.Module, prefix: str) -> list[Slot]:
    return [(module, kind, attr, f"{prefix}.{attr}" if prefix else attr)
            for kind in ("_parameters", "_buffers")
            for attr, t in getattr(module, kind).items() if t is not None]


def _resettable(module: nn.Module) -> bool:
    """A module with `reset_parameters` and no child holding tensors (so a reset stays local)."""
    children = any(next(c.parameters(), None) is not None or next(c.buffers(), None) is not None
                   for c in module.children())
    return callable(getattr(module, "reset_parameters", None)) and not children


def _reset(module: nn.Module) -> bool:
    """to_empty + reset_parameters on one module; False unless that set every tensor."""
    try:
        with torch.no_grad():
            module.to_empty(device="cpu", recurse=False)
            for t in _direct(module):
                _poison(t)
            module.reset_parameters()  # type: ignore[operator]
    except Exception:
        return False
    return not any(t.is_meta or _poisoned(t) for t in _direct(module))


def _direct(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _poison(t: torch.Tensor) -> None:
    """Fill a fresh tensor with a value no reset produces, to see what the reset left out."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).min)


def _poisoned(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool:
        return True  # cannot tell: let the rebuilt model provide it
    if t.is_floating_point() or t.is_complex():
        return bool(torch.isnan(t).any())
    return t.numel() > 0 and bool((t == torch.iinfo(t.dtype).min).all())


def _copy_fresh(pending: list[Slot], fresh: nn.Module) -> None:
    """Put the freshly built model's tensors into the pending slots."""
    source = dict(_all_tensors(fresh))
    for module, kind, attr, name in pending:
        if name not in source:
            raise RuntimeError(f"rebuild() returned a model without {name}")
        new, old = source[name].detach(), getattr(module, kind)[attr]
        if kind == "_parameters":
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        getattr(module, kind)[attr] = new
