"""The run folder: one message when it cannot be written, one run at a time, no planted link
written through."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import run_cli_here
from omegaconf import OmegaConf

from finetune_prep.app import rundir
from finetune_prep.errors import FinetunePrepError

FAST = "verify.backward=false"


def one_error(done) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "Logging error" not in output, output
    assert output.count("[ERROR]") == 1, output
    return output


def test_writable_problem_names_the_reason(tmp_path, monkeypatch):
    assert rundir.writable_problem(tmp_path / "new" / "run") is None
    (tmp_path / "file").write_text("x")
    assert rundir.writable_problem(tmp_path / "file" / "run") == "Not a directory"

    def refuse(*args, **kwargs):  # root writes anywhere: simulate a read-only folder
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(rundir.tempfile, "TemporaryFile", refuse)
    assert rundir.writable_problem(tmp_path) == "Read-only file system"


def test_a_second_lock_on_a_folder_names_the_holder(tmp_path):
    assert rundir.lock(tmp_path) is None
    assert (tmp_path / rundir.LOCK_FILE).read_text().strip() == str(os.getpid())
    second = rundir.lock(tmp_path)  # flock conflicts between two opens, even in one process
    assert second is not None and f"is in use by process {os.getpid()}" in second


@pytest.mark.slow
def test_run_dir_under_a_regular_file_is_one_message(tmp_path):
    (tmp_path / "file").write_text("x")
    output = one_error(run_cli_here(FAST, f"hydra.run.dir={tmp_path / 'file' / 'run'}"))
    assert f"cannot write {tmp_path / 'file' / 'run'}: Not a directory" in output
    assert "hydra.run.dir=DIR" in output


@pytest.mark.slow
def test_a_run_dir_in_use_stops_the_second_run_before_it_writes(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli_here(FAST, f"hydra.run.dir={run_dir}").returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert rundir.lock(run_dir) is None  # this test process now holds the folder
    output = one_error(run_cli_here(FAST, "freeze=full", f"hydra.run.dir={run_dir}"))
    assert f"{run_dir} is in use by process {os.getpid()}" in output
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    lock = run_dir / rundir.LOCK_FILE
    assert {p: b for p, b in after.items() if p != lock} == \
        {p: b for p, b in before.items() if p != lock}  # .hydra/config.yaml included


# --------------------------------------------------------------------------- planted links

VICTIM = b"export PATH=/usr/bin\n"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "home" / ".bashrc"
    victim.parent.mkdir()
    victim.write_bytes(VICTIM)
    return victim


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path):
    victim = _victim(tmp_path)
    (tmp_path / rundir.LOCK_FILE).symlink_to(victim)
    problem = rundir.lock(tmp_path)
    assert problem is not None and f"{rundir.LOCK_FILE} is a symbolic link (to {victim})" in problem
    assert victim.read_bytes() == VICTIM


@pytest.mark.parametrize("entry", [".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml",
                                   ".hydra/overrides.yaml", "finetune_prep.log"])
def test_check_entries_refuses_links_where_a_run_writes(tmp_path, entry):
    victim = _victim(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    if entry == ".hydra":
        (run_dir / ".hydra").rmdir()
    (run_dir / entry).symlink_to(victim.parent if entry == ".hydra" else victim)
    with pytest.raises(FinetunePrepError, match=f"{entry} is a symbolic link"):
        rundir.check_entries(run_dir, "finetune_prep.log")
    assert victim.read_bytes() == VICTIM


def test_the_pending_hydra_folder_is_private_to_the_process_and_stable():
    name = rundir.pending_name()
    assert name == rundir.pending_name() and name.startswith(f"..hydra.{os.getpid()}.")
    assert OmegaConf.create({"d": "${fp_pending:.hydra}"}).d == name
    run_dir = Path("/x/run")
    assert rundir.staged_hydra(run_dir, name) == {run_dir / ".hydra": run_dir / name}
    assert rundir.staged_hydra(run_dir, ".hydra") == {}  # Hydra wrote .hydra itself
    assert rundir.staged_hydra(run_dir, None) == {}


def _marker_net(tmp_path: Path) -> dict[str, str]:
    """A _target_ model whose constructor leaves a marker file: the proof that a run ran."""
    (tmp_path / "markernet.py").write_text(
        "import pathlib, torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, marker):\n"
        "        super().__init__()\n"
        "        pathlib.Path(marker).write_text('ran')\n"
        "        self.fc = torch.nn.Linear(4, 2)\n")
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.slow
@pytest.mark.parametrize("entry", [rundir.LOCK_FILE, "finetune_prep.log", ".hydra/config.yaml"])
def test_a_run_folder_with_a_planted_link_is_refused_before_anything_runs(tmp_path, entry):
    victim = _victim(tmp_path)
    marker = tmp_path / "ran"
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / entry).symlink_to(victim)
    output = one_error(run_cli_here(FAST, "model.source=target",
                                    "+model.target._target_=markernet.Net",
                                    f"+model.target.marker={marker}", "model.input_size=[4]",
                                    f"hydra.run.dir={run_dir}", env=_marker_net(tmp_path)))
    assert f"{run_dir / entry} is a symbolic link (to {victim})" in output
    assert "hydra.run.dir=DIR" in output
    assert victim.read_bytes() == VICTIM and not marker.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted({".hydra", entry.split("/")[0]})


@pytest.mark.slow
def test_a_sweep_job_folder_with_planted_links_fails_that_job_only(tmp_path):
    victim = _victim(tmp_path)
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "0_freeze=head_only").mkdir(parents=True)
    (sweep_dir / "0_freeze=head_only" / "finetune_prep.log").symlink_to(victim)
    (sweep_dir / "1_freeze=full" / ".hydra").mkdir(parents=True)
    (sweep_dir / "1_freeze=full" / ".hydra" / "config.yaml").symlink_to(victim)
    done = run_cli_here("-m", FAST, "freeze=head_only,full,last_stage",
                        f"hydra.sweep.dir={sweep_dir}")
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert victim.read_bytes() == VICTIM
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/job_result.json"))]
    assert [r["status"] for r in results] == ["FAILED", "FAILED", "COMPLETED"]
    assert "finetune_prep.log is a symbolic link" in results[0]["error"]
    assert ".hydra/config.yaml is a symbolic link" in results[1]["error"]
    assert not (sweep_dir / "0_freeze=head_only" / "param_groups.json").exists()
    assert (sweep_dir / "2_freeze=last_stage" / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["multirun.yaml", ".sweep_summary.lock"])
def test_a_sweep_folder_with_a_planted_link_is_refused(tmp_path, entry):
    victim = _victim(tmp_path)
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / entry).symlink_to(victim)
    output = one_error(run_cli_here("-m", FAST, "freeze=head_only,full",
                                    f"hydra.sweep.dir={sweep_dir}"))
    assert f"{sweep_dir / entry} is a symbolic link" in output
    assert victim.read_bytes() == VICTIM and [p.name for p in sweep_dir.iterdir()] == [entry]
