"""Each performance bound of issue 23 against the import floor, in one run: whole processes,
interleaved round by round, medians of --runs; prints a markdown table (figure, measured,
bound, met?).

    python benchmarks/bench_scale.py --runs 3
    python benchmarks/bench_scale.py --runs 3 --only floor cli_resnet18 api_10k
    python benchmarks/bench_scale.py --runs 3 --only cli_vit_h_14 hf_7b

Every process runs under bench_hf_7b.measure (/usr/bin/time, else resource.getrusage): wall
seconds and its own peak RSS. Figures (time in s over the floor, from fresh processes):
- cli_resnet18: `python -m finetune_prep verify.backward=false` (head_only) - floor <= 0.3 s
  and <= 150 MiB of peak RSS
- cli_vit_h_14: bench_prepare.py's CLI row for vit_h_14 (`model.arch=vit_h_14
  checkpoint.path=CKPT checkpoint.exclude_head=true verify.backward=false`), CKPT a random-init
  torchvision state_dict with its 1000-class head (torch.save, about 2.4 GiB, written once per
  benchmark run in its temp folder, only when this figure runs) - floor <= 0.3 s and <= 150 MiB
- cli_10k / cli_100k: the CLI with a --config-dir preset freeze/rN.yaml holding only
  `rules_file: rules/rN.rules.yaml`, a file of 10,000 / 100,000 freeze rules (read with libyaml,
  not composed by Hydra) - floor <= 2 s / 20 s
- cli_10k_inline: the same 10,000 rules inline in a preset (freeze/r10000_inline.yaml), which
  Hydra composes (PyYAML, OmegaConf nodes, merges: about 1-2 ms a rule) - informational, no bound
- api_10k / api_100k: `finetune_prep.prepare({"freeze": {"rules": RULES}})` in a fresh process
  (rules loaded with libyaml) - floor <= 2 s / 20 s
- sweep_job: (basic-launcher multirun of 8 jobs - of 2 jobs) / 6, resnet18, no proof <= 0.15 s
- hf_7b: bench_hf_7b.py's (b) row, the CLI planning its Mistral-7B-shaped sparse bf16 folder
  (shards with real headers, data a hole), against that script's floor (a), which adds
  transformers (row `import floor (with transformers)`, run only with hf_7b) - floor_hf <= 0.5 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# the sibling scripts: importable as this script's folder is sys.path[0]
from bench_hf_7b import FLOOR as FLOOR_HF
from bench_hf_7b import compile_package, make_folder, measure, plan_command
from bench_prepare import MAKE_CKPT
from bench_prepare import commands as prepare_commands

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


def write_vit_h_14(path: Path) -> int:
    """bench_prepare's random-init checkpoint of vit_h_14 (1000-class head), built and saved in
    a child process, so its memory is freed when the child exits. Its size in bytes."""
    subprocess.run([sys.executable, "-c", MAKE_CKPT, "vit_h_14", str(path)], check=True)
    return path.stat().st_size


def commands(work: Path) -> dict[str, list[str]]:
    py, cli = sys.executable, [sys.executable, "-m", "finetune_prep"]
    out = str(work / "out")
    base = ["verify.backward=false", f"hydra.run.dir={out}/${{now:%H%M%S%f}}"]
    sweep = [*cli, "-m", "verify.backward=false", f"hydra.sweep.dir={out}/s${{now:%H%M%S%f}}"]
    return {
        "floor": [py, "-c", FLOOR],
        "floor_hf": [py, "-c", FLOOR_HF],
        "cli_resnet18": [*cli, *base],
        "cli_10k": [*cli, "--config-dir", str(work / "conf"), "freeze=r10000", *base],
        "cli_100k": [*cli, "--config-dir", str(work / "conf"), "freeze=r100000", *base],
        "cli_10k_inline": [*cli, "--config-dir", str(work / "conf"), "freeze=r10000_inline",
                           *base],
        "api_10k": [py, "-c", API, str(work / "rules" / "r10000.rules.yaml")],
        "api_100k": [py, "-c", API, str(work / "rules" / "r100000.rules.yaml")],
        "sweep_2": [*sweep, "optim.lr=0.1,0.2"],
        "sweep_8": [*sweep, "optim.lr=" + ",".join(f"0.{i}" for i in range(1, 9))],
        "cli_vit_h_14": prepare_commands("vit_h_14", work / "vit_h_14.pth",
                                         work / "out_vit")["cli"],
        "hf_7b": plan_command(work / "mistral_7b", work / "out_hf" / "run"),
    }


BOUNDS = {"cli_resnet18": 0.3, "cli_vit_h_14": 0.3, "cli_10k": 2.0, "cli_100k": 20.0,
          "cli_10k_inline": None, "api_10k": 2.0, "api_100k": 20.0}  # None: no bound
RSS_BOUNDS = {"cli_resnet18": 150, "cli_vit_h_14": 150}  # MiB of peak RSS over the floor's
HF_BOUND = 0.5  # hf_7b: s over floor_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="figures to run (floor always runs)")
    args = parser.parse_args()
    compile_package()
    wanted = None
    if args.only:
        known = {*commands(Path()), "sweep_job"} - {"floor_hf", "sweep_2", "sweep_8"}
        unknown = sorted(set(args.only) - known)
        if unknown:
            parser.error(f"unknown figure(s) {', '.join(unknown)}; figures: "
                         f"{', '.join(sorted(known))}")
        wanted = set(args.only) | {"floor"}
        wanted |= {"sweep_2", "sweep_8"} if "sweep_job" in wanted else set()
        wanted |= {"floor_hf"} if "hf_7b" in wanted else set()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_rules(work / "conf", 10_000, inline=True)
        write_rules(work / "conf", 100_000)
        cmds = {k: v for k, v in commands(work).items() if wanted is None or k in wanted}
        if "cli_vit_h_14" in cmds:
            size = write_vit_h_14(work / "vit_h_14.pth")
            print(f"# vit_h_14: checkpoint {size / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        if "hf_7b" in cmds:
            make_folder(work / "mistral_7b", dtype="bf16")
        os.sync()  # no write-back of the 2.4 GB checkpoint beside the timed processes
        for key in ("cli_vit_h_14", "hf_7b"):  # their files into the page cache, untimed
            if key in cmds:
                measure(cmds[key], cwd=work)
        found: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        for _ in range(args.runs):  # interleaved: each round runs every figure once
            for key, cmd in cmds.items():
                found[key].append(measure(cmd, cwd=work))
    med = {k: statistics.median(w for w, _ in v) for k, v in found.items()}
    rss = {k: statistics.median(r for _, r in v) for k, v in found.items()}
    rows = [("import floor", f"{med['floor']:.2f} s, {rss['floor']:.0f} MiB", "-", "-")]
    for key, bound in BOUNDS.items():
        if key in med:
            over = med[key] - med["floor"]
            if key in RSS_BOUNDS:
                more = rss[key] - rss["floor"]
                rows.append((key, f"{med[key]:.2f} s, {rss[key]:.0f} MiB (floor {over:+.2f} s, "
                                  f"{more:+.0f} MiB)",
                             f"floor + {bound} s, + {RSS_BOUNDS[key]} MiB",
                             "yes" if over <= bound and more <= RSS_BOUNDS[key] else "NO"))
                continue
            measured = f"{med[key]:.2f} s (floor {over:+.2f} s)"
            if bound is None:
                rows.append((key, measured, "- (Hydra's compose)", "-"))
                continue
            rows.append((key, measured, f"floor + {bound} s", "yes" if over <= bound else "NO"))
    if "sweep_8" in med:
        per_job = (med["sweep_8"] - med["sweep_2"]) / 6
        rows.append(("sweep: one more job", f"{per_job:.3f} s", "0.15 s",
                     "yes" if per_job <= 0.15 else "NO"))
    if "hf_7b" in med:
        over = med["hf_7b"] - med["floor_hf"]
        rows.append(("import floor (with transformers)", f"{med['floor_hf']:.2f} s", "-", "-"))
        rows.append(("hf_7b", f"{med['hf_7b']:.2f} s (floor_hf {over:+.2f} s)",
                     f"floor (with transformers) + {HF_BOUND} s",
                     "yes" if over <= HF_BOUND else "NO"))
    print(f"medians of {args.runs} interleaved runs, {os.cpu_count()} cores\n")
    print("| figure | measured | bound | met? |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
