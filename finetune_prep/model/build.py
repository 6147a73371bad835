"""Build the architecture a model config names: torchvision, timm, Hugging Face or `_target_`.

The model is built on the meta device for planning (no memory, no init time) or on the CPU when
real tensors are needed; its head is replaced (model.heads) and it is described (model.describe).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_prep.config import MAX_OUTPUTS
from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.model import hf
from finetune_prep.model.describe import BuiltModel, describe, init_on_meta, no_weight_decay_names
from finetune_prep.model.heads import head_mode, own_outputs, replace_heads, task_of
from finetune_prep.model.stages import derive_layers, derive_stages, override_stages

SOURCES = ("torchvision", "timm", "target", "hf")


def build_architecture(
    model_cfg: Any, head_cfg: Any, meta: bool, make_target: Callable[[], Any] | None = None,
) -> BuiltModel:
    """Build the configured architecture with the head head.mode asks for (replace: a fresh
    head of `head_cfg.num_outputs` outputs; keep: the model's own; none: no head).

    `make_target` builds a `_target_` model instead of Hydra's instantiate: a model rebuilt
    from a plan file (untrusted) is built only by the class its caller passed."""
    mode = head_mode(head_cfg)
    num_outputs = _num_outputs(head_cfg, mode)
    source = str(getattr(model_cfg.source, "value", model_cfg.source))  # the enum's name
    if source not in SOURCES:
        raise FinetunePrepError(
            f"model.source={source!r} is not one of {', '.join(SOURCES)}."
        )
    if source == "hf":  # Hugging Face transformers: its own module
        if mode != "replace":
            raise FinetunePrepError(
                f"head.mode={mode} is not available for model.source=hf: its head is built from "
                "num_labels. Use head.mode=replace with head.num_outputs=N.")
        return hf.build(model_cfg, head_cfg, num_outputs, meta)
    made = _build(model_cfg, num_outputs, mode, meta, make_target)
    model = made.model
    head = replace_heads(model, model_cfg, head_cfg, num_outputs, meta, sized=made.sized)
    stages = _stages(model, model_cfg, head)
    input_size = tuple(model_cfg.input_size) if model_cfg.get("input_size") else made.input_size
    table = describe(model, head, stages, _layers(model, head, stages),
                     no_weight_decay_names(model, source))
    arch = model_cfg.arch if source != "target" else _target_name(model_cfg)
    outputs = num_outputs if mode == "replace" else own_outputs(model, head)
    return BuiltModel(model, table, source, arch, outputs, input_size,
                      own_input_size=made.input_size, task=task_of(model), head_mode=mode,
                      notes=made.notes)


def _num_outputs(head_cfg: Any, mode: str) -> int | None:
    """head.num_outputs, checked; ignored (None) when the head is kept or there is none."""
    if mode != "replace":
        return None
    value = head_cfg.get("num_outputs") if hasattr(head_cfg, "get") else None
    if value is None:
        raise FinetunePrepError(
            "head.num_outputs=null with head.mode=replace: a fresh head needs a size. Set "
            "head.num_outputs to the number of classes, or head.mode=keep to keep the model's own.")
    num_outputs = int(value)
    if not 1 <= num_outputs <= MAX_OUTPUTS:
        raise FinetunePrepError(
            f"head.num_outputs={num_outputs}: a head needs at least one output and at most "
            f"{MAX_OUTPUTS:,}. Set head.num_outputs to the number of classes (1 for a binary "
            "logit)."
        )
    return num_outputs


@dataclass
class _Made:
    """What construction gave: the model, its own input size, whether the constructor already
    sized the head (torchvision detection/segmentation by name, timm), and notes."""

    model: nn.Module
    input_size: tuple[int, ...] | None
    sized: bool = False
    notes: tuple[str, ...] = ()


def _build(model_cfg: Any, num_outputs: int | None, mode: str, meta: bool,
           make_target: Callable[[], Any] | None) -> _Made:
    """Construct on meta (or the CPU); a constructor that computes with its tensors cannot run
    on meta: it is built on the CPU and moved to meta, with a note of what that cost."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init notices
        if not meta:
            return _construct(model_cfg, num_outputs, mode, meta, make_target)
        try:
            with init_on_meta():
                return _construct(model_cfg, num_outputs, mode, meta, make_target)
        except Exception as err:  # a meta tensor in the constructor's arithmetic, or a bad
            # config: the CPU build tells them apart (it raises the config's own error)
            while err.__cause__ is not None:  # Hydra's wrapper: the constructor's own error
                err = err.__cause__
            why = f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0]
            return _cpu_fallback(model_cfg, num_outputs, mode, make_target, why)


def _cpu_fallback(model_cfg: Any, num_outputs: int | None, mode: str,
                  make_target: Callable[[], Any] | None, why: str) -> _Made:
    start = time.perf_counter()
    made = _construct(model_cfg, num_outputs, mode, False, make_target)
    seconds = time.perf_counter() - start
    size = sum(t.numel() * t.element_size() for t in made.model.state_dict().values())
    made.model.to("meta")
    note = (f"{_label(model_cfg)} cannot be built on the meta device ({why[:120]}): it was built "
            f"on the CPU instead, which took {seconds:.1f} s and {size:,} bytes of tensors")
    return _Made(made.model, made.input_size, made.sized, (*made.notes, note))


def _label(model_cfg: Any) -> str:
    source = str(getattr(model_cfg.source, "value", model_cfg.source))
    return _target_name(model_cfg) if source == "target" else str(model_cfg.arch)


# Above this many outputs a timm head is built as num_classes=1, then reset_classifier on meta:
# create_model would allocate it at full size on the CPU (reset_classifier may drop a
# distillation head, so ordinary sizes take the exact path).
TIMM_HEAD_ON_META = 100_000


RESERVED_KWARGS = {  # keyword arguments the builder sets itself, and the key that sets them
    "torchvision": {"weights": "model.weights", "num_classes": "head.num_outputs",
                    "weights_backbone": "checkpoint.path"},
    "timm": {"pretrained": "checkpoint.path", "num_classes": "head.num_outputs",
             "pretrained_cfg_overlay": "checkpoint.path"},
}


def _construct(
    model_cfg: Any, num_outputs: int | None, mode: str, meta: bool = False,
    make_target: Callable[[], Any] | None = None,
) -> _Made:
    kwargs = dict(model_cfg.get("kwargs") or {})
    source = str(getattr(model_cfg.source, "value", model_cfg.source))
    for key, instead in RESERVED_KWARGS.get(source, {}).items():
        if key in kwargs:
            raise FinetunePrepError(
                f"model.kwargs.{key}: finetune_prep sets {key} itself; use {instead} instead "
                "(and remove it from model.kwargs)."
            )
    try:
        if source == "torchvision":
            return _torchvision(model_cfg.arch, kwargs, num_outputs)
        if source == "timm":
            return _timm(model_cfg.arch, num_outputs, mode, kwargs, meta)
    except FinetunePrepError:
        raise
    except Exception as err:  # with kwargs given, a constructor that fails rejects them
        if not kwargs:
            raise
        why = (str(err).strip().splitlines() or [""])[0]
        raise FinetunePrepError(
            f"model.kwargs ({', '.join(kwargs)}) rejected by {model_cfg.arch}: "
            f"{type(err).__name__}: {why}. Check the names and values against the model's "
            "constructor, or remove them."
        ) from err
    model = make_target() if make_target is not None else _target(model_cfg)
    if not isinstance(model, nn.Module):
        raise FinetunePrepError(
            f"model.target built a {type(model).__name__}, not a torch.nn.Module."
        )
    return _Made(model, None)


def _torchvision(arch: str, kwargs: dict, num_outputs: int | None) -> _Made:
    """A torchvision model by name. Classifiers are built as they are (the head is replaced
    next); detection and segmentation models are built by torchvision with
    num_classes=head.num_outputs (its own heads, background counted as torchvision counts)
    and without backbone weights (finetune_prep never downloads)."""
    import torchvision

    models = torchvision.models
    classifiers = models.list_models(module=models)
    tasks = models.list_models(module=models.detection) + models.list_models(
        module=models.segmentation)
    if arch in classifiers:
        model = models.get_model(arch, weights=None, **kwargs)
        return _Made(model, (3, 299, 299) if arch == "inception_v3" else (3, 224, 224))
    if arch not in tasks:
        names = classifiers + tasks
        raise FinetunePrepError(
            f"model.arch={arch!r} is not a torchvision classification, detection or "
            f"segmentation model.{did_you_mean(arch, names)} See "
            "torchvision.models.list_models(module=torchvision.models[.detection|.segmentation])."
        )
    sized = {"num_classes": num_outputs} if num_outputs is not None else {}
    model = models.get_model(arch, weights=None, weights_backbone=None, **sized, **kwargs)
    return _Made(model, (3, 224, 224), sized=bool(sized))


def _timm(
    arch: str, num_outputs: int | None, mode: str, kwargs: dict, meta: bool = False
) -> _Made:
    try:
        import timm
    except ImportError as err:
        raise FinetunePrepError(
            "model.source=timm needs timm: pip install 'finetune_prep[timm]'."
        ) from err
    if not timm.is_model(arch):
        names = timm.list_models()
        raise FinetunePrepError(
            f"model.arch={arch!r} is not a timm model.{did_you_mean(arch, names)}"
            " See timm.list_models('*pattern*')."
        )
    if mode != "replace":  # keep: timm's own head; none: num_classes=0, timm's backbone
        extra = {"num_classes": 0} if mode == "none" else {}
        model = timm.create_model(arch, pretrained=False, **extra, **kwargs)
    elif meta and num_outputs > TIMM_HEAD_ON_META:  # timm allocates its head on the CPU first
        model = timm.create_model(arch, pretrained=False, num_classes=1, **kwargs)
        with torch.device("meta"):
            model.reset_classifier(num_outputs)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=num_outputs, **kwargs)
    input_size = getattr(model, "pretrained_cfg", {}).get("input_size")
    return _Made(model, tuple(input_size) if input_size else None, sized=True)


def _target(model_cfg: Any) -> nn.Module:
    from hydra.utils import instantiate

    if not model_cfg.get("target") or "_target_" not in model_cfg.target:
        raise FinetunePrepError(
            "model.source=target needs model.target with a _target_, e.g. "
            "model.target._target_=mypkg.nets.MyNet (plus its arguments)."
        )
    try:
        # plain containers, not DictConfig: peft and smp write wrong configs from those
        return instantiate(model_cfg.target, _convert_="all")
    except Exception as err:  # Hydra wraps import and constructor errors alike
        raise FinetunePrepError(f"could not build model.target: {err}") from err


def _target_name(model_cfg: Any) -> str:
    return str(model_cfg.target["_target_"])


def _stages(model: nn.Module, model_cfg: Any, head: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    if model_cfg.get("stages"):
        return override_stages(model, model_cfg.stages, head)
    return tuple(tuple(s) for s in derive_stages(model, head))


def _layers(
    model: nn.Module, head: Sequence[str], stages: Sequence[Sequence[str]]
) -> dict[str, int]:
    return derive_layers(model, head, stages)


def torchvision_weights_file(arch: str, weights: str) -> Path:
    """The hub-cache file of a torchvision weights enum member; never downloads."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
        member = enum[weights]
    except (KeyError, ValueError) as err:
        options = ["DEFAULT", *enum.__members__] if "enum" in locals() else []
        raise FinetunePrepError(
            f"model.weights={weights!r} is not a weights name of {arch}. "
            f"Options: {', '.join(dict.fromkeys(options)) or 'none'}; or null for random init."
        ) from err
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
    if not path.is_file():
        raise FinetunePrepError(
            f"model.weights={weights} needs {path.name} in torch's hub cache ({path.parent}), "
            "and finetune_prep never downloads. On a machine with network run "
            f"`python -c \"import torchvision; torchvision.models.get_model('{arch}', "
            f"weights='{weights}')\"` and copy {path.name} to {path.parent} here "
            "(or set TORCH_HOME); or give the file as checkpoint.path=...; "
            "or set model.weights=null."
        )
    return path
