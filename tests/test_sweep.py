"""Multirun summary: real sweeps via the CLI (basic and joblib launchers), the plot-less path."""

from __future__ import annotations

import builtins
import csv
import json
import logging
from pathlib import Path

import pytest
from conftest import run_cli

from finetune_prep import sweep
from finetune_prep.naming import MAX_LEN, PLAN_FILE, job_name

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
    done = run_cli("-m", *FAST, f"hydra.sweep.dir={sweep_dir}",
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


def _fake_result(job_dir: Path, num: int, status: str = "COMPLETED") -> None:
    job_dir.mkdir(parents=True)
    doc = {"model": {"stages": [["conv1", "bn1"], ["layer1"]], "head": "fc", "heads": ["fc"]},
           "counts": {"total": 4, "trainable": 1}, "memory": {"plan_bytes": 3 * 2**20},
           "groups": [{"name": "head", "params": ["fc.weight"]}],
           "frozen": ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight"],
           "verified": {"backward": True, "ok": True}}
    if status == "COMPLETED":
        (job_dir / "param_groups.json").write_text(json.dumps(doc))
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
    assert rows[0]["trainable_pct"] == 25.0 and rows[0]["memory_mib"] == 3.0
    assert rows[0]["verified"] == "ok" and rows[1]["error"] == "boom"
    assert (tmp_path / "sweep_summary.csv").exists() and (tmp_path / "sweep_summary.md").exists()
    assert not (tmp_path / "sweep_summary.png").exists()
    hints = [r for r in caplog.records if "finetune_prep[plot]" in r.getMessage()]
    assert len(hints) == 1


def test_sweep_over_architectures_names_folders_after_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = run_cli("-m", *FAST, f"hydra.sweep.dir={sweep_dir}", "model.arch=resnet18,resnet34",
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
def test_the_last_job_is_known_from_the_plan(batch, statuses, job, last):
    rows = [{"job": i, "status": s} for i, s in enumerate(statuses)]
    assert sweep._is_last(rows, {"jobs": 4, "batch": batch}, job) is last


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
