"""The pipeline, one direction: config -> model -> checkpoint -> rules -> groups -> verify ->
report -> files. `prepare` serves the Python API, `run` the CLI."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune_prep import paramfile
from finetune_prep.app import assemble, cache, proof, provenance, rulesfile
from finetune_prep.app.report import render
from finetune_prep.atomic import write_files
from finetune_prep.checkpoint import (
    Checkpoint,
    Fit,
    check_fit,
    fit_prefixes,
    load_into,
    read_checkpoint,
)
from finetune_prep.config import (
    BnStats,
    Config,
    FreezeStart,
    Origin,
    config_text,
    origin_of,
    validate,
)
from finetune_prep.errors import FinetunePrepError
from finetune_prep.model import adapters, hf
from finetune_prep.model.build import build_architecture, torchvision_weights_file
from finetune_prep.model.describe import BuiltModel
from finetune_prep.paramfile.format import Group, Plan
from finetune_prep.plan.groups import build_groups
from finetune_prep.plan.memory import check_memory
from finetune_prep.plan.phases import plan_phases
from finetune_prep.plan.rules import (
    FreezePlan,
    evaluate,
    frozen_stat_layers,
    model_start,
)
from finetune_prep.plan.table import ParamTable
from finetune_prep.train import apply, wrappers

log = logging.getLogger("finetune_prep")

PARAM_FILE = "param_groups.json"  # the plan a run writes
SUMMARY_FILE = "trainability.txt"  # its summary, as the console showed it


@dataclass
class Source:
    """One checkpoint read and fitted to the model."""

    label: str  # "model.weights" or "checkpoint.path"
    checkpoint: Checkpoint
    fit: Fit


@dataclass
class Prepared:
    """A model ready to fine-tune and everything known about the plan."""

    model: nn.Module  # real weights with materialize=True, else on the meta device
    table: ParamTable
    document: dict[str, Any]  # the content of param_groups.json
    report: str  # the summary without its warnings
    notes: list[str] = field(default_factory=list)  # the warnings

    @property
    def summary(self) -> str:
        """The summary text as trainability.txt keeps it: the report, then the warnings."""
        return self.report + "".join(f"\nWARNING: {n}" for n in self.notes) + (
            "\n" if self.notes else "")

    @property
    def plan(self) -> Plan:
        """The typed plan (what `finetune_prep.load_plan` reads back from the saved file)."""
        return Plan.from_document(self.document, "the prepared plan")

    def save(self, folder: str | os.PathLike, dirs: Mapping[Path, Path] | None = None) -> Path:
        """Write param_groups.json and trainability.txt into `folder`, all or nothing, as the
        CLI does (`dirs`: staged folders moved in with them); the plan file's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / PARAM_FILE
        write_files({target: paramfile.dumps(self.document),
                     folder / SUMMARY_FILE: self.summary}, dirs=dirs)
        return target

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups as in the file (parameter names, lr, weight_decay)."""
        return self.document["groups"]

    @property
    def eval_modules(self) -> list[str]:
        return self.document["eval_modules"]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The groups with tensors, ready for torch.optim."""
        return apply.tensor_groups(self.model, [Group.of(g) for g in self.param_groups])

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer on the groups."""
        return proof.optimizer_factory(self.document["optimizer"])(self.optimizer_groups())

    def train_mode(self) -> nn.Module:
        """model.train() with the frozen norm layers kept in eval mode."""
        return apply.set_train_mode(self.model, self.eval_modules)


def prepare(
    cfg: Any,
    *,
    materialize: bool = True,
    verify: bool | None = None,
    overrides: Sequence[str] | None = None,
    config_dirs: Sequence[str] | None = None,
    rerun: str | None = None,
) -> Prepared:
    """Build, load, freeze and plan. `materialize=False` returns the model on the meta device;
    the proof (if it runs) always works on its own materialized copy. The provenance records
    `overrides`, the git state of `config_dirs` and `rerun`; left out, they are what
    `compose()` recorded for this config object, so the API records what the CLI does."""
    origin = _origin(cfg, overrides, config_dirs, rerun)
    git = provenance.git_states_soon(origin.config_dirs)  # in a thread, while the model builds
    cfg = validate(cfg)
    rules, rules_file = rulesfile.freeze_rules(cfg.freeze)  # a rules file is read and checked
    base = cache.build_meta_model(cfg.model, cfg.head)  # this call's own meta model
    reuse = not (materialize or proof.should_verify(cfg.verify, base.table, verify))
    sources = _read_sources(cfg, base, reuse=reuse)  # weights fit the base model
    adapted = _adapt(cfg, base)  # peft's adapters (on a copy: sources load into `base`)
    built = adapted.built if adapted else base
    do_verify = proof.should_verify(cfg.verify, built.table, verify)
    if adapted:
        start = _peft_start(built, cfg)  # what peft made trainable
    elif cfg.freeze.start == FreezeStart.model:
        start = model_start(built.table)  # what the model's constructor froze
    else:
        start = None
    freeze = evaluate(rules, built.table, start)
    trainable = [n for n in built.table.names if freeze.trainable[n]]
    _set_trainable(built.model, trainable)
    groups = build_groups(built.table, trainable, cfg.optim)
    _check_optimizer(built.model, groups, cfg.optim.optimizer)
    eval_modules, notes = _norm_stats(built.table, freeze, cfg.freeze.bn_stats)
    notes += list(built.notes) + _model_frozen_notes(built.table, cfg.freeze.start)
    notes += [f"{rule} has no effect: later rules override every parameter it selects"
              for rule in freeze.shadowed]
    notes += [f"{rule} selects nothing on {built.arch}" for rule in freeze.empty]
    phases = plan_phases(built.table, freeze, cfg.freeze.schedule, cfg.optim)
    phase_eval = [_norm_stats(built.table, p.plan, cfg.freeze.bn_stats)[0] for p in phases]
    last = phases[-1].plan if phases else freeze  # the proof covers the last phase
    last_trainable = [n for n in built.table.names if last.trainable[n]]
    proof_groups = groups + [g for p in phases for g in p.groups]
    proof_eval = phase_eval[-1] if phases else eval_modules
    proof_bytes = None
    if proof.skip_reason(cfg.verify, built, do_verify, proof_groups, verify) is None:  # before any
        proof_bytes = proof.check_fits(  # real tensor: the caller's model, the proof's copy
            cfg.verify, built, last_trainable, cfg.optim.optimizer,
            proof_eval, copies=2 if materialize else 1)
    def real() -> nn.Module:
        model = _materialize_model(cfg, base, sources, trainable if not adapted else ())
        if adapted:
            model = _adapt_real(cfg, model, adapted)
            _set_trainable(model, trainable)
        return model

    model = real() if materialize else (adapted.peft_model if adapted else built.model)

    def proof_model() -> nn.Module:
        copy_ = copy.deepcopy(model) if materialize else real()
        _set_trainable(copy_, last_trainable)
        return wrappers.bare_model(copy_)  # a PeftModel's inner model (the plan's names)

    verified = proof.run_proof(cfg.verify, built, do_verify, proof_groups, proof_eval,
                               cfg.optim.optimizer, proof_model, requested=verify)
    if phases:
        verified["phase"] = phases[-1].index
    if proof_bytes is not None:
        verified["memory_bytes"] = proof_bytes  # what the proof was estimated to hold at once
    document = assemble.document(
        built, sources, freeze, groups, eval_modules, cfg.optim.optimizer, verified,
        provenance.record(config_text(cfg), origin.overrides, git(),
                          origin.rerun, rules_file.record() if rules_file else None),
        model_cfg=cfg.model,
        phases=list(zip(phases, phase_eval, strict=True)),
        adapter=adapted.record if adapted else None, heads=base.table.head,
    )
    notes += proof.notes(verified)
    report = render(document, built.table, freeze.trainable, cfg.report.grouped)
    if adapted:
        report += "\n" + adapter_summary(adapted.record, built.table, freeze.trainable)
    return Prepared(model, built.table, document, report, notes)


def run(
    cfg: Any, output_dir: Path, overrides: Sequence[str] = (),
    config_dirs: Sequence[str] = (), dirs: Mapping[Path, Path] | None = None,
    rerun: str | None = None,
) -> Path:
    """The CLI's job: plan on the meta device, write trainability.txt and param_groups.json.
    `dirs`: staged folders moved into place with them (the run's pending .hydra)."""
    prepared = prepare(cfg, materialize=False, overrides=overrides, config_dirs=config_dirs,
                       rerun=rerun)
    failed = proof.failure(prepared.document["verified"])
    if failed:
        raise FinetunePrepError(
            f"the one-step proof failed: {failed}. Nothing was written. Fix the rules, the model "
            "or the checkpoint; verify.backward=false skips the proof (not recommended)."
        )
    for line in prepared.report.splitlines():
        log.info("%s", line)
    for note in prepared.notes:
        log.warning("%s", note)
    target = prepared.save(output_dir, dirs=dirs)
    log.info("Wrote %s", target)
    return target


def _origin(cfg: Any, overrides: Sequence[str] | None, config_dirs: Sequence[str] | None,
            rerun: str | None) -> Origin:
    """What the provenance records: the arguments given, else what compose() remembered."""
    known = origin_of(cfg) or Origin((), ())
    return Origin(
        tuple(known.overrides if overrides is None else overrides),
        tuple(known.config_dirs if config_dirs is None else config_dirs),
        known.rerun if rerun is None else rerun,
    )


def _read_sources(cfg: Config, built: BuiltModel, reuse: bool = False) -> list[Source]:
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
    if built.source == "hf" and not cfg.checkpoint.path:  # the model folder's own weights
        found = hf.read_folder(built, cfg.checkpoint, read, shapes)
        sources += [Source("model.arch", *found)] if found else []
    if cfg.checkpoint.path:
        c = cfg.checkpoint
        ckpt = fit_prefixes(read(c.path, key=c.key, prefix=c.prefix), shapes)
        if built.source == "hf":
            ckpt = hf.rename_keys(ckpt, built.model)
        exclude = built.table.head if c.exclude_head else ()
        fit = check_fit(_shapes(ckpt), shapes, strict=c.strict, exclude=exclude,
                        source=f"checkpoint.path={c.path}", outside=ckpt.outside)
        sources.append(Source("checkpoint.path", ckpt, fit))
    for s in sources:
        for step in s.checkpoint.steps:
            log.info("%s: %s", s.label, step)
    return sources


def _adapt(cfg: Config, base: BuiltModel) -> adapters.Adapted | None:
    """peft's adapters on a meta copy of the base model, and an adapter folder checked
    against them; None without adapters."""
    method = adapters.method_of(cfg.get("adapter"))
    if method == "none":
        return None
    meta = dataclasses.replace(base, model=copy.deepcopy(base.model))
    adapted = adapters.adapt(meta, cfg.adapter, meta=True)
    if cfg.adapter.resume:
        folder = adapters.check_folder(cfg.adapter.resume)
        adapters.check_matches(folder, adapters.folder_config(folder), adapted.config)
        count = adapters.check_weights(folder, adapted.peft_model)
        adapted.record["resume"] = {"path": str(folder), "tensors": count}
        log.info("adapter.resume: %s tensors of %s fit the adapters", count, folder)
    return adapted


def _adapt_real(cfg: Config, model: nn.Module, adapted: adapters.Adapted) -> nn.Module:
    """The same adapters on the loaded base model (real tensors), then the folder's weights."""
    peft_model = adapters.wrap(model, adapted.config, meta=False)
    if cfg.adapter.resume:
        adapters.load_weights(adapters.check_folder(cfg.adapter.resume), peft_model)
    return peft_model


def _peft_start(built: BuiltModel, cfg: Config) -> FreezePlan:
    """Where the freeze rules start with adapters: what peft made trainable (the adapters and
    modules_to_save), everything else frozen."""
    grads = dict(built.model.named_parameters())
    method = adapters.method_of(cfg.adapter)
    return FreezePlan({n: grads[n].requires_grad for n in built.table.names},
                      dict.fromkeys(built.table.names, f"adapter={method}"), ())


def adapter_summary(record: Mapping[str, Any], table: ParamTable,
                    trainable: Mapping[str, bool]) -> str:
    """The adapters in the summary: method, rank, and adapter parameters per stage."""
    params = set(record["params"])
    config = record["config"]
    per_stage = [(table.stage_label(i), table.count([n for n in table.stage_params(i)
                                                     if n in params]))
                 for i in range(len(table.stages))]
    head = table.count([n for n in table.head_params() if trainable[n]])
    layers = adapters.adapted_layers(record["params"], record["peft_type"])
    lines = [f"Adapters: {record['peft_type']} (peft) r={config.get('r', '-')} on "
             f"{len(layers)} layers: {table.count(list(params)):,} "
             f"adapter parameters, head {head:,} trainable"]
    lines += [f"  {label:<40} {n:>14,}" for label, n in per_stage if n]
    if record.get("resume"):
        lines.append(f"  resumed from {record['resume']['path']}")
    return "\n".join(lines)


def _shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in ckpt.tensors.items()}


def _set_trainable(model: nn.Module, trainable: Sequence[str]) -> None:
    """requires_grad as the plan says, by the plan's names (through a PeftModel's prefix)."""
    keep = set(trainable)
    for name, param in wrappers.named_parameters(model).items():
        param.requires_grad_(name in keep)


def _check_optimizer(model: nn.Module, groups: list[dict], spec: Any) -> None:
    """Construct the optimizer now, so a wrong argument fails here and not on the cluster."""
    if not groups:
        return
    factory = proof.optimizer_factory(spec)
    try:
        factory(apply.tensor_groups(model, [Group.of(g) for g in groups]))
    except Exception as err:  # the class is allowlisted: whatever it raises is about its args
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FinetunePrepError(
            f"optim.optimizer ({spec.get('_target_')}) rejects its arguments: {why}"
        ) from err


def _norm_stats(table: ParamTable, freeze: FreezePlan, bn_stats: BnStats) -> tuple[list[str], list]:
    """Frozen layers with running statistics: kept in eval mode, or a warning if not."""
    frozen = frozen_stat_layers(table, freeze.trainable)
    if bn_stats == BnStats.eval:
        return frozen, []
    if not frozen:
        return [], []
    return [], [f"freeze.bn_stats=train: {len(frozen)} frozen norm layers (e.g. {frozen[0]}) "
                "will still update their running statistics in train mode; "
                "set freeze.bn_stats=eval to keep them fixed"]


def _model_frozen_notes(table: ParamTable, start: FreezeStart) -> list[str]:
    """What the model's constructor froze, and whether the rules started from it."""
    frozen = [n for n in table.names if n in table.model_frozen]
    if not frozen:
        return []
    more = f" ... and {len(frozen) - 4} more" if len(frozen) > 4 else ""
    listing = ", ".join(frozen[:4]) + more
    if start == FreezeStart.model:
        return [f"the model's constructor froze {len(frozen)} parameters ({listing}); "
                "freeze.start=model: the rules started from that state"]
    return [f"the model's constructor froze {len(frozen)} parameters ({listing}); "
            "freeze.start=all ignores that (every parameter starts trainable): set "
            "freeze.start=model to keep them frozen"]


def _materialize_model(
    cfg: Config, built: BuiltModel, sources: list[Source], trainable: Sequence[str]
) -> nn.Module:
    """A model with real tensors: checkpoint data loaded (mmap + assign), fresh layers
    initialised. Works on a copy of the meta model, so `built.model` stays on meta."""

    def rebuild() -> nn.Module:
        return build_architecture(cfg.model, cfg.head, meta=False).model

    outputs = f"{built.num_outputs:,}" if built.num_outputs is not None else "its own"
    check_memory(built.table.count(), f"{built.arch} with head.num_outputs={outputs}")
    if not sources:
        model = rebuild()
    else:
        model = copy.deepcopy(built.model)
        for s in sources:
            load_into(model, s.checkpoint, s.fit, rebuild)
    _set_trainable(model, trainable)
    return model
