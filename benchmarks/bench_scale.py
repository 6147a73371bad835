"""Each performance bound of issue 23 against the import floor, in one run: whole processes,
interleaved round by round, medians of --runs; prints a markdown table (figure, measured,
bound, met?).

    python benchmarks/bench_scale.py --runs 3
    python benchmarks/bench_scale.py --runs 3 --only floor cli_resnet18 api_10k

Figures (time in s over the floor, from fresh processes):
- cli_resnet18: `python -m finetune_prep verify.backward=false` (head_only) - floor <= 0.3 s
- cli_10k / cli_100k: the CLI with a --config-dir preset freeze/rN.yaml holding only
  `rules_file: rules/rN.rules.yaml`, a file of 10,000 / 100,000 freeze rules (read with libyaml,
  not composed by Hydra) - floor <= 2 s / 20 s
- cli_10k_inline: the same 10,000 rules inline in a preset (freeze/r10000_inline.yaml), which
  Hydra composes (PyYAML, OmegaConf nodes, merges: about 1-2 ms a rule) - informational, no bound
- api_10k / api_100k: `finetune_prep.prepare({"freeze": {"rules": RULES}})` in a fresh process
  (rules loaded with libyaml) - floor <= 2 s / 20 s
- sweep_job: (basic-launcher multirun of 8 jobs - of 2 jobs) / 6, resnet18, no proof <= 0.15 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLOOR = "import os, torch, torchvision, hydra, omegaconf; os._exit(0)"
API = """
import sys, yaml, finetune_prep, torchvision
rules = yaml.load(open(sys.argv[1]), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
finetune_prep.prepare({"freeze": {"rules": rules}}, materialize=False, verify=False)
"""


def write_rules(folder: Path, n: int, inline: bool = False) -> Path:
    """n rules over resnet18's names (names, modules, regexes, in turn) in the rules file
    rules/rN.rules.yaml beside `folder`, and the preset FOLDER/freeze/rN.yaml naming it
    (rules_file); with `inline`, also the preset freeze/rN_inline.yaml holding the same rules
    inline. The rules file's path."""
    import torchvision

    names = [k for k, _ in torchvision.models.resnet18().named_parameters()]
    rules = []
    for i in range(n):
        name = names[i % len(names)]
        pattern = [name, name.rpartition(".")[0] or name,
                   "re:" + name.replace(".", r"\.")][i % 3]
        rules.append(f"- {'freeze' if i % 2 else 'unfreeze'}: '{pattern}'")
    presets = folder / "freeze"
    presets.mkdir(parents=True, exist_ok=True)
    path = folder.parent / "rules" / f"r{n}.rules.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rules) + "\n")
    (presets / f"r{n}.yaml").write_text(
        f"# {n} freeze rules for the benchmark, read from their file (not composed by Hydra)\n"
        f"rules_file: rules/{path.name}  # from the folder the CLI runs in (`folder`'s parent)\n")
    if inline:
        (presets / f"r{n}_inline.yaml").write_text(
            f"# {n} freeze rules for the benchmark, inline (Hydra composes them)\n"
            "rules:  # ordered\n" + "".join(f"  {rule}\n" for rule in rules))
    return path


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed:\n{done.stderr[-2000:]}")
    return took


def commands(work: Path) -> dict[str, list[str]]:
    py, cli = sys.executable, [sys.executable, "-m", "finetune_prep"]
    out = str(work / "out")
    base = ["verify.backward=false", f"hydra.run.dir={out}/${{now:%H%M%S%f}}"]
    sweep = [*cli, "-m", "verify.backward=false", f"hydra.sweep.dir={out}/s${{now:%H%M%S%f}}"]
    return {
        "floor": [py, "-c", FLOOR],
        "cli_resnet18": [*cli, *base],
        "cli_10k": [*cli, "--config-dir", str(work / "conf"), "freeze=r10000", *base],
        "cli_100k": [*cli, "--config-dir", str(work / "conf"), "freeze=r100000", *base],
        "cli_10k_inline": [*cli, "--config-dir", str(work / "conf"), "freeze=r10000_inline",
                           *base],
        "api_10k": [py, "-c", API, str(work / "rules" / "r10000.rules.yaml")],
        "api_100k": [py, "-c", API, str(work / "rules" / "r100000.rules.yaml")],
        "sweep_2": [*sweep, "optim.lr=0.1,0.2"],
        "sweep_8": [*sweep, "optim.lr=" + ",".join(f"0.{i}" for i in range(1, 9))],
    }


BOUNDS = {"cli_resnet18": 0.3, "cli_10k": 2.0, "cli_100k": 20.0, "cli_10k_inline": None,
          "api_10k": 2.0, "api_100k": 20.0}  # None: informational, no bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="figures to run (floor always runs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_rules(work / "conf", 10_000, inline=True)
        write_rules(work / "conf", 100_000)
        cmds = commands(work)
        if args.only:
            wanted = set(args.only) | {"floor"}
            wanted |= {"sweep_2", "sweep_8"} if "sweep_job" in wanted else set()
            cmds = {k: v for k, v in cmds.items() if k in wanted}
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.runs):  # interleaved: each round runs every figure once
            for key, cmd in cmds.items():
                times[key].append(timed(cmd, work))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [("import floor", f"{med['floor']:.2f} s", "-", "-")]
    for key, bound in BOUNDS.items():
        if key in med:
            over = med[key] - med["floor"]
            measured = f"{med[key]:.2f} s (floor + {over:.2f} s)"
            if bound is None:
                rows.append((key, measured, "- (Hydra's compose)", "-"))
                continue
            rows.append((key, measured, f"floor + {bound} s", "yes" if over <= bound else "NO"))
    if "sweep_8" in med:
        per_job = (med["sweep_8"] - med["sweep_2"]) / 6
        rows.append(("sweep: one more job", f"{per_job:.3f} s", "0.15 s",
                     "yes" if per_job <= 0.15 else "NO"))
    print(f"medians of {args.runs} interleaved runs, {os.cpu_count()} cores\n")
    print("| figure | measured | bound | met? |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
