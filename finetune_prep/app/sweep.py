"""Multirun summary: one row per job in sweep_summary.csv / .md (and a .png heatmap).

Hydra 1.3 skips `on_multirun_end` when any job failed, but runs `on_job_end` for every job,
inside the worker process (joblib too). So each job writes its own `job_result.json`, and the
summary is rebuilt from all result files under the sweep dir, under a file lock; it is
complete after the last job whichever launcher ran it. Every number comes from the job's own
param_groups.json.

To write the summary once and say once where it is, `on_multirun_start` (main process) writes
the sweep plan (how many jobs the basic sweeper will run, in which batches, and which keys
vary; the job folder names use the last) to `.sweep_plan.json`. Each job adds its status to
the ledger `.sweep_done`; the job that completes the sweep (or, with fail-fast batches, the
batch that failed) reads the results, writes the tables and the plot and logs the paths, so a
job costs the same in a sweep of 10 jobs or 10,000. Without a plan (another sweeper), each
job rewrites the tables and `on_multirun_end` draws the plot, which Hydra runs on success
only.

A job whose process dies (SIGKILL, the out-of-memory killer, a segfault) never reaches
`on_job_end`, and the launcher then raises (joblib's TerminatedWorkerError, submitit's
UncompletedJobError), so Hydra skips the rest. Each job therefore marks its result file RUNNING
(with its pid) in `on_job_start`, and `finish_interrupted`, called by the CLI after the launcher
raised, turns the marks of dead processes into FAILED rows ("died: signal 9") and lists the
planned jobs that never started, so the summary still names every job.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from finetune_prep.app.naming import PLAN_FILE, register_resolvers
from finetune_prep.atomic import open_for_writing, pid_alive, write_atomic
from finetune_prep.config import is_rerun_override
from finetune_prep.errors import FinetunePrepError
from finetune_prep.plan.table import covers

log = logging.getLogger("finetune_prep")
register_resolvers()  # Hydra imports this callback in every joblib worker before naming a job
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

RESULT_FILE = "job_result.json"
PARAM_FILE = "param_groups.json"
CSV_FILE = "sweep_summary.csv"
MD_FILE = "sweep_summary.md"
PNG_FILE = "sweep_summary.png"
LOCK_FILE = ".sweep_summary.lock"
NOT_RUN_FILE = ".sweep_not_run.json"  # planned jobs that never started, once the launcher gave up
DONE_FILE = ".sweep_done"  # "JOB STATUS" lines of finished jobs: the last one is known without
# reading every job's result (which made a long sweep quadratic)
PRIVATE = (PLAN_FILE, LOCK_FILE, DONE_FILE)  # removed once the summary is announced
DONE_MAX_BYTES = 16 << 20  # the ledger read: about a million jobs' lines
DONE_LINE = re.compile(r"^(\d{1,9}) ([A-Z]{1,16})$", re.MULTILINE)  # what _note_done writes
RUNNING = "RUNNING"
COLUMNS = ("job", "overrides", "status", "error", "trainable", "total", "trainable_pct",
           "phases", "final_trainable_pct", "groups", "memory_mib", "verified", "job_dir")
PLOT_HINT = "pip install 'finetune_prep[plot]' to get sweep_summary.png"
_hinted = False
_active: Path | None = None  # the sweep dir this process started and has not finished


class SweepSummary(Callback):
    """Registered in conf/config.yaml under hydra.callbacks; acts in MULTIRUN mode only."""

    def __init__(self) -> None:
        self._planned = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _active
        _active = Path(str(config.hydra.sweep.dir))
        try:
            plan = sweep_plan(config)
            if plan is not None:
                sweep_dir = Path(str(config.hydra.sweep.dir))
                sweep_dir.mkdir(parents=True, exist_ok=True)
                (sweep_dir / DONE_FILE).unlink(missing_ok=True)  # an earlier sweep's
                write_atomic(sweep_dir / PLAN_FILE, json.dumps(plan) + "\n")
                self._planned = True
        except Exception:  # without a plan the summary is still written, just announced later
            log.debug("no sweep plan", exc_info=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Mark the job RUNNING: if its process dies, the mark is all that is left of it."""
        if _multirun(config):
            result = _job_record(config, RUNNING, "")
            result["pid"] = os.getpid()
            with contextlib.suppress(Exception):  # never fail a job over its mark
                write_atomic(Path(result["job_dir"]) / RESULT_FILE, json.dumps(result) + "\n")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _multirun(config):
            return
        status = "COMPLETED" if job_return.status == JobStatus.COMPLETED else "FAILED"
        result = _job_record(config, status, _error_text(job_return))
        job_dir = Path(result["job_dir"])
        sweep_dir = _sweep_dir(job_dir, str(config.hydra.sweep.subdir))
        try:
            plan = _read_plan(job_dir / PARAM_FILE) if status == "COMPLETED" else None
            if plan is not None:
                sizes = _param_sizes(config)
                result["stage_params"] = stage_counts(plan.document, sizes)
                result["stage_unit"] = "elements" if sizes else "tensors"
                result["row"] = plan_row(plan)  # read once: the summary reads result files only
            job_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(job_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
            write_summary(sweep_dir, plot_if_failed_only=True, job=result["job"], status=status)
        except Exception:  # a summary problem must never turn a good job into a failed one
            log.exception("could not write the sweep summary in %s", sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _active
        _active = None
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            announced = self._planned and not (sweep_dir / PLAN_FILE).exists()
            if not announced:
                announce(sweep_dir, write_summary(sweep_dir))
            elif _own_console(config):  # submitit: the last job said it in its own log only
                announce(sweep_dir, collect(sweep_dir))
            for name in PRIVATE:
                (sweep_dir / name).unlink(missing_ok=True)
        except Exception:
            log.exception("could not write the sweep summary")


def finish_interrupted(error: BaseException | None, wait: float = 5.0) -> None:
    """After the launcher raised (Hydra then skips on_multirun_end): give the jobs whose process
    died a FAILED row, list planned jobs that never started, and write and announce the summary.

    A no-op unless this process started a sweep that has not been announced yet. `error` is what
    the launcher raised; joblib's names the dead worker's signal. Jobs still running (submitit's
    keep going) stay RUNNING and update the summary themselves when they end.
    """
    global _active
    sweep_dir, _active = _active, None
    if sweep_dir is None or not sweep_dir.is_dir():
        return
    plan = _read_json(sweep_dir / PLAN_FILE)
    running = _running(sweep_dir)
    if plan is None and not running:
        return  # announced already (the last job, or fail-fast batches), or nothing to add
    deadline = time.monotonic() + wait  # the launcher may still be stopping its workers
    while any(_alive(r.get("pid")) for _, r in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    with _locked(sweep_dir / LOCK_FILE):
        dead = [(path, r) for path, r in _running(sweep_dir) if not _alive(r.get("pid"))]
        for path, result in dead:
            result.update(status="FAILED", error=_died(error, [r["job"] for _, r in dead]))
            result.pop("pid", None)
            write_atomic(path, json.dumps(result, indent=2) + "\n")
        started = {r["job"] for r in collect(sweep_dir)}
        never = [{"job": i, "overrides": list(o), "status": "FAILED", "job_dir": "",
                  "error": "not run: the launcher stopped the sweep before this job started"}
                 for i, o in enumerate((plan or {}).get("overrides", [])) if i not in started]
        if never:
            write_atomic(sweep_dir / NOT_RUN_FILE, json.dumps({"jobs": never}) + "\n")
        _note_done(sweep_dir, {**{r["job"]: "FAILED" for _, r in dead},
                               **{r["job"]: "FAILED" for r in never}})
    rows = write_summary(sweep_dir)
    if all(r["status"] != RUNNING for r in rows):  # else the jobs still running need them
        for name in PRIVATE:
            (sweep_dir / name).unlink(missing_ok=True)
    announce(sweep_dir, rows)


def _running(sweep_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(result file, record) of every job still marked RUNNING."""
    marked = [(p, _read_json(p)) for p in sorted(sweep_dir.rglob(RESULT_FILE))]
    return [(p, r) for p, r in marked if r is not None and r.get("status") == RUNNING]


def _alive(pid: Any) -> bool:
    """Another process that still runs (a job in this process that left RUNNING is dead)."""
    return isinstance(pid, int) and pid > 0 and pid != os.getpid() and pid_alive(pid)


def _died(error: BaseException | None, jobs: Sequence[int]) -> str:
    """How a job whose process ended without a result died, as far as the launcher says."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C) before it finished"
    text = f"{error}" if error is not None else ""
    found = re.search(r"SIG([A-Z]+)\((-?\d+)\)", text)  # joblib: {SIGKILL(-9)}
    if found is None:
        return ("died: its process ended without a result (killed by a signal, e.g. the "
                "out-of-memory killer; the launcher does not say which)")
    number = abs(int(found.group(2)))
    name = signal.Signals(number).name if number in signal.valid_signals() else found.group(1)
    if len(jobs) == 1:
        return f"died: signal {number} ({name})"
    return (f"died: signal {number} ({name}) in one of jobs {', '.join(map(str, jobs))}; the "
            "launcher stopped the others with it")


def _own_console(config: DictConfig) -> bool:
    """True for launchers whose jobs log to files of their own, not to this console."""
    return "submitit" in str(config.hydra.launcher.get("_target_", ""))


def _multirun(config: DictConfig) -> bool:
    hydra = config.get("hydra")
    return hydra is not None and hydra.get("mode") == RunMode.MULTIRUN


def _job_record(config: DictConfig, status: str, error: str) -> dict[str, Any]:
    hydra = config.hydra
    return {
        "job": int(hydra.job.num),
        "overrides": [o for o in OmegaConf.to_container(hydra.overrides.task, resolve=False)
                      if not is_rerun_override(o)],  # a rerun's own are the same for all
        "status": status,
        "error": error,
        "job_dir": str(hydra.runtime.output_dir),
    }


def sweep_plan(config: DictConfig) -> dict[str, Any] | None:
    """The basic sweeper's job count, batch size and varying keys, computed as it does; None
    for other sweepers (their job count is not known in advance)."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(
        params + list(config.hydra.overrides.task))
    jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    varying = [o.get_key_element() for o in overrides if o.is_sweep_override()]
    return {"jobs": len(jobs), "batch": sweeper.get("max_batch_size") or len(jobs),
            "varying": [k.lstrip("+~") for k in varying], "overrides": jobs}


def announce(sweep_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Log once, at the end of a sweep, where its summary files are."""
    written = [n for n in (CSV_FILE, MD_FILE, PNG_FILE) if (sweep_dir / n).exists()]
    if not written:
        return
    failed = sum(r["status"] == "FAILED" for r in rows)
    names = written[0] if len(written) == 1 else \
        "sweep_summary.{" + ",".join(n.rpartition(".")[2] for n in written) + "}"
    log.info("Sweep summary (%d jobs, %d failed): %s", len(rows), failed, sweep_dir / names)


def _is_last(done: Mapping[int, str], plan: dict[str, Any], job: int) -> bool:
    """True once the jobs of the sweep's last batch to run have all finished (`done`: job ->
    status): the whole sweep, or (fail-fast batches) the batch of `job` when a job in it
    failed."""
    total, size = int(plan["jobs"]), max(int(plan["batch"]), 1)
    end = min((job // size + 1) * size, total)
    if not all(j in done for j in range(end)):
        return False
    return end == total or any(done[j] != "COMPLETED" for j in range(end - size, end))


def _sweep_dir(job_dir: Path, subdir: str) -> Path:
    """The sweep root: the job dir without its subdir (both already resolved in the job)."""
    depth = len(Path(subdir).parts) or 1
    return job_dir.parents[depth - 1]


def _error_text(job_return: JobReturn) -> str:
    if job_return.status == JobStatus.COMPLETED:
        return ""
    err = job_return._return_value
    if err is None:
        return "unknown error"
    if isinstance(err, FinetunePrepError):
        return str(err)
    return f"internal error: {type(err).__name__}: {err}"


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job result file under `sweep_dir`, numbers read from its param_groups.json."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob(RESULT_FILE)):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rows.append(_row(result, path.parent / PARAM_FILE))
    seen = {r["job"] for r in rows}
    never = _read_json(Path(sweep_dir) / NOT_RUN_FILE) or {}
    rows += [_row(r, Path(os.devnull)) for r in never.get("jobs", []) if r["job"] not in seen]
    return sorted(rows, key=lambda r: r["job"])


def _row(result: dict[str, Any], param_file: Path) -> dict[str, Any]:
    row = {k: "" for k in COLUMNS}
    row.update({k: result.get(k, "") for k in ("job", "status", "error", "job_dir")})
    row["overrides"] = " ".join(result.get("overrides", []))
    if result.get("status") != "COMPLETED":
        return row
    numbers = result.get("row")
    if numbers is None:  # a result written without its row: read the plan now
        plan = _read_plan(param_file)
        numbers = plan_row(plan) if plan is not None else None
    if numbers is not None:
        row.update(numbers)
        row["_stages"] = result.get("stage_params") or numbers["_stages"]
        row["_unit"] = result.get("stage_unit", "tensors") if "stage_params" in result \
            else "tensors"
    return row


def plan_row(plan: Any) -> dict[str, Any]:
    """The summary's numbers of one job, from its typed Plan (JSON-able, kept in the job's
    result file so the summary never reads a plan twice)."""
    counts = plan.counts
    final = plan.schedule[-1].counts if plan.schedule else counts
    doc = plan.document
    return {
        "trainable": counts["trainable"], "total": counts["total"],
        "trainable_pct": float(f"{100 * counts['trainable'] / max(counts['total'], 1):.4g}"),
        "phases": 1 + len(plan.schedule),
        "final_trainable_pct": float(f"{100 * final['trainable'] / max(final['total'], 1):.4g}"),
        "_starts": stage_phases(doc), "groups": len(plan.groups),
        "memory_mib": round(doc["memory"]["plan_bytes"] / 2**20, 1),
        "verified": _verified_text(doc["verified"]), "_stages": stage_counts(doc),
    }


def _read_plan(path: Path) -> Any:
    """The job's Plan through the one reader of the format (paramfile.load_plan), None when
    missing or invalid. Imported here, not at the top: paramfile imports torch, and a sweep's
    main process (joblib, submitit) never needs it unless a row must be rebuilt."""
    from finetune_prep.paramfile.format import load_plan

    try:
        return load_plan(path)
    except (OSError, ValueError, FinetunePrepError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _verified_text(verified: dict[str, Any]) -> str:
    if not verified.get("backward"):
        return f"not run ({verified.get('reason', '')})"
    return "ok" if verified.get("ok") else "FAILED"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = ["job", "overrides", "status", "trainable", "total", "trainable %", "phases",
            "final trainable %", "groups", "memory (MiB)", "verified", "error", "job dir"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], f"`{r['overrides']}`" if r["overrides"] else "", r["status"],
                 _num(r["trainable"]), _num(r["total"]), r["trainable_pct"], r["phases"],
                 r["final_trainable_pct"], r["groups"],
                 r["memory_mib"], r["verified"], r["error"], r["job_dir"]]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    failed = sum(r["status"] == "FAILED" for r in rows)
    running = sum(r["status"] == RUNNING for r in rows)
    lines += ["", f"{len(rows)} jobs, {failed} failed" + (f", {running} running." if running
                                                          else ".")]
    return "# Sweep summary\n\n" + "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_summary(
    sweep_dir: Path, plot_if_failed_only: bool = False, job: int | None = None,
    status: str = "COMPLETED",
) -> list[dict[str, Any]]:
    """Rebuild sweep_summary.{csv,md,png} from every job's result file (under a lock); the
    rows, or [] when a job's call left that to a later job.

    After each job (`job` set, with its `status`) only the job that completes the sweep (or
    its failed batch) reads the results and writes the files, plot included (about 2 s of
    matplotlib), then logs where they are; without a sweep plan, every job writes the tables
    and, once a job has failed, the plot (Hydra then skips on_multirun_end, which draws it).
    """
    sweep_dir = Path(sweep_dir)
    with _locked(sweep_dir / LOCK_FILE):
        plan = _read_json(sweep_dir / PLAN_FILE) if job is not None else None
        last = plan is not None and _is_last(_note_done(sweep_dir, {job: status}), plan, job)
        if plan is not None and not last:
            return []
        rows = collect(sweep_dir)
        write_atomic(sweep_dir / CSV_FILE, to_csv(rows))
        write_atomic(sweep_dir / MD_FILE, to_markdown(rows))
        failed = plan is None and any(r["status"] == "FAILED" for r in rows)
        if not plot_if_failed_only or last or failed:
            plot(rows, sweep_dir / PNG_FILE)
        if last:
            for name in PRIVATE:  # announced: once; nothing left to lock
                (sweep_dir / name).unlink(missing_ok=True)
            announce(sweep_dir, rows)
    return rows


def _note_done(sweep_dir: Path, jobs: Mapping[int, str]) -> dict[int, str]:
    """Add the finished `jobs` (job -> status) to the sweep's ledger, under the sweep's lock;
    every job noted so far. The ledger is read bounded and only its well-formed lines count:
    a file planted in the sweep folder can delay the summary to the sweep's end, no more."""
    with os.fdopen(open_for_writing(sweep_dir / DONE_FILE), "a+", encoding="utf-8",
                   errors="replace") as ledger:
        ledger.write("".join(f"{j} {s}\n" for j, s in jobs.items()))
        ledger.flush()
        ledger.seek(0)
        text = ledger.read(DONE_MAX_BYTES)
    return {int(j): s for j, s in DONE_LINE.findall(text)}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between concurrent workers (fcntl; no lock where it is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic renames still keep every file whole
        yield
        return
    with os.fdopen(open_for_writing(path), "a") as handle:  # never through a planted link
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stage_counts(doc: dict[str, Any], numel: dict[str, int] | None = None) -> dict[str, list]:
    """[trainable, total] per stage (plus 'head' and, if any, 'other'), from the names in
    param_groups.json; counted in elements with `numel` (name -> size), else in tensors.
    A stage is a list of module names (older files joined them with '+')."""
    trainable = {n for g in doc["groups"] for n in g["params"]}
    label_of = _stage_labels(doc)
    totals: dict[str, list[int]] = {label: [0, 0] for label in dict.fromkeys(label_of.values())}
    for name in [*trainable, *doc["frozen"]]:
        label = label_of.get(name, "other")
        size = numel.get(name, 1) if numel else 1
        counts = totals.setdefault(label, [0, 0])
        counts[0] += size if name in trainable else 0
        counts[1] += size
    return {label: c for label, c in totals.items() if c[1]}


def _stage_labels(doc: dict[str, Any]) -> dict[str, str]:
    """Each parameter's stage label ('head' for the head, 'other' outside every stage)."""
    model = doc["model"]
    heads = model.get("heads") or [model["head"]]
    stages = [s.split("+") if isinstance(s, str) else list(s) for s in model["stages"]]
    buckets = [("+".join(s), s) for s in stages] + [("head", heads)]
    names = [n for g in doc["groups"] for n in g["params"]] + list(doc["frozen"])
    return {n: next((lbl for lbl, mods in buckets if any(covers(m, n) for m in mods)), "other")
            for n in names}


def stage_phases(doc: dict[str, Any]) -> dict[str, int]:
    """The phase of gradual unfreezing in which each stage starts to train (0: from the start;
    stages that never train are left out)."""
    label_of = _stage_labels(doc)
    starts = {label_of[n]: 0 for g in doc["groups"] for n in g["params"]}
    for phase in doc.get("schedule") or []:
        for name in (n for g in phase["groups"] for n in g["params"]):
            starts.setdefault(label_of.get(name, "other"), phase["phase"])
    return starts


def _param_sizes(config: DictConfig) -> dict[str, int] | None:
    """Element count of each parameter: the job's model built again on the meta device."""
    try:
        from finetune_prep.app import cache  # torch: imported in the job, not the sweep's main

        table = cache.meta_table(config.model, config.head)  # the job's own, already built
        return {n: table.numel(n) for n in table.names}
    except Exception as err:  # the plot falls back to counting tensors
        log.info("sweep summary: counting tensors, not elements (%s)", err)
        return None


def plot(rows: Sequence[dict[str, Any]], target: Path) -> bool:
    """Heatmap: stages x jobs, colour = trainable share. False (and one hint) without
    matplotlib."""
    global _hinted
    if not any("_stages" in r for r in rows):
        return False  # no job has finished yet: nothing to draw
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _hinted:
            log.info("sweep summary: %s", PLOT_HINT)
            _hinted = True
        return False
    fractions = [{k: t / n for k, (t, n) in r["_stages"].items()} if "_stages" in r else {}
                 for r in rows]
    units = {r["_unit"] for r in rows if "_unit" in r}
    unit = "parameters" if units == {"elements"} else "parameter tensors"
    labels: list[str] = []
    for f in fractions:
        labels += [k for k in f if k not in labels and k not in ("head", "other")]
    labels += [k for k in ("head", "other") if any(k in f for f in fractions)]
    grid = [[f.get(label, math.nan) for f in fractions] for label in labels]
    shared = set.intersection(*(set(r["overrides"].split()) for r in rows)) if rows else set()
    columns = [_column_label(r, shared) for r in rows]

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * max(len(rows), 1), 1.4 + 0.45 * len(labels)))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#dddddd")
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    starts = [r.get("_starts") or {} for r in rows]
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            text = "—" if math.isnan(value) else _percent(value)
            if starts[j].get(labels[i], 0) > 0:  # a stage that a later phase unfreezes
                text += f"\nfrom p{starts[j][labels[i]]}"
            color = "white" if not math.isnan(value) and value < 0.6 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    ax.set_xlabel("job")
    ax.set_ylabel("stage")
    title = f"Share of each stage's {unit} that train"
    if any(starts):
        title += "\nat the start ('from pN': phase N of the schedule unfreezes it)"
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=f"trainable share ({unit})", fraction=0.05, pad=0.02)
    fig.tight_layout()
    image_bytes = io.BytesIO()
    fig.savefig(image_bytes, format="png", dpi=110)
    plt.close(fig)
    write_atomic(target, image_bytes.getvalue())  # a temp file of its own, never a link's target
    return True


def _percent(value: float) -> str:
    """0% and 100% only when exact, so 0.06% of a stage stays visible."""
    if value in (0.0, 1.0) or 0.01 <= value <= 0.99:
        return f"{value:.0%}"
    return f"{100 * value:.2g}%" if value < 0.01 else f"{100 * value:.1f}%"


def _column_label(row: dict[str, Any], shared: set[str]) -> str:
    """'#num' and the overrides that differ between jobs (freeze=X shown as X)."""
    parts = [f"#{row['job']}"] + [o.split("=", 1)[-1] if o.startswith("freeze=") else o
                                  for o in row["overrides"].split() if o not in shared]
    label = "\n".join(_wrap(p, 18) for p in parts)
    return label + ("\nFAILED" if row["status"] != "COMPLETED" else "")


def _wrap(text: str, width: int) -> str:
    return "\n".join(text[i:i + width] for i in range(0, len(text), width)) or text
