"""Prove the plan on a real backward pass before anything is written.

The proof runs one forward/backward pass on a small random batch and one optimizer step, then
checks that frozen parameters got no gradient and did not move, and that every trainable
parameter got a gradient (one that never does breaks DDP) and moved.

"Moved" is required of every trainable parameter whose gradient has a non-zero element: if the
step leaves it bit for bit as it was, the update underflowed (an lr too small for the weights'
float32 precision) and nothing would train. A parameter whose gradient is exactly zero on the
random batch (a dead ReLU unit, a bias just before a BatchNorm) cannot move in one step under an
optimizer without weight decay; it is listed under `trainable_zero_grad`, not failed.

Before any real tensor exists, `check_fits` runs the forward pass on the meta device (shapes only,
no memory) to count the activations, and refuses a proof that this machine's memory cannot hold.
The user's own optimizer config is trusted here and built through Hydra (`optimizer_factory`).
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from finetune_prep.errors import FinetunePrepError
from finetune_prep.model.describe import BuiltModel
from finetune_prep.paramfile.format import Group
from finetune_prep.plan.memory import human_bytes, physical_memory, state_copies
from finetune_prep.plan.table import ParamTable
from finetune_prep.train.apply import set_train_mode, tensor_groups


def prove(
    model: nn.Module,
    groups: list[dict[str, Any]],
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    input_size: Sequence[int],
    batch_size: int,
    seed: int,
    make_batch: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    task: str = "classification",
) -> dict[str, Any]:
    """One forward/backward/step on `model` (which it changes); return what was checked.

    `groups` are torch.optim groups of `model`'s own tensors; `make_batch` makes the input
    (token ids for a text model), else it is a random float batch of `input_size`. A detection
    model (`task`) gets the batch as a list of images with synthetic targets and returns its
    losses; a segmentation model returns a dict of outputs ('out', 'aux').
    """
    params = dict(model.named_parameters())
    non_finite = _non_finite(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = make_optimizer(groups)
    generator = torch.Generator().manual_seed(seed)
    batch = make_batch(batch_size, generator) if make_batch else \
        torch.randn(batch_size, *input_size, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    if task == "detection":
        losses = model(list(batch), detection_targets(model, batch, generator))
        sum(losses.values()).backward()
    else:
        _loss(model(batch)).backward()
    optimizer.step()
    frozen = [n for n, p in params.items() if not p.requires_grad]
    trainable = [n for n, p in params.items() if p.requires_grad]
    still = [n for n in trainable if params[n].grad is not None and _same(params[n], before[n])]
    zero_grad = [n for n in still if not bool(params[n].grad.any())]
    result = {
        "backward": True,
        "input": [batch_size, *input_size],
        "non_finite": non_finite,
        "frozen_with_grad": [n for n in frozen if params[n].grad is not None],
        "frozen_changed": [n for n in frozen if not _same(params[n], before[n])],
        "trainable_without_grad": [n for n in trainable if params[n].grad is None],
        "trainable_unchanged": [n for n in still if n not in zero_grad],
        "trainable_zero_grad": zero_grad,
        "non_finite_after_step": [n for n in _non_finite(model) if n not in non_finite],
    }
    result["ok"] = not any(result[k] for k in FAILURES)
    return result


FAILURES = {  # what makes the proof fail, in plain words
    "non_finite": "weights or buffers that hold NaN or Inf (check the checkpoint)",
    "frozen_with_grad": "frozen parameters that got a gradient",
    "frozen_changed": "frozen parameters that changed",
    "trainable_without_grad": "trainable parameters that got no gradient (unused: breaks DDP)",
    "trainable_unchanged": "trainable parameters that got a gradient but did not move (the update "
                           "underflows: raise optim.lr or the multipliers that lower it)",
    "non_finite_after_step": "parameters that became NaN or Inf after one step (lr too high?)",
}


def failure(verified: dict[str, Any]) -> str | None:
    """Why a proof that ran failed, naming the tensors; None when it passed or did not run."""
    if not verified.get("backward") or verified.get("ok"):
        return None
    parts = [f"{FAILURES[k]}: {_names(verified[k])}" for k in FAILURES if verified.get(k)]
    return "; ".join(parts)


def _names(names: Sequence[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _non_finite(model: nn.Module) -> list[str]:
    """Floating-point parameters and buffers with a NaN or Inf anywhere."""
    return [n for n, t in model.state_dict(keep_vars=True).items()
            if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN (a NaN weight that did not move is unchanged)."""
    if a.is_floating_point():
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0),
                                                                        b.nan_to_num(0.0)))
    return torch.equal(a, b)


def detection_targets(model: nn.Module, batch: torch.Tensor,
                      generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Two random boxes per image, labelled with class 1 (0 when the model has only the
    background class), with masks for Mask R-CNN and keypoints for Keypoint R-CNN: what a
    torchvision detection model needs to return its losses in train mode."""
    height, width = batch.shape[-2:]
    roi = getattr(model, "roi_heads", None)
    classes = _detection_classes(model)
    targets = []
    for _ in range(batch.shape[0]):
        x1 = torch.rand(2, generator=generator) * width / 2
        y1 = torch.rand(2, generator=generator) * height / 2
        size = torch.rand(2, generator=generator) / 4 + 0.25
        boxes = torch.stack([x1, y1, x1 + size * width, y1 + size * height], dim=1)
        target = {"boxes": boxes, "labels": torch.full((2,), 1 if classes > 1 else 0)}
        if getattr(roi, "mask_predictor", None) is not None:
            masks = torch.zeros(2, height, width, dtype=torch.uint8)
            for i, (a, b, c, d) in enumerate(boxes.long().tolist()):
                masks[i, b:d, a:c] = 1
            target["masks"] = masks
        if getattr(roi, "keypoint_predictor", None) is not None:
            count = roi.keypoint_predictor.kps_score_lowres.out_channels
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2
            target["keypoints"] = torch.cat(
                [centre[:, None, :].expand(2, count, 2), torch.ones(2, count, 1)], dim=2)
        targets.append(target)
    return targets


def _detection_classes(model: nn.Module) -> int:
    """The classes a torchvision detection model predicts, background included."""
    roi = getattr(model, "roi_heads", None)
    if roi is not None:
        return int(roi.box_predictor.cls_score.out_features)
    return int(model.head.classification_head.num_classes)


def _loss(output: Any) -> torch.Tensor:
    """A scalar from any classifier output (a tensor, or a tuple with auxiliary logits)."""
    if isinstance(output, torch.Tensor):
        return output.float().pow(2).mean()
    tensors = [o for o in (output.values() if isinstance(output, dict) else output)
               if isinstance(o, torch.Tensor)]
    return sum(t.float().pow(2).mean() for t in tensors)


class _Allocations(TorchDispatchMode):
    """Watches every tensor an op creates (views and in-place results share memory and are
    skipped): on meta tensors, the forward's activations at no cost."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[weakref.ref, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            self.made += [(weakref.ref(t), t.numel() * t.element_size())
                          for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def peak(self) -> int:
        """Bytes alive now (what autograd saved for backward, and the output) plus twice the
        largest tensor made (backward's gradients in flight)."""
        alive = sum(size for ref, size in self.made if ref() is not None)
        return alive + 2 * max((size for _, size in self.made), default=0)


def _meta_forward(model: nn.Module, built: BuiltModel, batch_size: int,
                  input_size: Sequence[int]) -> int:
    """Run `model` (on meta, with autograd) on a meta batch; return the bytes the backward
    pass would find in memory (see _Allocations.peak)."""
    if built.make_batch is not None:
        batch = built.make_batch(batch_size, torch.Generator().manual_seed(0)).to("meta")
    else:
        batch = torch.empty(batch_size, *input_size, device="meta")
    counter = _Allocations()
    with torch.enable_grad(), counter:
        output = model(batch)
    need = counter.peak() + batch.numel() * batch.element_size()
    del output
    return need


def measure_activations(
    built: BuiltModel, batch_size: int, eval_modules: Sequence[str],
    trainable: Sequence[str] | None = None,
) -> int | None:
    """Bytes of activations the proof's forward/backward holds at its peak, from a pass on the
    meta device with `trainable` (default: as built.model says) requiring grad: what autograd
    saves, plus gradients in flight. None when the model cannot run on meta. A batch the
    architecture cannot take at all is a FinetunePrepError naming model.input_size or
    verify.batch_size (found by trying the architecture's own input size, and a batch of 2)."""
    if built.task == "detection":  # its train-mode forward needs targets: not measured
        return None
    model = set_train_mode(copy.deepcopy(built.model), eval_modules)
    if trainable is not None:
        keep = set(trainable)
        for name, param in model.named_parameters():
            param.requires_grad_(name in keep)
    try:
        return _meta_forward(model, built, batch_size, built.input_size)
    except FinetunePrepError:  # the batch maker's own message (a text model's pad token)
        raise
    except Exception as err:  # the model's forward: blame the input when another one works
        blame = _blame_input(model, built, batch_size, err)
        if blame is not None:
            raise blame from None
        return None


def _blame_input(model: nn.Module, built: BuiltModel, batch_size: int,
                 err: Exception) -> FinetunePrepError | None:
    """The user's setting to blame when the meta forward fails, if a changed one runs."""
    size, own = list(built.input_size), built.own_input_size
    shape = [batch_size, *size]
    why = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if own is not None and tuple(size) != tuple(own) and _runs(model, built, batch_size, own):
        return FinetunePrepError(
            f"model.input_size={size}: {built.arch} cannot take a batch of shape {shape} "
            f"({type(err).__name__}: {why}). Its own input size is {list(own)}: set "
            "model.input_size=null, or a size this architecture accepts.")
    if batch_size == 1 and _runs(model, built, 2, size):
        return FinetunePrepError(
            f"verify.batch_size=1: {built.arch} cannot run a batch of one in train mode "
            f"({type(err).__name__}: {why}). Set verify.batch_size=2 (BatchNorm in train mode "
            "needs more than one value per channel).")
    return None


def _runs(model: nn.Module, built: BuiltModel, batch_size: int, size: Sequence[int]) -> bool:
    try:
        _meta_forward(model, built, batch_size, size)
    except Exception:  # any failure: this input does not run either
        return False
    return True


def proof_memory(built: BuiltModel, trainable: int, optimizer: Any, batch_size: int,
                 activations: int | None, copies: int) -> dict[str, int]:
    """Bytes the proof holds at once: `copies` materialized models (the caller's and the proof's
    own), the parameters' snapshot taken before the step, gradients and optimizer state of the
    `trainable` elements, and the forward's activations (measured on meta; if that cannot run,
    a conservative guess: the batch once per module)."""
    params = sum(p.numel() * p.element_size() for p in built.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in built.model.buffers())
    per = params // max(built.table.count(), 1) or 4
    if activations is None:
        modules = sum(1 for _ in built.model.modules())
        activations = batch_size * math.prod(built.input_size) * 4 * modules
    return {"models": (params + buffers) * copies, "snapshot": params,
            "grads": trainable * per, "optimizer_state": trainable * per * state_copies(optimizer),
            "activations": activations}


def check_fits(verify_cfg: Any, built: BuiltModel, trainable: Sequence[str], optimizer: Any,
               eval_modules: Sequence[str], copies: int) -> int:
    """Refuse up front a proof this machine's memory cannot hold (before any real tensor is
    made); return the bytes it needs."""
    activations = measure_activations(built, verify_cfg.batch_size, eval_modules, trainable)
    parts = proof_memory(built, built.table.count(trainable), optimizer,
                         verify_cfg.batch_size, activations, copies)
    parts["overhead"] = sum(parts.values()) // 4  # allocator slack, kernel workspaces
    need, ram = sum(parts.values()), physical_memory()
    if ram is not None and need > ram:
        listing = ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}" for k, v in parts.items())
        raise FinetunePrepError(
            f"the one-step proof needs about {human_bytes(need)} ({listing}; batch "
            f"{[verify_cfg.batch_size, *built.input_size]}), more than this machine's "
            f"{human_bytes(ram)} of memory. Set verify.backward=false to plan without the proof, "
            "or make its batch smaller (verify.batch_size=2, a smaller model.input_size).")
    return need


def should_verify(verify_cfg: Any, table: ParamTable, requested: bool | None) -> bool:
    """Whether the proof runs: the caller's request, else verify.backward, else the size bound."""
    if requested is not None:
        return requested
    if verify_cfg.backward is not None:
        return bool(verify_cfg.backward)
    return table.count() <= verify_cfg.max_params


def skip_reason(verify_cfg: Any, built: BuiltModel, do_verify: bool,
                groups: Sequence[dict[str, Any]], requested: bool | None = None) -> str | None:
    """Why the proof does not run (for the `verified` block), or None when it runs.
    `requested`: the caller's own choice (prepare's `verify`), which overrides the config."""
    if not do_verify:
        if requested is False:
            return "verify=False passed to prepare()"
        return ("verify.backward=false" if verify_cfg.backward is False
                else f"model above verify.max_params={verify_cfg.max_params:,}"
                if verify_cfg.backward is None else "not requested")
    if built.input_size is None:
        return "input size unknown: set model.input_size=[C,H,W]"
    if not groups:
        return "nothing trains"
    return None


def run_proof(
    verify_cfg: Any, built: BuiltModel, do_verify: bool, groups: list[dict[str, Any]],
    eval_modules: Sequence[str], optimizer: Any, make_model: Callable[[], nn.Module],
    requested: bool | None = None,
) -> dict[str, Any]:
    """The `verified` block: the proof's findings, or why it did not run.

    `make_model` returns a model with real weights that the proof may change (a copy, never
    the model handed to the user)."""
    reason = skip_reason(verify_cfg, built, do_verify, groups, requested)
    if reason is not None:
        return {"backward": False, "reason": reason}
    model = set_train_mode(make_model(), eval_modules)
    tensors = tensor_groups(model, [Group.of(g) for g in groups])
    return prove(model, tensors, optimizer_factory(optimizer),
                 built.input_size, verify_cfg.batch_size, verify_cfg.seed, built.make_batch,
                 built.task)


def notes(verified: dict[str, Any]) -> list[str]:
    """A warning when the proof ran and found problems."""
    if failure(verified) is None:
        return []
    return ["the verification step found problems (see Verified above): fix the rules or the "
            "model before training"]


def optimizer_factory(spec: Any) -> Any:
    """`groups -> optimizer` from the user's own `optim.optimizer` config (`_target_` and
    arguments), through Hydra's instantiate. TRUSTED input only: the plan-time check, the proof
    and `Prepared.build_optimizer` share it; a file's block goes to
    `allowlist.file_optimizer_factory` instead."""
    from hydra.utils import instantiate

    try:
        return instantiate(spec, _partial_=True)
    except Exception as err:
        raise FinetunePrepError(f"optim.optimizer cannot be built: {err}") from err
