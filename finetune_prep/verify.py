"""Prove the plan on a real backward pass, and estimate the memory it needs to train.

The proof runs one forward/backward pass on a small random batch and one optimizer step, then
checks that frozen parameters got no gradient and did not move, and that every trainable
parameter got a gradient (one that never does breaks DDP) and moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from finetune_prep.models import BuiltModel, ParamTable

# Optimizer state per trainable parameter element, in parameter-sized copies.
_STATE_COPIES = {"adamw": 2, "adam": 2, "nadam": 2, "radam": 2, "adamax": 2, "adagrad": 1,
                 "rmsprop": 1, "adadelta": 2, "lion": 1}


def state_copies(optimizer: Any) -> int:
    """How many parameter-sized buffers the optimizer keeps (AdamW 2, SGD+momentum 1)."""
    name = str(optimizer.get("_target_", "")).rpartition(".")[2].lower()
    if name == "sgd":
        return 1 if float(optimizer.get("momentum", 0) or 0) > 0 else 0
    return _STATE_COPIES.get(name, 2)


def memory_estimate(
    table: ParamTable, trainable: Sequence[str], optimizer: Any, bytes_per: int = 4
) -> dict[str, Any]:
    """Training memory for parameters + gradients + optimizer state, plan vs. full (no
    activations): fp32 at the top level, and under "bf16" the same with every tensor
    (weights, gradients, the optimizer's state) in bfloat16."""
    total, train = table.count(), table.count(trainable)
    copies = state_copies(optimizer)
    return {**_bytes(total, train, copies, bytes_per), "bf16": _bytes(total, train, copies, 2)}


def _bytes(total: int, train: int, copies: int, bytes_per: int) -> dict[str, int]:
    return {
        "params_bytes": total * bytes_per,
        "grads_bytes": train * bytes_per,
        "optimizer_state_bytes": train * copies * bytes_per,
        "plan_bytes": (total + train * (1 + copies)) * bytes_per,
        "full_finetune_bytes": total * (2 + copies) * bytes_per,
    }


def prove(
    model: nn.Module,
    groups: list[dict[str, Any]],
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    input_size: Sequence[int],
    batch_size: int,
    seed: int,
    make_batch: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """One forward/backward/step on `model` (which it changes); return what was checked.

    `groups` are torch.optim groups of `model`'s own tensors; `make_batch` makes the input
    (token ids for a text model), else it is a random float batch of `input_size`.
    """
    params = dict(model.named_parameters())
    non_finite = _non_finite(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = make_optimizer(groups)
    generator = torch.Generator().manual_seed(seed)
    batch = make_batch(batch_size, generator) if make_batch else \
        torch.randn(batch_size, *input_size, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    _loss(model(batch)).backward()
    optimizer.step()
    frozen = [n for n, p in params.items() if not p.requires_grad]
    trainable = [n for n, p in params.items() if p.requires_grad]
    result = {
        "backward": True,
        "input": [batch_size, *input_size],
        "non_finite": non_finite,
        "frozen_with_grad": [n for n in frozen if params[n].grad is not None],
        "frozen_changed": [n for n in frozen if not _same(params[n], before[n])],
        "trainable_without_grad": [n for n in trainable if params[n].grad is None],
        "trainable_unchanged": [n for n in trainable if _same(params[n], before[n])],
        "non_finite_after_step": [n for n in _non_finite(model) if n not in non_finite],
    }
    result["ok"] = not any(result[k] for k in FAILURES)
    return result


FAILURES = {  # what makes the proof fail, in plain words
    "non_finite": "weights or buffers that hold NaN or Inf (check the checkpoint)",
    "frozen_with_grad": "frozen parameters that got a gradient",
    "frozen_changed": "frozen parameters that changed",
    "trainable_without_grad": "trainable parameters that got no gradient (unused: breaks DDP)",
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


def _loss(output: Any) -> torch.Tensor:
    """A scalar from any classifier output (a tensor, or a tuple with auxiliary logits)."""
    if isinstance(output, torch.Tensor):
        return output.float().pow(2).mean()
    tensors = [o for o in (output.values() if isinstance(output, dict) else output)
               if isinstance(o, torch.Tensor)]
    return sum(t.float().pow(2).mean() for t in tensors)


def should_verify(verify_cfg: Any, table: ParamTable, requested: bool | None) -> bool:
    """Whether the proof runs: the caller's request, else verify.backward, else the size bound."""
    if requested is not None:
        return requested
    if verify_cfg.backward is not None:
        return bool(verify_cfg.backward)
    return table.count() <= verify_cfg.max_params


def run_proof(
    verify_cfg: Any, built: BuiltModel, do_verify: bool, groups: list[dict[str, Any]],
    eval_modules: Sequence[str], optimizer: Any, make_model: Callable[[], nn.Module],
) -> dict[str, Any]:
    """The `verified` block: the proof's findings, or why it did not run.

    `make_model` returns a model with real weights that the proof may change (a copy, never
    the model handed to the user)."""
    from finetune_prep.paramfile import optimizer_factory, set_train_mode, tensor_groups

    if not do_verify:
        reason = ("verify.backward=false" if verify_cfg.backward is False
                  else f"model above verify.max_params={verify_cfg.max_params:,}"
                  if verify_cfg.backward is None else "not requested")
        return {"backward": False, "reason": reason}
    if built.input_size is None:
        return {"backward": False, "reason": "input size unknown: set model.input_size=[C,H,W]"}
    if not groups:
        return {"backward": False, "reason": "nothing trains"}
    model = set_train_mode(make_model(), eval_modules)
    return prove(model, tensor_groups(model, groups), optimizer_factory(optimizer),
                 built.input_size, verify_cfg.batch_size, verify_cfg.seed, built.make_batch)


def notes(verified: dict[str, Any]) -> list[str]:
    """A warning when the proof ran and found problems."""
    if failure(verified) is None:
        return []
    return ["the verification step found problems (see Verified above): fix the rules or the "
            "model before training"]
