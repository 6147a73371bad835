"""Files and folders that trainers write beside (or instead of) a model's weights, recognised
so that each gets one message naming the file to give instead or how to make one: a
torch.export program (`.pt2`), a DeepSpeed ZeRO rank shard, an optimizer state, the output
root of a DeepSpeed or Hugging Face Trainer run, and an accelerate folder of several models.

Recognition reads names and, for torch files, the already unpickled top level: nothing here
loads a tensor or runs what a file names.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

from finetune_prep.checkpoint import integrity
from finetune_prep.errors import FinetunePrepError

ZERO_SHARD = re.compile(r"(zero_pp_rank_\d+_mp_rank_\d+_(optim|model)_states|"
                        r"(bf16_)?zero_pp_rank_\d+.*_states)\.pt$")
MODEL_STATES = re.compile(r"mp_rank_\d+_model_states\.pt$")
STEP = re.compile(r"(?:checkpoint-|global_step)(\d+)$")
ACCELERATE_MODEL = re.compile(r"(model|pytorch_model)(_\d+)?\.(safetensors|bin)$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "adapter_model.safetensors")


def refuse_file(file: str) -> None:
    """Raise for a file that is known not to hold a model's weights, by name or archive."""
    name = os.path.basename(file)
    if ZERO_SHARD.search(name):
        raise FinetunePrepError(_zero_shard(file))
    if _exported_program(file):
        raise FinetunePrepError(
            f"checkpoint.path={file} is a torch.export program (torch.export.save, .pt2): its "
            "graph and weights are not read here. In a trusted environment, save its weights "
            "as a state dict: ep = torch.export.load(path); "
            "torch.save(ep.state_dict, 'weights.pt'), then give checkpoint.path=weights.pt "
            "(the module's names are those of the model you exported).")


def refuse_object(raw: Any, file: str) -> None:
    """Raise for an unpickled top level that is not a model's weights (an optimizer state)."""
    if isinstance(raw, Mapping) and {"state", "param_groups"} <= set(raw) and len(raw) <= 4:
        raise FinetunePrepError(
            f"checkpoint.path={file} is an optimizer's state (torch.save(optimizer.state_dict()):"
            " keys 'state' and 'param_groups'), not a model's weights: its tensors are moments "
            "indexed by number, with no parameter names. Give the file saved with "
            "torch.save(model.state_dict(), path) (often beside it: model.pt, "
            "model.safetensors, pytorch_model.bin).")


def refuse_folder(folder: str) -> None:
    """Raise for a folder that holds several models or runs, naming what to give instead."""
    names = _listdir(folder)
    models = sorted(n for n in names if ACCELERATE_MODEL.fullmatch(n))
    numbered = [n for n in models if re.search(r"_\d+\.", n)]
    if numbered and len(models) > 1:
        listed = ", ".join(os.path.join(folder, n) for n in models)
        raise FinetunePrepError(
            f"checkpoint.path={folder} holds the weights of {len(models)} models (an accelerate "
            f"save_state folder: one file per prepared model): {listed}. Which one is this "
            "model? Give that file as checkpoint.path (model.safetensors is the first model "
            "passed to accelerator.prepare, model_1 the second, ...).")
    if set(WEIGHT_FILES) & set(names) or ".metadata" in names:
        return
    steps = sorted((int(m.group(1)), n) for n in names
                    if (m := STEP.fullmatch(n)) and os.path.isdir(os.path.join(folder, n)))
    if steps:
        raise FinetunePrepError(_run_root(folder, steps, names))
    if any(MODEL_STATES.fullmatch(n) or ZERO_SHARD.search(n) for n in names):
        raise FinetunePrepError(_deepspeed_step(folder, names))


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []  # the caller's own listing reports an unreadable folder


def _exported_program(file: str) -> bool:
    """True for a torch.export archive: a zip with `models/*.json` and `archive_format`."""
    try:
        with os.fdopen(integrity.open_regular(file), "rb") as f, zipfile.ZipFile(f) as z:
            names = z.namelist()  # opened without blocking: a FIFO swapped in never hangs
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return (any(n.endswith("/archive_format") for n in names)
            and any("/models/" in n and n.endswith(".json") for n in names))


def _zero_shard(file: str, given: str | None = None) -> str:
    """The message for ZeRO rank shards (`given`: the run's folder the user gave)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(file)))
    script = os.path.join(root, "zero_to_fp32.py")
    how = (f"python {script} {root} weights/ --safe_serialization" if os.path.exists(script) else
           "DeepSpeed's zero_to_fp32.py (saved in the run's output folder, or "
           "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint)")
    what = (f"checkpoint.path={given} is a DeepSpeed run whose latest step holds only ZeRO "
            "rank shards: each" if given else
            f"checkpoint.path={file} is one rank's shard of a DeepSpeed ZeRO checkpoint: it")
    return (f"{what} holds a slice of the flattened parameters (or optimizer states), not "
            "named weights. "
            f"Consolidate the run into one state dict with {how}, then give the file it writes.")


def _latest_model_file(step_folder: str) -> str:
    names = _listdir(step_folder)
    for n in WEIGHT_FILES:
        if n in names:
            return os.path.join(step_folder, n)
    found = sorted(n for n in names if MODEL_STATES.fullmatch(n))
    return os.path.join(step_folder, found[0]) if found else step_folder


def _run_root(folder: str, steps: list[tuple[int, str]], names: list[str]) -> str:
    step, latest = steps[-1]
    where = os.path.join(folder, latest)
    target = _latest_model_file(where)
    kind = "a Hugging Face Trainer" if latest.startswith("checkpoint-") else "a DeepSpeed"
    tagged = _read_latest_tag(folder) if "latest" in names else None
    note = (f" (its 'latest' file names {tagged})" if tagged and tagged != latest else "")
    if target == where and any(ZERO_SHARD.search(n) for n in _listdir(where)):
        return _zero_shard(os.path.join(where, "zero_pp_rank_0_model_states.pt"), folder)
    fix = (f"checkpoint.path={target}" if target != where else
           f"the weights file inside {where}")
    zero = (" For ZeRO-3, consolidate the run first with DeepSpeed's zero_to_fp32.py."
            if kind == "a DeepSpeed" else "")
    return (f"checkpoint.path={folder} is the output folder of {kind} run with "
            f"{len(steps)} saved step(s) ({', '.join(n for _, n in steps[-3:])}): give one "
            f"step's model file; the latest, step {step}, is {fix}{note}.{zero}")


TAG_LIMIT = 4096  # bytes of DeepSpeed's `latest` file (it holds a step folder's name)


def _read_latest_tag(folder: str) -> str | None:
    try:
        tag = integrity.read_regular(os.path.join(folder, "latest"), TAG_LIMIT,
                                     f"{folder}: its latest file", remedy=integrity.IN_FOLDER)
        return tag.decode("utf-8").strip() or None  # never blocks: a FIFO is refused
    except (OSError, UnicodeDecodeError):
        return None


def _deepspeed_step(folder: str, names: list[str]) -> str:
    states = sorted(n for n in names if MODEL_STATES.fullmatch(n))
    shard = next((n for n in names if ZERO_SHARD.search(n)), None)
    if shard and not states:
        return _zero_shard(os.path.join(folder, shard))
    return (f"checkpoint.path={folder} is one step of a DeepSpeed checkpoint: give its model "
            f"file, checkpoint.path={os.path.join(folder, states[0])} (ZeRO stages 0-2 keep "
            "the whole model there); for ZeRO-3, consolidate it first with DeepSpeed's "
            "zero_to_fp32.py.")
