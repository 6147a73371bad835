"""Multirun summary: real sweeps via the CLI (basic and joblib launchers), the plot-less path."""

from __future__ import annotations

import builtins
import csv
import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_cli_here

import finetune_prep
from finetune_prep.app import sweep
from finetune_prep.app.naming import MAX_LEN, PLAN_FILE, job_name
from finetune_prep.errors import FinetunePrepError

FAST = ("model=resnet18", "verify.backward=false")


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "sweep_summary.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _check_against_job_files(row: dict[str, str]) -> None:
    doc = json.loads((Path(row["job_dir"]) / "param_groups.json").read_text())
    assert int(row["trainable"]) == doc["counts"]["trainable"]
    assert int(row["total"]) == doc["counts"]["total"]
    assert int(row["groups"]) == len(doc["groups"])
    assert float(row["memory_mib"]) == round(doc["memory"]["plan_bytes"] / 2**20, 1)
    pct = 100 * doc["counts"]["trainable"] / doc["counts"]["total"]
    assert float(row["trainable_pct"]) == pytest.approx(pct, rel=1e-3)
    assert row["status"] == "COMPLETED" and row["error"] == ""


@pytest.mark.slow
def test_sweep_with_a_failing_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run_cli_here("-m", *FAST, f"hydra.sweep.dir={sweep_dir}",
                        "freeze.rules=[{freeze: layr4}],[{freeze: layer4}]",
                        "verify.backward=false,true")
    assert done.returncode == 1, done.stderr
    assert "'layr4' matches no parameter" in done.stderr
    said = [line for line in (done.stdout + done.stderr).splitlines() if "Sweep summary" in line]
    assert len(said) == 1 and said[0].endswith(  # once, although Hydra skips on_multirun_end
        f"Sweep summary (4 jobs, 2 failed): {sweep_dir}/sweep_summary.{{csv,md,png}}")

    rows = _rows(sweep_dir)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [Path(r["job_dir"]).name for r in rows] == [  # the swept values, not the constant
        "0_verify.backward=False,freeze.rules=freeze_layr4",
        "1_verify.backward=False,freeze.rules=freeze_layer4",
        "2_verify.backward=True,freeze.rules=freeze_layr4",
        "3_verify.backward=True,freeze.rules=freeze_layer4"]
    assert not (sweep_dir / PLAN_FILE).exists() and not (sweep_dir / ".sweep_summary.lock").exists()
    failed = [r for r in rows if r["status"] == "FAILED"]
    assert len(failed) == 2
    for row in failed:
        assert "layr4" in row["overrides"]
        assert "'layr4' matches no parameter" in row["error"]
        assert row["trainable"] == "" and not (Path(row["job_dir"]) / "param_groups.json").exists()
        log = (Path(row["job_dir"]) / "finetune_prep.log").read_text()
        assert "'layr4' matches no parameter" in log
    good = [r for r in rows if r["status"] == "COMPLETED"]
    assert len(good) == 2
    for row in good:
        _check_against_job_files(row)
    by_verify = {r["overrides"].split("verify.backward=")[-1].split()[0]: r for r in good}
    assert by_verify["False"]["verified"] == "not run (verify.backward=false)"
    assert by_verify["True"]["verified"] == "ok"

    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "4 jobs, 2 failed." in md and md.count("| FAILED |") == 2
    assert (sweep_dir / "sweep_summary.png").stat().st_size > 10_000
    result = json.loads((Path(good[0]["job_dir"]) / "job_result.json").read_text())
    assert result["stage_unit"] == "elements"
    assert result["stage_params"]["head"] == [513, 513]  # head trains, 1 output


@pytest.mark.slow
def test_joblib_launcher(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run_cli("-m", *FAST, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   f"hydra.sweep.dir={sweep_dir}", "freeze=head_only,last_stage")
    assert done.returncode == 0, done.stderr
    said = [line for line in (done.stdout + done.stderr).splitlines() if "Sweep summary" in line]
    assert len(said) == 1 and "(2 jobs, 0 failed)" in said[0]
    rows = _rows(sweep_dir)
    assert [(r["job"], Path(r["job_dir"]).name) for r in rows] == [
        ("0", "0_freeze=head_only"), ("1", "1_freeze=last_stage")]
    for row in rows:
        _check_against_job_files(row)
    assert int(rows[0]["trainable"]) == 513
    assert not (sweep_dir / ".sweep_summary.lock").exists()  # on_multirun_end tidied


@functools.cache
def _real_plan_text() -> str:
    """A real param_groups.json (resnet18, head_only): the summary reads plans through
    load_plan, which refuses a hand-made imitation."""
    import tempfile

    cfg = finetune_prep.compose(["freeze=head_only", "verify.backward=false"])
    with tempfile.TemporaryDirectory() as folder:
        path = finetune_prep.prepare(cfg, materialize=False).save(folder)
        return path.read_text()


def _fake_result(job_dir: Path, num: int, status: str = "COMPLETED") -> None:
    job_dir.mkdir(parents=True)
    if status == "COMPLETED":
        (job_dir / "param_groups.json").write_text(_real_plan_text())
    result = {"job": num, "overrides": [f"freeze=x{num}"], "status": status,
              "error": "" if status == "COMPLETED" else "boom", "job_dir": str(job_dir)}
    (job_dir / "job_result.json").write_text(json.dumps(result))


def test_summary_without_matplotlib(tmp_path, monkeypatch, caplog):
    _fake_result(tmp_path / "0_a", 0)
    _fake_result(tmp_path / "1_b", 1, status="FAILED")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    for name in [m for m in __import__("sys").modules if m.split(".")[0] == "matplotlib"]:
        monkeypatch.delitem(__import__("sys").modules, name)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(sweep, "_hinted", False)
    with caplog.at_level(logging.INFO, logger="finetune_prep"):
        rows = sweep.write_summary(tmp_path)
        sweep.write_summary(tmp_path)

    assert [(r["job"], r["status"]) for r in rows] == [(0, "COMPLETED"), (1, "FAILED")]
    doc = json.loads(_real_plan_text())
    counts = doc["counts"]
    assert rows[0]["trainable_pct"] == float(f"{100 * counts['trainable'] / counts['total']:.4g}")
    assert rows[0]["memory_mib"] == round(doc["memory"]["plan_bytes"] / 2**20, 1)
    assert rows[0]["verified"] == "not run (verify.backward=false)" and rows[1]["error"] == "boom"
    assert (tmp_path / "sweep_summary.csv").exists() and (tmp_path / "sweep_summary.md").exists()
    assert not (tmp_path / "sweep_summary.png").exists()
    hints = [r for r in caplog.records if "finetune_prep[plot]" in r.getMessage()]
    assert len(hints) == 1


def test_sweep_over_architectures_names_folders_after_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run_cli_here("-m", *FAST, f"hydra.sweep.dir={sweep_dir}", "model.arch=resnet18,resnet34",
                        "hydra.sweeper.max_batch_size=1")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [
        "0_model.arch=resnet18", "1_model.arch=resnet34"]
    said = [line for line in (done.stdout + done.stderr).splitlines() if "Sweep summary" in line]
    assert len(said) == 1 and "(2 jobs, 0 failed)" in said[0]


def test_job_names_are_safe_short_and_distinct(tmp_path):
    assert job_name(["freeze.rules=[{freeze: layr4}]", "+model.arch=resnet18"]) == (
        "freeze.rules=freeze_layr4,model.arch=resnet18")
    assert job_name(["checkpoint.path=/data/run 1/best.ckpt"]) == (
        "checkpoint.path=data_run_1_best.ckpt")
    rules = [f"freeze.rules=[{{unfreeze: layer4.{i}.conv1}}, {{freeze: 're:.*bn.*'}}]"
             for i in range(2)]
    long = [job_name([r, "model.arch=resnet18"]) for r in rules]
    assert long[0] != long[1] and all(len(n) == MAX_LEN and "/" not in n for n in long)
    (tmp_path / PLAN_FILE).write_text(json.dumps({"jobs": 2, "batch": 2, "varying": ["freeze"]}))
    assert job_name(["model=resnet18", "freeze=full"], str(tmp_path)) == "freeze=full"
    assert job_name([]) == "job"


@pytest.mark.parametrize(("batch", "statuses", "job", "last"), [
    (4, ["COMPLETED"] * 4, 3, True),
    (4, ["COMPLETED"] * 3, 2, False),              # job 3 still running
    (1, ["COMPLETED", "FAILED"], 1, True),         # fail-fast: the sweep stops after job 1
    (2, ["FAILED", "COMPLETED"], 1, True),         # ... after the batch that failed
    (2, ["FAILED"], 0, False),                     # ... but only once the whole batch is in
    (2, ["COMPLETED", "COMPLETED"], 1, False),     # batches of 2 out of 4: more to come
])
def test_the_last_job_is_known_from_the_plan(tmp_path, batch, statuses, job, last):
    done = dict(enumerate(statuses))
    assert sweep._is_last(done, {"jobs": 4, "batch": batch}, job) is last
    for i, status in reversed(done.items()):  # the ledger, as jobs finishing in any order
        noted = sweep._note_done(tmp_path, {i: status})
    assert noted == done


def test_the_ledger_counts_only_its_own_lines_and_reads_a_bounded_prefix(tmp_path, monkeypatch):
    (tmp_path / sweep.DONE_FILE).write_bytes(b"junk\n7 \xff\n1 COMPLETED extra\n2 FAILED\n")
    assert sweep._note_done(tmp_path, {0: "COMPLETED"}) == {2: "FAILED", 0: "COMPLETED"}
    monkeypatch.setattr(sweep, "DONE_MAX_BYTES", 64)
    (tmp_path / sweep.DONE_FILE).write_text("x" * 100 + "\n3 FAILED\n")
    assert sweep._note_done(tmp_path, {4: "COMPLETED"}) == {}  # beyond the bound: not read


def test_a_job_reads_no_other_result_until_the_sweep_is_complete(tmp_path, monkeypatch):
    (tmp_path / PLAN_FILE).write_text(json.dumps({"jobs": 3, "batch": 3, "overrides": []}))
    read: list[Path] = []
    monkeypatch.setattr(sweep, "collect", lambda d: read.append(d) or [])
    assert sweep.write_summary(tmp_path, job=1) == []
    assert sweep.write_summary(tmp_path, job=0, status="FAILED") == []
    assert read == []  # no job read the others' results (a long sweep was quadratic)
    sweep.write_summary(tmp_path, job=2)
    assert read == [tmp_path]
    assert not any((tmp_path / n).exists() for n in sweep.PRIVATE)  # announced: cleaned up


def test_stage_counts_by_dot_boundary():
    doc = {"model": {"stages": [["conv1", "bn1"], ["layer1"]], "head": "fc", "heads": ["fc"]},
           "groups": [{"params": ["fc.weight", "layer1.0.bias"]}],
           "frozen": ["conv1.weight", "bn1.weight", "layer1.0.weight", "layer10.weight"]}
    tensors = sweep.stage_counts(doc)
    assert tensors == {"conv1+bn1": [0, 2], "layer1": [1, 2], "head": [1, 1], "other": [0, 1]}
    sizes = {"fc.weight": 10, "layer1.0.bias": 2, "layer1.0.weight": 8}
    elements = sweep.stage_counts(doc, sizes)
    assert elements["layer1"] == [2, 10] and elements["head"] == [10, 10]
    doc["model"]["stages"] = ["conv1+bn1", "layer1"]  # files written before stages were lists
    assert sweep.stage_counts(doc) == tensors


def test_schedule_jobs_get_their_phase_count_final_share_and_stage_starts(tmp_path):
    import finetune_prep
    from finetune_prep.app.pipeline import run

    job = tmp_path / "1_freeze=gradual"
    run(finetune_prep.compose(["freeze=gradual", "verify.backward=false"]), job)
    row = sweep._row({"job": 1, "status": "COMPLETED", "overrides": ["freeze=gradual"],
                      "job_dir": str(job)}, job / "param_groups.json")
    assert row["phases"] == 6 and row["final_trainable_pct"] == 100.0
    assert row["trainable_pct"] < 0.01  # phase 0: the head only
    assert row["_starts"] == {"head": 0, "layer4": 1, "layer3": 2, "layer2": 3, "layer1": 4,
                              "conv1+bn1": 5}
    assert "| 6 | 100.0 |" in sweep.to_markdown([row])


# --------------------------------------------------------------------------- a job that dies

DYING = ("model.source=target", "+model.target._target_=dying_net.DyingNet",
         "verify.backward=false")


def _dying_sweep(tmp_path: Path, die: str, *launcher: str):
    """A sweep in which the job with die=True kills its own process with SIGKILL, after the
    other two jobs have finished (so the outcome does not depend on timing)."""
    sweep_dir = tmp_path / "sweep"
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "DYING_NET_AFTER": f"{sweep_dir}:2"}
    done = run_cli("-m", *DYING, f"+model.target.die={die}", *launcher,
                   f"hydra.sweep.dir={sweep_dir}", env=env, timeout=600,
                   prelude=QUICK_SUBMITIT if "hydra/launcher=submitit_local" in launcher else "")
    return sweep_dir, done


# submitit waits 15 s for the result file of a job whose process has ended (for network file
# systems); its own tests set the wait to 0. One second here: the outcome is the same, sooner.
QUICK_SUBMITIT = "import submitit.core.core\nsubmitit.core.core.Job._results_timeout_s = 1"


def _check_dead_job_listed(sweep_dir: Path, done, dead: int, error: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Sweep summary (3 jobs, 1 failed)" in output
    rows = _rows(sweep_dir)
    assert [int(r["job"]) for r in rows] == [0, 1, 2]
    assert rows[dead]["status"] == "FAILED" and rows[dead]["error"].startswith(error)
    assert "model.target.die=True" in rows[dead]["overrides"]
    for row in rows[:dead] + rows[dead + 1:]:
        _check_against_job_files(row)
        assert int(row["total"]) == (3 * 9 * 4 + 4) + (4 + 4) + (4 * 1 + 1)  # stem, bn, fc
        assert int(row["trainable"]) == 4 * 1 + 1  # head_only, the default
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "3 jobs, 1 failed." in md and "RUNNING" not in md
    assert not (sweep_dir / PLAN_FILE).exists() and not (sweep_dir / sweep.LOCK_FILE).exists()


@pytest.mark.slow
def test_joblib_sweep_lists_a_job_killed_by_a_signal(tmp_path):
    sweep_dir, done = _dying_sweep(tmp_path, "false,false,true", "hydra/launcher=joblib",
                                   "hydra.launcher.n_jobs=2")
    assert "TerminatedWorkerError" in done.stderr  # what joblib raised, and Hydra printed
    _check_dead_job_listed(sweep_dir, done, 2, "died: signal 9 (SIGKILL)")


@pytest.mark.slow
def test_submitit_local_sweep_isolates_a_dying_job(tmp_path):
    sweep_dir, done = _dying_sweep(tmp_path, "false,true,false", "hydra/launcher=submitit_local")
    assert "UncompletedJobError" in done.stderr
    _check_dead_job_listed(sweep_dir, done, 1, "died: its process ended without a result")
    assert (sweep_dir / "sweep_summary.png").exists()


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run_cli("-m", *FAST, "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}",
                   "freeze=head_only,full", timeout=600)
    assert done.returncode == 0, done.stderr
    said = [line for line in (done.stdout + done.stderr).splitlines() if "Sweep summary" in line]
    assert len(said) == 1 and "(2 jobs, 0 failed)" in said[0]  # on this console, not only in
    rows = _rows(sweep_dir)                                     # the last job's submitit log
    assert [Path(r["job_dir"]).name for r in rows] == ["0_freeze=head_only", "1_freeze=full"]
    for row in rows:
        _check_against_job_files(row)
    assert [int(r["trainable"]) for r in rows] == [513, 11177025]


def _record(job_dir: Path, num: int, status: str, pid: int | None = None) -> Path:
    job_dir.mkdir(parents=True)
    record = {"job": num, "overrides": [f"freeze=x{num}"], "status": status, "error": "",
              "job_dir": str(job_dir), **({"pid": pid} if pid else {})}
    (job_dir / "job_result.json").write_text(json.dumps(record))
    return job_dir / "job_result.json"


def test_finish_interrupted_turns_dead_marks_into_rows_and_lists_jobs_never_run(
        tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _fake_result(tmp_path / "0_a", 0)
        _record(tmp_path / "1_b", 1, "RUNNING", dead.pid)
        _record(tmp_path / "2_c", 2, "RUNNING", alive.pid)
        plan = {"jobs": 4, "batch": 4, "varying": ["freeze"],
                "overrides": [[f"freeze=x{i}"] for i in range(4)]}
        (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
        monkeypatch.setattr(sweep, "_active", tmp_path)
        error = RuntimeError("The exit codes of the workers are {SIGKILL(-9)}")
        sweep.finish_interrupted(error, wait=0.2)
    finally:
        alive.kill()
        alive.wait()
    rows = _rows(tmp_path)
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "COMPLETED"), ("1", "FAILED"), ("2", "RUNNING"), ("3", "FAILED")]
    assert rows[1]["error"] == "died: signal 9 (SIGKILL)"
    assert rows[3]["error"].startswith("not run:") and rows[3]["overrides"] == "freeze=x3"
    assert "4 jobs, 2 failed, 1 running." in (tmp_path / "sweep_summary.md").read_text()
    assert (tmp_path / PLAN_FILE).exists()  # job 2 still runs and will rebuild the summary
    assert sweep._active is None
    sweep.finish_interrupted(error)  # once only
    assert _rows(tmp_path) == rows


def test_finish_interrupted_does_nothing_after_an_announced_sweep(tmp_path, monkeypatch):
    _fake_result(tmp_path / "0_a", 0)
    monkeypatch.setattr(sweep, "_active", tmp_path)
    sweep.finish_interrupted(RuntimeError("a job failed"))
    assert not (tmp_path / "sweep_summary.csv").exists()


def test_a_job_stopped_by_ctrl_c_is_listed_as_interrupted(tmp_path, monkeypatch):
    _fake_result(tmp_path / "0_a", 0)
    _record(tmp_path / "1_b", 1, "RUNNING", os.getpid())  # this process: Ctrl-C stopped it
    monkeypatch.setattr(sweep, "_active", tmp_path)
    sweep.finish_interrupted(KeyboardInterrupt(), wait=0.2)
    rows = _rows(tmp_path)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "COMPLETED"), ("1", "FAILED")]
    assert rows[1]["error"] == "interrupted (Ctrl-C) before it finished"


# --------------------------------------------------------------------------- planted links

def test_the_summary_writes_through_no_planted_link(tmp_path):
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    victim.write_bytes(b"keep\n")
    sweep_dir = tmp_path / "sweep"
    _fake_result(sweep_dir / "0_a", 0)
    for name in ("sweep_summary.csv", "sweep_summary.md", "sweep_summary.png",
                 ".sweep_summary.png.tmp.png"):  # the last: the plot's temp file before
        (sweep_dir / name).symlink_to(victim)
    sweep.write_summary(sweep_dir)
    assert victim.read_bytes() == b"keep\n"
    assert not (sweep_dir / "sweep_summary.csv").is_symlink()  # replaced, not followed
    assert (sweep_dir / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"
    (sweep_dir / sweep.LOCK_FILE).unlink(missing_ok=True)
    (sweep_dir / sweep.LOCK_FILE).symlink_to(victim)
    with pytest.raises(FinetunePrepError, match="is a symbolic link"):
        sweep.write_summary(sweep_dir)
    assert victim.read_bytes() == b"keep\n"
