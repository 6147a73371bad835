"""Memory figures from names and shapes alone: what training a plan holds, and this machine's RAM.

Torch-free, so plans of any size are costed before a tensor exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from finetune_prep.errors import FinetunePrepError
from finetune_prep.plan.table import ParamTable

# Optimizer state per trainable parameter element, in parameter-sized copies.
STATE_COPIES = {"adamw": 2, "adam": 2, "nadam": 2, "radam": 2, "adamax": 2, "adagrad": 1,
                 "rmsprop": 1, "adadelta": 2, "lion": 1}


def state_copies(optimizer: Any) -> int:
    """How many parameter-sized buffers the optimizer keeps (AdamW 2, SGD+momentum 1)."""
    name = str(optimizer.get("_target_", "")).rpartition(".")[2].lower()
    if name == "sgd":
        return 1 if float(optimizer.get("momentum", 0) or 0) > 0 else 0
    return STATE_COPIES.get(name, 2)


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


def check_memory(numel: int, what: str, bytes_per: int = 4) -> None:
    """Refuse to allocate real tensors larger than this machine's memory: a clear message
    instead of a MemoryError, or the OOM killer, when e.g. head.num_outputs is absurd."""
    ram = physical_memory()
    need = numel * bytes_per
    if ram is not None and need > ram:
        raise FinetunePrepError(
            f"{what} has {numel:,} parameters: {human_bytes(need)} as float32, more than this "
            f"machine's {human_bytes(ram)} of memory, so it cannot be built with real tensors (the "
            "backward proof and prepare(materialize=True) need them). Check head.num_outputs "
            "and the model's size; to plan without real tensors, set verify.backward=false "
            "(the CLI) or call prepare(cfg, materialize=False)."
        )


def physical_memory() -> int | None:
    """Total physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def human_bytes(n: float) -> str:
    """A byte count for people: 1,536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
