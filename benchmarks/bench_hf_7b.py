"""A 7B-parameter plan at the cost of its imports: Mistral-7B-shaped sequence classifier with a
sharded safetensors checkpoint, planned by the CLI, against the import floor.

The checkpoint is a Hugging Face model folder (config.json, model.safetensors.index.json and
shards) whose shards carry their real safetensors headers (every tensor's name, dtype, shape
and offsets) and whose data is left as a hole: each shard is the header, then truncated to its
full size, so 14 GB of bf16 weights take a few hundred KB of disk. Reading it needs only the
headers; the eager way (from_pretrained) would need 28 GB of RAM for fp32 weights alone.

  (a) floor  python -c "import torch, torchvision, hydra, omegaconf, safetensors, transformers;
             from transformers import AutoModelForSequenceClassification, MistralForSequence-
             Classification" (the modules the plan imports), then os._exit(0) as the CLI does
  (b) plan   python -m finetune_prep model=hf_folder model.arch=FOLDER
             model.hf_class=AutoModelForSequenceClassification head.num_outputs=5
             hydra.run.dir=TMP   (header-only verification of every shard, meta build)
  (c) tiny   the same for a 2-layer, hidden-size-32 Mistral with verify.backward=false (as
             the 7B plan, above verify.max_params: what the CLI costs for any model)
  (d) floor  (a) plus `import peft; from peft import LoraConfig, get_peft_model`
      + peft
  (e) LoRA   (b) with adapter=lora +adapter.options.task_type=SEQ_CLS: peft adds the adapters
             on the meta device (get_peft_model(low_cpu_mem_usage=True)); compared with (d)

Each cell is the median over --runs fresh processes of wall seconds / peak RSS MiB, measured by
/usr/bin/time if present, else by resource.getrusage of the waited child. Usage:

    python benchmarks/bench_hf_7b.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIME = "/usr/bin/time"
FLOOR = ("import os, torch, torchvision, hydra, omegaconf, safetensors, transformers; "
         "from transformers import AutoModelForSequenceClassification, "
         "MistralForSequenceClassification; os._exit(0)")
# Mistral-7B-v0.1's shape; its checkpoint holds a 2-label classifier, the plan asks for 5
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
              "num_labels": 2, "pad_token_id": 0}
TINY = {**MISTRAL_7B, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
FLOOR_PEFT = FLOOR.replace("; os._exit(0)", "; import peft; from peft import LoraConfig, "
                                             "get_peft_model; os._exit(0)")
LORA = ("adapter=lora", "+adapter.options.task_type=SEQ_CLS")
DTYPES = {"bf16": ("BF16", 2), "fp32": ("F32", 4)}


def shapes_7b(config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """The state dict's names and shapes of MistralForSequenceClassification (on meta)."""
    import torch
    from transformers import AutoModelForSequenceClassification, MistralConfig

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(
            MistralConfig(**(config or MISTRAL_7B)))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_sparse_shard(path: Path, tensors: dict[str, tuple[int, ...]], dtype: str) -> int:
    """A safetensors file with its real header and its data a hole; returns its data size."""
    code, size = DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        n = math.prod(shape) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)  # a hole: no data blocks are written
    return offset


def make_folder(folder: Path, config: dict | None = None, dtype: str = "bf16",
                shard_bytes: int = 2_000_000_000) -> dict[str, int]:
    """A model folder: config.json, a sharded sparse checkpoint and its index.
    Returns {"params", "shards", "apparent_bytes", "disk_bytes"}."""
    from transformers import MistralConfig

    folder.mkdir(parents=True, exist_ok=True)
    MistralConfig(**(config or MISTRAL_7B)).save_pretrained(folder)
    shapes = shapes_7b(config)
    size = DTYPES[dtype][1]
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    used = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        if groups[-1] and used + n > shard_bytes:
            groups.append({})
            used = 0
        groups[-1][name] = shape
        used += n
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_sparse_shard(folder / shard, group, dtype)
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    files = list(folder.iterdir())
    return {"params": sum(math.prod(s) for s in shapes.values()), "shards": len(groups),
            "apparent_bytes": sum(f.stat().st_size for f in files),
            "disk_bytes": sum(f.stat().st_blocks * 512 for f in files)}


def plan_command(folder: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "finetune_prep", "model=hf_folder", f"model.arch={folder}",
            "model.hf_class=AutoModelForSequenceClassification", "head.num_outputs=5",
            f"hydra.run.dir={run_dir}", *extra]


def compile_package() -> None:
    """Compile finetune_prep's bytecode, as pip does when it installs a package: where
    PYTHONDONTWRITEBYTECODE=1 is set (these machines set it), a checkout would otherwise be
    compiled again in every process, which no installed copy does (about 0.06 s a run)."""
    import compileall

    compileall.compile_dir(str(REPO / "finetune_prep"), quiet=1)


def measure(cmd: list[str], env: dict | None = None,
            cwd: Path = REPO) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh process, run in `cwd`."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if os.path.exists(TIME):
        done = subprocess.run([TIME, "-f", "@@ %e %M", *cmd], capture_output=True, text=True,
                              env=full_env, cwd=cwd)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[2:5]} failed:\n{done.stdout}\n{done.stderr}")
        wall, rss = done.stderr.rsplit("@@ ", 1)[1].split()
        return float(wall), int(rss) / 1024
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True); "
             "print(time.perf_counter() - t, "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    done = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                          env=full_env, cwd=cwd)
    wall, rss, code = done.stdout.split()
    if code != "0":
        raise RuntimeError(f"{cmd[2:5]} failed")
    return float(wall), int(rss) / 1024


def medians(cmds: list[list[str]], runs: int) -> list[tuple[float, float]]:
    """Median (wall s, peak RSS MiB) of each command; the commands take turns within a round,
    so a change in the machine's load falls on all of them."""
    found: list[list[tuple[float, float]]] = [[] for _ in cmds]
    for _ in range(runs):
        for i, cmd in enumerate(cmds):
            found[i].append(measure(cmd))
    return [(statistics.median(w for w, _ in f), statistics.median(r for _, r in f))
            for f in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    compile_package()
    tmp = Path(tempfile.mkdtemp(prefix="bench_hf_7b_"))
    try:
        info = make_folder(tmp / "mistral_7b", dtype=args.dtype)
        make_folder(tmp / "mistral_tiny", config=TINY, dtype=args.dtype)
        cmds = [[sys.executable, "-c", FLOOR], plan_command(tmp / "mistral_7b", tmp / "run"),
                plan_command(tmp / "mistral_tiny", tmp / "run_tiny", "verify.backward=false"),
                [sys.executable, "-c", FLOOR_PEFT],
                plan_command(tmp / "mistral_7b", tmp / "run_lora", *LORA)]
        measure(cmds[3])  # warm the page cache
        floor, plan, tiny, floor_peft, lora = medians(cmds, args.runs)
        doc = json.loads((tmp / "run" / "param_groups.json").read_text())
        lora_doc = json.loads((tmp / "run_lora" / "param_groups.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gib = 2**30
    print(f"Mistral-7B-shaped AutoModelForSequenceClassification: {info['params']:,} "
          f"parameters in the checkpoint, {doc['counts']['total']:,} planned "
          f"({doc['counts']['trainable']:,} trainable, head_only); {info['shards']} "
          f"{args.dtype} shards, {info['apparent_bytes'] / gib:.1f} GiB apparent, "
          f"{info['disk_bytes'] / 2**20:.2f} MiB on disk; "
          f"{doc['checkpoint']['sources'][0]['loaded']} tensors verified; medians of "
          f"{args.runs} runs")
    mem = doc["memory"]
    print(f"memory: fp32 plan {mem['plan_bytes'] / gib:.1f} GiB, full "
          f"{mem['full_finetune_bytes'] / gib:.1f} GiB; bf16 plan "
          f"{mem['bf16']['plan_bytes'] / gib:.1f} GiB, full "
          f"{mem['bf16']['full_finetune_bytes'] / gib:.1f} GiB")
    print()
    print("| model | (a) floor | (b) plan 7B | (c) plan tiny | (b)-(a) time | (b)-(a) RSS "
          "| (b)-(c) time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| mistral-7b seq-cls, {info['shards']} {args.dtype} shards | {floor[0]:.2f} / "
          f"{floor[1]:.0f} | {plan[0]:.2f} / {plan[1]:.0f} | {tiny[0]:.2f} / {tiny[1]:.0f} | "
          f"{plan[0] - floor[0]:+.2f} s | {plan[1] - floor[1]:+.0f} MiB | "
          f"{plan[0] - tiny[0]:+.2f} s |")
    print()
    print("| model | (d) floor + peft | (e) plan 7B LoRA | (e)-(d) time | (e)-(d) RSS |")
    print("|---|---|---|---|---|")
    print(f"| mistral-7b seq-cls + LoRA r=8 (q,k,v,o) | {floor_peft[0]:.2f} / "
          f"{floor_peft[1]:.0f} | {lora[0]:.2f} / {lora[1]:.0f} | "
          f"{lora[0] - floor_peft[0]:+.2f} s | {lora[1] - floor_peft[1]:+.0f} MiB |")
    print(lora_line(lora_doc))


def lora_line(doc: dict) -> str:
    """The LoRA plan's counts and its training memory beside full fine-tuning."""
    gib, mem, counts = 2**30, doc["memory"], doc["counts"]
    return (f"LoRA: {counts['trainable']:,} of {counts['total']:,} parameters train "
            f"({len(doc['adapter']['params']):,} adapter tensors); memory: fp32 plan "
            f"{mem['plan_bytes'] / gib:.1f} GiB vs full {mem['full_finetune_bytes'] / gib:.1f} "
            f"GiB; bf16 plan {mem['bf16']['plan_bytes'] / gib:.1f} GiB vs full "
            f"{mem['bf16']['full_finetune_bytes'] / gib:.1f} GiB")


if __name__ == "__main__":
    main()
