"""Whole-process cost of planning a fine-tune: import floor vs the eager way vs the CLI.

For each model it writes a random-init checkpoint (torchvision, weights=None, the original
1000-class head, torch.save) into a temp dir, then times in separate fresh processes:

  (a) floor     `import torch, torchvision, hydra, omegaconf`
  (b) eager     build on CPU, replace the head, torch.load, load_state_dict, freeze all,
                unfreeze the head, count the trainable parameters (the seed's way)
  (c) cli       python -m finetune_prep model.arch=X checkpoint.path=CKPT
                checkpoint.exclude_head=true verify.backward=false hydra.run.dir=TMP
  (d) multirun  the same with -m freeze=head_only,last_stage,last_two_stages,full

Each process runs under /usr/bin/time (wall seconds and its own peak RSS); the table shows
medians over --runs runs. Usage:

    python benchmarks/bench_prepare.py --runs 3
    python benchmarks/bench_prepare.py --models resnet18 vit_l_16 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = ("resnet18", "resnet50", "convnext_base", "vit_l_16")
PRESETS = "head_only,last_stage,last_two_stages,full"
TIME = "/usr/bin/time"

FLOOR = "import torch, torchvision, hydra, omegaconf"

MAKE_CKPT = """
import sys, torch, torchvision
torch.manual_seed(0)
model = torchvision.models.get_model(sys.argv[1], weights=None)
torch.save(model.state_dict(), sys.argv[2])
"""

# The seed's eager way: everything real, on the CPU.
EAGER = """
import sys, torch, torchvision
from torch import nn
arch, ckpt = sys.argv[1], sys.argv[2]
model = torchvision.models.get_model(arch, weights=None)
name, old = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
parent, _, attr = name.rpartition(".")
setattr(model.get_submodule(parent) if parent else model, attr, nn.Linear(old.in_features, 1))
state = torch.load(ckpt, map_location="cpu", weights_only=True)
state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
model.load_state_dict(state, strict=False)
for p in model.parameters():
    p.requires_grad_(False)
for p in model.get_submodule(name).parameters():
    p.requires_grad_(True)
print(sum(p.numel() for p in model.parameters() if p.requires_grad))
"""


def measure(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        start = time.perf_counter()
        done = subprocess.run([TIME, "-f", "%e %M", "-o", out.name, *cmd], cwd=cwd, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
        _, rss_kib = out.read().split()[-2:]
    return wall, int(rss_kib) / 1024


def commands(arch: str, ckpt: Path, work: Path) -> dict[str, list[str]]:
    py = sys.executable
    args = [f"model.arch={arch}", f"checkpoint.path={ckpt}", "checkpoint.exclude_head=true",
            "verify.backward=false"]
    cli = [py, "-m", "finetune_prep"]
    return {
        "floor": [py, "-c", FLOOR],
        "eager": [py, "-c", EAGER, arch, str(ckpt)],
        "cli": [*cli, *args, f"hydra.run.dir={work / 'run'}"],
        "multirun": [*cli, "-m", *args, f"freeze={PRESETS}", f"hydra.sweep.dir={work / 'sweep'}"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    if not Path(TIME).exists():
        sys.exit(f"{TIME} (GNU time) is needed to read each process's own peak RSS")
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    results: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        for arch in args.models:
            ckpt = tmp / f"{arch}.pth"
            subprocess.run([sys.executable, "-c", MAKE_CKPT, arch, str(ckpt)], check=True)
            size = ckpt.stat().st_size / 2**20
            print(f"# {arch}: checkpoint {size:.0f} MiB", file=sys.stderr, flush=True)
            samples: dict[str, list[tuple[float, float]]] = {}
            for _ in range(args.runs):  # interleaved, so drift hits every mode alike
                for mode, cmd in commands(arch, ckpt, tmp / "out").items():
                    samples.setdefault(mode, []).append(measure(cmd, REPO))
                    shutil.rmtree(tmp / "out", ignore_errors=True)
            results[arch] = {m: (statistics.median(w for w, _ in s),
                                 statistics.median(r for _, r in s)) for m, s in samples.items()}
            ckpt.unlink()
            print(f"# {arch}: done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args.runs)


def report(results: dict[str, dict[str, tuple[float, float]]], runs: int) -> None:
    print(f"Medians of {runs} runs, each a fresh process; time in s, peak RSS in MiB.\n")
    print("| model | (a) floor | (b) eager | (c) cli | (d) multirun x4 | (c)/(a) time "
          "| (c)-(a) RSS | (b)/(c) time |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, r in results.items():
        (ta, ma), (tb, mb), (tc, mc), (td, md) = (r[k] for k in
                                                  ("floor", "eager", "cli", "multirun"))
        print(f"| {arch} | {ta:.2f} / {ma:.0f} | {tb:.2f} / {mb:.0f} | {tc:.2f} / {mc:.0f} "
              f"| {td:.2f} / {md:.0f} | {tc / ta:.2f}x | {mc - ma:+.0f} MiB | {tb / tc:.1f}x |")
    if "vit_l_16" in results:
        (ta, ma), (tb, _), (tc, mc), (td, _) = (results["vit_l_16"][k] for k in
                                                ("floor", "eager", "cli", "multirun"))
        print("\nTargets on vit_l_16:")
        for text, ok in (
            (f"(c) time within 1.25x of (a): {tc / ta:.2f}x", tc <= 1.25 * ta),
            (f"(c) peak RSS within 150 MiB of (a): {mc - ma:+.0f} MiB", mc - ma <= 150),
            (f"(c) at least 3x faster than (b): {tb / tc:.1f}x", tb >= 3 * tc),
            (f"(d) below (a) + 4 x 0.5 s = {ta + 2:.2f} s: {td:.2f} s", td < ta + 2),
        ):
            print(f"- {'met' if ok else 'MISSED'}: {text}")


if __name__ == "__main__":
    main()
