"""The pipeline, one direction: config -> model -> checkpoint -> rules -> groups -> verify ->
report -> files. `prepare` serves the Python API, `run` the CLI."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from finetune_prep import cache, paramfile, provenance
from finetune_prep.atomic import write_atomic
from finetune_prep.checkpoint import Checkpoint, Fit, check_fit, load_into, read_checkpoint
from finetune_prep.config import Config
from finetune_prep.errors import FinetunePrepError
from finetune_prep.groups import build_groups, describe_stages
from finetune_prep.models import BuiltModel, ParamTable, build_model, torchvision_weights_file
from finetune_prep.report import render
from finetune_prep.rules import FreezePlan, evaluate, parse_rules
from finetune_prep.verify import memory_estimate, prove

log = logging.getLogger("finetune_prep")
BN_STATS = ("eval", "train")


@dataclass
class Source:
    """One checkpoint read and fitted to the model."""

    label: str  # "model.weights" or "checkpoint.path"
    checkpoint: Checkpoint
    fit: Fit


@dataclass
class Prepared:
    """A model ready to fine-tune and everything known about the plan."""

    model: nn.Module
    table: ParamTable
    document: dict[str, Any]  # the content of param_groups.json
    summary: str
    notes: list[str] = field(default_factory=list)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups as in the file (parameter names, lr, weight_decay)."""
        return self.document["groups"]

    @property
    def eval_modules(self) -> list[str]:
        return self.document["eval_modules"]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The groups with tensors, ready for torch.optim."""
        return paramfile.tensor_groups(self.model, self.param_groups)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer on the groups."""
        return _optimizer_factory(self.document["optimizer"])(self.optimizer_groups())

    def train_mode(self) -> nn.Module:
        """model.train() with the frozen norm layers kept in eval mode."""
        return paramfile.train_mode(self.model, self.eval_modules)


def to_config(cfg: Any) -> DictConfig:
    """Merge a DictConfig or plain dict onto the schema; fail clearly on bad keys or types."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        OmegaConf.to_object(merged)  # raises on a required value left as ???
    except OmegaConfBaseException as err:
        raise FinetunePrepError(f"invalid config: {err}") from err
    return merged


def prepare(
    cfg: Any,
    *,
    materialize: bool = True,
    verify: bool | None = None,
    overrides: Sequence[str] = (),
    config_dirs: Sequence[str] = (),
) -> Prepared:
    """Build, load, freeze and plan. `materialize=False` keeps the model on the meta device."""
    cfg = to_config(cfg)
    built = cache.build_meta_model(cfg.model, cfg.head)  # a fresh meta copy per call
    do_verify = _should_verify(cfg, built.table, verify)
    sources = _read_sources(cfg, built, reuse=not (materialize or do_verify))
    freeze = evaluate(parse_rules(cfg.freeze.rules), built.table)
    trainable = [n for n in built.table.names if freeze.trainable[n]]
    _set_trainable(built.model, trainable)
    groups = build_groups(built.table, trainable, cfg.optim)
    _check_optimizer(built.model, groups, cfg.optim.optimizer)
    eval_modules, notes = _norm_stats(built.table, freeze, cfg.freeze.bn_stats)
    notes += [f"{rule} has no effect: later rules override every parameter it selects"
              for rule in freeze.shadowed]
    notes += [f"{rule} selects nothing on {built.arch}" for rule in freeze.empty]
    model = built.model
    if materialize or do_verify:
        model = _materialize(cfg, built, sources, trainable)
    verified = _verify(cfg, built, model, groups, eval_modules, do_verify, keep=materialize)
    document = _document(cfg, built, sources, freeze, groups, eval_modules, verified,
                         provenance.record(OmegaConf.to_yaml(cfg), overrides, config_dirs))
    notes += _verify_notes(verified)
    summary = render(document, built.table, freeze.trainable, cfg.report.grouped, notes)
    return Prepared(model, built.table, document, summary, notes)


def run(
    cfg: DictConfig, output_dir: Path, overrides: Sequence[str] = (),
    config_dirs: Sequence[str] = (),
) -> Path:
    """The CLI's job: plan on the meta device, write trainability.txt and param_groups.json."""
    prepared = prepare(cfg, materialize=False, overrides=overrides, config_dirs=config_dirs)
    for line in prepared.summary.splitlines():
        if line:
            log.info(line)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / "param_groups.json"
    # the plan first: if it cannot be written, an earlier run's summary stays beside its plan
    write_atomic(target, paramfile.dumps(prepared.document))
    write_atomic(output_dir / "trainability.txt", prepared.summary)
    log.info("Wrote %s", target)
    return target


def _read_sources(cfg: DictConfig, built: BuiltModel, reuse: bool = False) -> list[Source]:
    """Open and fit each checkpoint: torchvision weights first, then checkpoint.path.
    `reuse`: take an opened checkpoint from the process cache (only when no weights are loaded,
    so no job ever gets tensors another job may have changed)."""
    read = cache.read_checkpoint if reuse else read_checkpoint
    shapes = {k: tuple(v.shape) for k, v in built.model.state_dict().items()}
    sources = []
    if cfg.model.weights:
        if built.source != "torchvision":
            raise FinetunePrepError(
                f"model.weights is for torchvision models; for model.source={built.source} "
                "give pretrained weights as checkpoint.path=FILE (nothing is downloaded)."
            )
        path = torchvision_weights_file(built.arch, cfg.model.weights)
        ckpt = read(path)
        fit = check_fit(_shapes(ckpt), shapes, strict=True, exclude=built.table.head,
                        source=f"model.weights={cfg.model.weights}")
        sources.append(Source("model.weights", ckpt, fit))
    if cfg.checkpoint.path:
        c = cfg.checkpoint
        ckpt = read(c.path, key=c.key, prefix=c.prefix)
        exclude = built.table.head if c.exclude_head else ()
        fit = check_fit(_shapes(ckpt), shapes, strict=c.strict, exclude=exclude,
                        source=f"checkpoint.path={c.path}", outside=ckpt.outside)
        sources.append(Source("checkpoint.path", ckpt, fit))
    for s in sources:
        for step in s.checkpoint.steps:
            log.info("%s: %s", s.label, step)
    return sources


def _shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in ckpt.tensors.items()}


def _set_trainable(model: nn.Module, trainable: Sequence[str]) -> None:
    keep = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def _optimizer_factory(spec: Any) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(spec, _partial_=True)
    except Exception as err:
        raise FinetunePrepError(f"optim.optimizer cannot be built: {err}") from err


def _check_optimizer(model: nn.Module, groups: list[dict], spec: Any) -> None:
    """Construct the optimizer now, so a wrong argument fails here and not on the cluster."""
    if not groups:
        return
    factory = _optimizer_factory(spec)
    try:
        factory(paramfile.tensor_groups(model, groups))
    except (TypeError, ValueError) as err:
        raise FinetunePrepError(
            f"optim.optimizer ({spec.get('_target_')}) rejects its arguments: {err}"
        ) from err


def _norm_stats(table: ParamTable, freeze: FreezePlan, bn_stats: str) -> tuple[list[str], list]:
    """Frozen layers with running statistics: kept in eval mode, or a warning if not."""
    if bn_stats not in BN_STATS:
        raise FinetunePrepError(f"freeze.bn_stats={bn_stats!r}: use eval or train.")
    frozen = [
        m for m in table.module_types
        if m in table.stat_modules
        and (own := [n for n in table.names if table.owner[n] == m])
        and not any(freeze.trainable[n] for n in own)
    ]
    if bn_stats == "eval":
        return frozen, []
    if not frozen:
        return [], []
    return [], [f"freeze.bn_stats=train: {len(frozen)} frozen norm layers (e.g. {frozen[0]}) "
                "will still update their running statistics in train mode; "
                "set freeze.bn_stats=eval to keep them fixed"]


def _should_verify(cfg: DictConfig, table: ParamTable, verify: bool | None) -> bool:
    if verify is not None:
        return verify
    if cfg.verify.backward is not None:
        return bool(cfg.verify.backward)
    return sum(table.numel(n) for n in table.names) <= cfg.verify.max_params


def _materialize(
    cfg: DictConfig, built: BuiltModel, sources: list[Source], trainable: Sequence[str]
) -> nn.Module:
    """Real tensors: checkpoint data loaded (mmap + assign), fresh layers initialised."""

    def rebuild() -> nn.Module:
        return build_model(cfg.model, cfg.head, meta=False).model

    if not sources:
        model = rebuild()
    else:
        model = built.model
        for s in sources:
            load_into(model, s.checkpoint, s.fit, rebuild)
    _set_trainable(model, trainable)
    return model


def _verify(
    cfg: DictConfig, built: BuiltModel, model: nn.Module, groups: list[dict],
    eval_modules: list[str], do_verify: bool, keep: bool,
) -> dict[str, Any]:
    """Run the proof on `model` (on a copy of it if the caller keeps the model)."""
    if not do_verify:
        reason = ("verify.backward=false" if cfg.verify.backward is False
                  else f"model above verify.max_params={cfg.verify.max_params:,}"
                  if cfg.verify.backward is None else "not requested")
        return {"backward": False, "reason": reason}
    if built.input_size is None:
        return {"backward": False, "reason": "input size unknown: set model.input_size=[C,H,W]"}
    if not groups:
        return {"backward": False, "reason": "nothing trains"}
    model = copy.deepcopy(model) if keep else model
    paramfile.train_mode(model, eval_modules)
    return prove(model, paramfile.tensor_groups(model, groups),
                 _optimizer_factory(cfg.optim.optimizer), built.input_size,
                 cfg.verify.batch_size, cfg.verify.seed)


def _verify_notes(verified: dict[str, Any]) -> list[str]:
    if not verified.get("backward") or verified["ok"]:
        return []
    return ["the verification step found problems (see Verified above): fix the rules or the "
            "model before training"]


def _document(
    cfg: DictConfig, built: BuiltModel, sources: list[Source], freeze: FreezePlan,
    groups: list[dict], eval_modules: list[str], verified: dict, prov: dict,
) -> dict[str, Any]:
    table = built.table
    trainable = sum(table.numel(n) for n in table.names if freeze.trainable[n])
    total = sum(table.numel(n) for n in table.names)
    return {
        "format": paramfile.FORMAT,
        "model": {"source": built.source, "arch": built.arch, "num_outputs": built.num_outputs,
                  "head": table.head[0], "heads": list(table.head),
                  "stages": describe_stages(table)},
        "checkpoint": _checkpoint_block(sources, built.model),
        "counts": {"total": total, "trainable": trainable, "frozen": total - trainable},
        "groups": groups,
        "frozen": [n for n in table.names if not freeze.trainable[n]],
        "eval_modules": eval_modules,
        "optimizer": OmegaConf.to_container(cfg.optim.optimizer, resolve=True),
        "verified": verified,
        "memory": memory_estimate(table, [n for n in table.names if freeze.trainable[n]],
                                  cfg.optim.optimizer),
        "rules": {n: freeze.decided_by[n] for n in table.names},
        "provenance": prov,
    }


def _checkpoint_block(sources: list[Source], model: nn.Module) -> dict[str, Any]:
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    blocks = [_source_block(s, dtypes) for s in sources]
    last = blocks[-1] if blocks else {"path": None, "unwrapped": [], "missing": [],
                                      "unexpected": [], "skipped": [], "excluded": [],
                                      "loaded": 0}
    return {**last, "sources": blocks}


def _source_block(s: Source, model_dtypes: dict[str, torch.dtype]) -> dict[str, Any]:
    stored = {k: s.checkpoint.tensors[k].dtype for k in s.fit.loaded}
    casts = Counter(f"{d} -> {model_dtypes[k]}".replace("torch.", "")
                    for k, d in stored.items() if d != model_dtypes.get(k, d))
    return {
        "path": s.checkpoint.path,
        "from": s.label,
        "format": s.checkpoint.format,
        "unwrapped": list(s.checkpoint.steps),
        "loaded": len(s.fit.loaded),
        "missing": list(s.fit.missing),
        "unexpected": list(s.fit.unexpected),
        "outside": list(s.fit.outside),
        "skipped": [{"key": k, "checkpoint": list(a), "model": list(b)}
                    for k, a, b in s.fit.skipped],
        "excluded": list(s.fit.excluded),
        "dtypes": dict(Counter(str(d).removeprefix("torch.") for d in stored.values())),
        "cast": dict(casts),
    }
