"""Hugging Face `transformers` models (`model.source=hf`): a local folder with `config.json`, or
a model id already in the local Hugging Face cache; nothing is ever downloaded.

The model is built from its config (`num_labels` = `head.num_outputs`) on the meta device, so a
7B-parameter model costs its import and a few milliseconds. Stages come from the model's own
layer list (`layers.N`, `encoder.layer.N`, `stages.N`), its embeddings first. The folder's
weights are read by `finetune_prep.checkpoint` (header only) after renaming their keys the way
`from_pretrained` does (transformers' conversion mapping, base-model prefix added or removed);
a head whose shape does not fit is left fresh, as `ignore_mismatched_sizes=True` does.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from finetune_prep.checkpoint import Checkpoint, check_fit, shards
from finetune_prep.errors import FinetunePrepError, did_you_mean
from finetune_prep.model.describe import BuiltModel, describe, init_on_meta
from finetune_prep.model.heads import fresh_head, set_module
from finetune_prep.model.stages import derive_layers, derive_stages, override_stages
from finetune_prep.plan.table import ParamTable, covers

DEFAULT_CLASS = "AutoModelForImageClassification"
TEXT_LENGTH = 16  # tokens per sequence of the proof's batch for a text model
LAYER_LISTS = ("layer", "layers", "stages", "blocks", "block", "h")  # names of layer lists
# Trainer decays every weight but biases and norms; these tokens and tables are excluded by the
# ViT/DeiT/Swin/DINOv2 recipes (the names of timm's no_weight_decay() in transformers' models)
NO_WEIGHT_DECAY = ("cls_token", "position_embeddings", "mask_token", "register_tokens",
                   "distillation_token", "relative_position_bias_table")


def resolve(arch: str) -> Path:
    """The folder of `model.arch`: a local folder with config.json, or the cached snapshot of a
    model id (never downloaded); a clear error saying where it was looked for."""
    path = Path(os.path.expanduser(str(arch)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FinetunePrepError(
                f"model.arch={arch} is a folder without config.json: give the folder that "
                "save_pretrained wrote (config.json beside the weights).")
        return path
    if path.exists():
        raise FinetunePrepError(f"model.arch={arch} is a file; for model.source=hf give the "
                                "model's folder (with config.json) or a model id.")
    return _cached(str(arch))


def _cached(model_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    looked = f"{os.path.abspath(model_id)} (a folder) and the Hugging Face cache " \
             f"{constants.HF_HUB_CACHE}"
    if model_id.count("/") > 1 or model_id.startswith((".", "/", "~")):
        raise FinetunePrepError(
            f"model.arch={model_id} not found: there is no folder {os.path.abspath(model_id)} "
            "(and a path is no model id, which reads org/name). Give the folder that "
            "save_pretrained wrote (config.json beside the weights).")
    try:
        folder = Path(snapshot_download(model_id, local_files_only=True))
    except Exception as err:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        raise FinetunePrepError(
            f"model.arch={model_id} not found: looked for {looked}, and finetune_prep never "
            "downloads. On a machine with network run `huggingface-cli download "
            f"{model_id}` (or save_pretrained) and copy the folder here; give its path as "
            "model.arch, or set HF_HUB_CACHE to the cache that holds it.") from err
    if not (folder / "config.json").is_file():
        raise FinetunePrepError(f"model.arch={model_id}: the cached snapshot {folder} has no "
                                "config.json; download the model again.")
    return folder


def build(model_cfg: Any, head_cfg: Any, num_outputs: int, meta: bool) -> BuiltModel:
    """Build `model.arch` from its config with a `num_outputs`-label head (see module doc)."""
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise FinetunePrepError(
            "model.source=hf needs transformers: pip install 'finetune_prep[hf]'.") from err
    folder = resolve(model_cfg.arch)
    config = load_config(folder, num_outputs, dict(model_cfg.get("kwargs") or {}))
    cls = model_class(str(model_cfg.get("hf_class") or DEFAULT_CLASS), config)
    with _quiet(), init_on_meta() if meta else nullcontext(), _no_init() if meta else nullcontext():
        model = _instantiate(cls, config, model_cfg)
    table = _table(model, model_cfg, head_cfg, num_outputs, meta)
    size = tuple(model_cfg.input_size) if model_cfg.get("input_size") else image_size(config)
    tokens = size is None and getattr(config, "vocab_size", None)
    return BuiltModel(model, table, "hf", str(model_cfg.arch), num_outputs,
                      (TEXT_LENGTH,) if tokens else size, folder=str(folder),
                      make_batch=_token_batch(config) if tokens else None)


def _table(model: nn.Module, model_cfg: Any, head_cfg: Any, num_outputs: int,
           meta: bool) -> ParamTable:
    """Head, stages, layer ids and no-decay names of a built model."""
    head = _head(model, head_cfg, num_outputs, meta)
    stages = _stages(model, model_cfg, head)
    layers = derive_layers(model, head, _layer_stages(model, stages))
    nwd = frozenset(n for n, _ in model.named_parameters()
                    if n.rpartition(".")[2] in NO_WEIGHT_DECAY)
    return describe(model, head, stages, layers, nwd)


def _token_batch(config: Any) -> Callable[[int, Any], Any]:
    """The proof's input for a text model: random token ids (1 .. vocab_size-1)."""
    import torch

    def make(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        if batch_size > 1 and getattr(config, "pad_token_id", None) is None:
            raise FinetunePrepError(
                f"the proof's batch of {batch_size} sequences needs a pad_token_id in "
                "config.json (transformers classifies each sequence at its last non-pad "
                "token): set +model.kwargs.pad_token_id=ID, or verify.batch_size=1.")
        return torch.randint(1, config.vocab_size, (batch_size, TEXT_LENGTH),
                             generator=generator)

    return make


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' notices (num_labels vs id2label, init warnings) stay out of the summary."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _no_init() -> Any:
    """transformers' switch for its weight init (random values on meta are no values at all;
    skipping it saves 0.25 s on a 7B model)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return nullcontext()
    return no_init_weights()


def load_config(folder: Path, num_outputs: int, kwargs: dict[str, Any]) -> Any:
    """The folder's config with `num_labels` (and model.kwargs) set; never runs remote code."""
    from transformers import AutoConfig

    try:
        with _quiet():
            config, unused = AutoConfig.from_pretrained(
                str(folder), num_labels=num_outputs, return_unused_kwargs=True,
                local_files_only=True, trust_remote_code=False, **kwargs)
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fix = ("it needs the folder's own Python code (trust_remote_code), which "
               "finetune_prep never runs" if "trust_remote_code" in str(err) or "auto_map"
               in str(err) else "check that it is a transformers config.json")
        raise FinetunePrepError(
            f"model.arch={folder}: config.json could not be read ({text[:160]}): {fix}."
        ) from err
    if unused:
        raise FinetunePrepError(
            f"model.kwargs ({', '.join(unused)}) are not fields of {type(config).__name__}: "
            "for model.source=hf they override config.json's values; check the names there.")
    return config


def model_class(name: str, config: Any) -> Any:
    """The transformers class `model.hf_class` names (an Auto class or a model class)."""
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):
        autos = [n for n in dir(transformers) if n.startswith("AutoModelFor")]
        raise FinetunePrepError(
            f"model.hf_class={name!r} is not a transformers model class.{did_you_mean(name, autos)}"
            f" For this config: {', '.join(_fitting_autos(config)) or 'see transformers docs'}.")
    return cls


def _fitting_autos(config: Any) -> list[str]:
    """The Auto classes that can build a model of this config's type."""
    import transformers

    found = []
    for name in dir(transformers):
        if name.startswith("AutoModelFor"):
            try:
                mapping = getattr(transformers, name)._model_mapping._model_mapping
            except Exception:  # a lazy or missing Auto class: not a candidate
                continue
            if getattr(config, "model_type", None) in mapping:
                found.append(name)
    return sorted(found, key=lambda n: "Classification" not in n)  # classifiers first


def _instantiate(cls: Any, config: Any, model_cfg: Any) -> nn.Module:
    try:
        if hasattr(cls, "from_config"):  # an Auto class
            return cls.from_config(config, trust_remote_code=False)
        wanted = getattr(cls, "config_class", None)
        if isinstance(wanted, type) and not isinstance(config, wanted):
            raise ValueError(f"Unrecognized configuration class {type(config).__name__} for "
                             f"{cls.__name__} (it takes a {wanted.__name__})")
        return cls._from_config(config)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):
            raise
        fitting = _fitting_autos(config)
        hint = (f" Classes that can: {', '.join(fitting[:6])}; e.g. "
                f"model.hf_class={fitting[0]}." if fitting else "")
        raise FinetunePrepError(
            f"model.hf_class={model_cfg.get('hf_class') or DEFAULT_CLASS} cannot build a "
            f"{config.model_type!r} model (config.json of {model_cfg.arch}).{hint}") from err


def image_size(config: Any) -> tuple[int, ...] | None:
    """(C, H, W) of an image model's input from its config; None for text models."""
    channels = getattr(config, "num_channels", None)
    if channels is None:
        return None
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return int(channels), int(h), int(w)


def _head(model: nn.Module, head_cfg: Any, num_outputs: int, meta: bool) -> tuple[str, ...]:
    """The classifier: the Linear with `num_outputs` outputs outside the base model (built with
    num_labels already), or `head.module` (replaced by a fresh Linear if its size differs)."""
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if head_cfg.get("module"):
        name = str(head_cfg.module)
        if not isinstance(modules.get(name), nn.Linear):
            raise FinetunePrepError(
                f"head.module={name!r} is not an nn.Linear of this model."
                f"{did_you_mean(name, linears)} Its last Linear layers: {', '.join(linears[-5:])}.")
        if modules[name].out_features != num_outputs:
            with init_on_meta() if meta else nullcontext():
                set_module(model, name, fresh_head(modules[name], num_outputs))
        return (name,)
    base = getattr(model, "base_model_prefix", "") or "\0"
    outside = [n for n in linears if not covers(base, n)]
    fitting = [n for n in outside if modules[n].out_features == num_outputs]
    if fitting or outside or linears:
        return ((fitting or outside or linears)[-1],)
    raise FinetunePrepError("found no head: the model has no nn.Linear; check model.hf_class "
                            "(e.g. AutoModelForImageClassification) or name it with head.module.")


def _stages(model: nn.Module, model_cfg: Any, head: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    if model_cfg.get("stages"):
        return override_stages(model, model_cfg.stages, head)
    found = derive_hf_stages(model, head)
    return found if found else tuple(tuple(s) for s in derive_stages(model, head))


def layer_list(model: nn.Module, head: Sequence[str]) -> str | None:
    """The model's own list of layers: the outermost ModuleList named like `layers`, `layer`,
    `stages`, `blocks` that holds the most parameters (not in the head)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or name.rpartition(".")[2] not in LAYER_LISTS:
            continue
        if len(module) < 1 or any(covers(h, name) for h in head):
            continue
        if best is not None and covers(best, name):
            continue  # a list inside the one already found (swin's layers.N.blocks)
        count = sum(p.numel() for p in module.parameters())
        if count > best_count:
            best, best_count = name, count
    return best


def derive_hf_stages(model: nn.Module, head: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Stem (everything before the layer list, e.g. the embeddings), one stage per layer of
    the list, with what follows the list (a final norm, a pooler) joining the last; () when
    the model has no layer list."""
    found = layer_list(model, head)
    if found is None:
        return ()
    items = [f"{found}.{i}" for i, m in enumerate(model.get_submodule(found))
             if any(True for _ in m.parameters())]
    params = [n for n, _ in model.named_parameters() if not any(covers(h, n) for h in head)]
    first = next(i for i, n in enumerate(params) if covers(found, n))
    last = max(i for i, n in enumerate(params) if covers(found, n))
    stem = _cover(model, params[:first], head)
    tail = _cover(model, params[last + 1:], head)
    stages = ([tuple(stem)] if stem else []) + [(i,) for i in items]
    if tail:
        stages[-1] = (*stages[-1], *tail)
    return tuple(stages)


def _cover(model: nn.Module, params: Sequence[str], head: Sequence[str]) -> list[str]:
    """The fewest module/parameter names that cover exactly `params` (and no head)."""
    keep = set(params)
    all_params = [n for n, _ in model.named_parameters()]
    out: list[str] = []
    for name in params:
        if any(covers(o, name) for o in out):
            continue
        scope, parts = name, name.split(".")
        for end in range(1, len(parts)):
            candidate = ".".join(parts[:end])
            under = [n for n in all_params if covers(candidate, n)]
            if all(n in keep for n in under) and not any(covers(h, candidate) or
                                                         covers(candidate, h) for h in head):
                scope = candidate
                break
        out.append(scope)
    return out


def _layer_stages(model: nn.Module, stages: Sequence[Sequence[str]]) -> list[list[str]]:
    """The stages as layer decay counts blocks in them: a stage holding a list of blocks
    (convnext's stages.N.layers, swin's layers.N.blocks) is opened to its parts, so each block
    is a layer and a downsampling layer joins the next block."""
    modules = dict(model.named_modules())
    out = []
    for stage in stages:
        entries: list[str] = []
        for name in stage:
            module = modules.get(name)
            kids = [f"{name}.{c}" for c, m in (module.named_children() if module else [])
                    if any(True for _ in m.parameters())]
            opens = module is not None and any(
                isinstance(modules[k], nn.ModuleList) for k in kids)
            entries += kids if opens else [name]
        out.append(entries)
    return out


# --------------------------------------------------------------------------- weights


def folder_weights(folder: str | None) -> str | None:
    """The weights file or shard index in a model folder, or None (config only)."""
    if not folder:
        return None
    found = shards.resolve_folder(folder)
    return found if found and found != folder else None


def rename_keys(ckpt: Checkpoint, model: nn.Module) -> Checkpoint:
    """The checkpoint with its keys renamed as `from_pretrained` would: transformers'
    conversion mapping (legacy names such as `encoder.layer.N.attention.attention.query`)
    and the base-model prefix added or removed. A copy; `ckpt` is not changed."""
    meta = dict.fromkeys(model.state_dict(), True)
    if all(k in meta for k in ckpt.tensors):
        return ckpt  # already the model's names (building the mapping costs 0.3 s)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older transformers: its names are the checkpoint's names
        return ckpt
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    names: dict[str, str] = {}
    for key in ckpt.tensors:
        new, converted = rename_source_key(key, renamings, converters, prefix, meta)
        if converted is not None:
            raise FinetunePrepError(
                f"checkpoint {ckpt.path}: {key} needs transformers' weight conversion "
                f"({converted}), which merges or splits tensors; finetune_prep plans only "
                "checkpoints whose tensors map one to one. Re-save it with this transformers "
                "(save_pretrained) and try again.")
        names[key] = new
    if all(k == v for k, v in names.items()):
        return ckpt
    if len(set(names.values())) < len(names):
        return ckpt  # renaming would merge keys: leave them for check_fit to report
    changed = sum(k != v for k, v in names.items())
    example = next(f"{k} -> {v}" for k, v in names.items() if k != v)
    return dataclasses.replace(
        ckpt,
        tensors={names[k]: t for k, t in ckpt.tensors.items()},
        stored={names[k]: v for k, v in ckpt.stored.items()},
        outside=[names.get(k, k) for k in ckpt.outside],
        steps=[*ckpt.steps, f"renamed {changed} keys as transformers' from_pretrained does "
                            f"(e.g. {example})"],
    )


def read_folder(
    built: BuiltModel, checkpoint_cfg: Any, read: Any, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[Checkpoint, Any] | None:
    """The model folder's own weights (single or sharded), renamed and fitted to the model;
    None when the folder holds none. `read` opens a checkpoint (the runner's cached reader)."""
    file = folder_weights(built.folder)
    if file is None:
        return None
    ckpt = rename_keys(read(file), built.model)
    head = built.table.head
    exclude, note = unfit_head(ckpt, shapes, head)
    if checkpoint_cfg.exclude_head:
        exclude = tuple(head)
    if note:
        ckpt = dataclasses.replace(ckpt, steps=[*ckpt.steps, note])
    fit = check_fit({k: tuple(v.shape) for k, v in ckpt.tensors.items()}, shapes,
                    strict=checkpoint_cfg.strict, exclude=exclude,
                    source=f"model.arch={built.arch}", outside=ckpt.outside)
    return ckpt, fit


def unfit_head(
    ckpt: Checkpoint, shapes: Mapping[str, tuple[int, ...]], head: Sequence[str]
) -> tuple[tuple[str, ...], str | None]:
    """The head and a note, if any of its tensors is missing from the checkpoint or has another
    shape: it stays freshly initialised (transformers' `ignore_mismatched_sizes=True`)."""
    keys = [k for k in shapes if any(covers(h, k) for h in head)]
    if all(k in ckpt.tensors and tuple(ckpt.tensors[k].shape) == shapes[k] for k in keys):
        return (), None
    wrong = [k for k in keys if k in ckpt.tensors and tuple(ckpt.tensors[k].shape) != shapes[k]]
    if wrong:
        k = wrong[0]
        why = f"checkpoint {list(ckpt.tensors[k].shape)}, model {list(shapes[k])}"
    else:
        why = "not in the checkpoint"
    return tuple(head), (f"head {'+'.join(head)} left fresh ({why}), as transformers' "
                         "ignore_mismatched_sizes=True does")
