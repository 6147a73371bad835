"""The CLI end to end, run as a subprocess the way a user runs it (all slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from conftest import REPO, run_cli


@pytest.mark.slow
def test_default_run_writes_the_plan_files(tmp_path, resnet18_ckpt):
    run_dir = tmp_path / "run"
    done = run_cli("freeze=head_only", f"checkpoint.path={resnet18_ckpt}",
                   f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra", "finetune_prep.log", "param_groups.json", "trainability.txt"]
    last = done.stdout.strip().splitlines()[-1]
    assert last.endswith(f"Wrote {run_dir / 'param_groups.json'}")
    doc = json.loads((run_dir / "param_groups.json").read_text())
    assert doc["counts"] == {"total": 11177025, "trainable": 513, "frozen": 11176512}
    assert doc["checkpoint"]["path"] == str(resnet18_ckpt)
    assert doc["verified"]["ok"] is True
    summary = (run_dir / "trainability.txt").read_text()
    for line in summary.splitlines():  # the console shows the same text
        assert not line or line in done.stdout
    assert "Trainable parameters: 513 (<0.01%)" in (run_dir / "finetune_prep.log").read_text()
    assert doc["provenance"]["overrides"] == [
        "freeze=head_only", f"checkpoint.path={resnet18_ckpt}"]


@pytest.mark.slow
def test_same_config_gives_a_byte_identical_groups_section(tmp_path):
    docs = []
    for name in ("a", "b"):
        done = run_cli("optim=layer_decay", "freeze=full", "verify.backward=false",
                       f"hydra.run.dir={tmp_path / name}")
        assert done.returncode == 0, done.stderr
        docs.append(json.loads((tmp_path / name / "param_groups.json").read_text()))
    assert json.dumps(docs[0]["groups"]) == json.dumps(docs[1]["groups"])
    assert docs[0]["provenance"]["config_sha256"] == docs[1]["provenance"]["config_sha256"]


@pytest.mark.slow
def test_a_typo_in_a_pattern_is_one_clear_message_and_no_file(tmp_path):
    done = run_cli("freeze.rules=[{freeze: '*'}, {unfreeze: layr4}]", "verify.backward=false",
                   f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "'layr4' matches no parameter. Did you mean: layer4" in output
    assert "Traceback" not in output
    assert not (tmp_path / "param_groups.json").exists()
    assert "Did you mean: layer4" in (tmp_path / "finetune_prep.log").read_text()


@pytest.mark.slow
def test_example_training_loop_leaves_frozen_weights_alone(tmp_path):
    done = run_cli("freeze=last_stage", "verify.backward=false", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    example = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), str(tmp_path / "param_groups.json"),
         "--steps", "2"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's finetune_prep
    assert example.returncode == 0, example.stderr
    result = json.loads(example.stdout.strip().splitlines()[-1])
    assert result["frozen_max_change"] == 0.0
    assert result["trainable_max_change"] > 0.0
    assert result["frozen_norm_stats_changed"] == []


@pytest.mark.slow
def test_version_names_finetune_prep_and_torch():
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(f"finetune_prep {finetune_prep_version()} (torch ")


@pytest.mark.slow
def test_help_says_what_each_preset_does():
    done = run_cli("--help")
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert any(line.startswith("head_only") and "Train only the fresh head" in line
               for line in lines), done.stdout
    assert any(line.startswith("sgd") and "SGD with Nesterov momentum" in line for line in lines)


@pytest.mark.slow
def test_console_shows_plain_summary_and_warnings_before_the_last_line(tmp_path):
    done = run_cli("verify.backward=false", f"hydra.run.dir={tmp_path}",
                   "freeze.rules=[{freeze: layer4}, {freeze: '*'}, {unfreeze: '@head'}]")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Model: resnet18 (torchvision)")  # no timestamp prefix
    warnings = [i for i, line in enumerate(lines) if line.startswith("[WARNING] ")]
    assert warnings and "freeze.rules[0] {freeze: layer4} has no effect" in lines[warnings[0]]
    assert max(warnings) < len(lines) - 1 and lines[-1].startswith("Wrote ")
    log = (tmp_path / "finetune_prep.log").read_text()
    assert "][finetune_prep][WARNING] - freeze.rules[0]" in log  # the file keeps timestamps


def finetune_prep_version() -> str:
    return version("finetune_prep")
