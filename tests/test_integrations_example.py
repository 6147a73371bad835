"""examples/train.py trains every kind of plan the CLI writes: torchvision, timm and `_target_`
models, rebuilt from the file by finetune_prep.build_model; frozen weights and frozen BatchNorm
statistics stay put, every trainable parameter moves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_cli_here

pytestmark = pytest.mark.slow

PLANS = {
    "torchvision": ["freeze=last_stage", "head.num_outputs=3"],
    "timm": ["model=timm_convnext_tiny", "model.arch=test_efficientnet", "freeze=last_stage"],
    "target": ["model=custom", "model.target._target_=conftest.TwoBranchNet",
               "~model.target.num_classes", "+model.target.width=4", "model.input_size=[3,16,16]",
               "freeze=head_only"],
}
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


@pytest.mark.parametrize("kind", list(PLANS))
def test_example_trains_each_kind_of_plan(kind, tmp_path):
    made = run_cli_here(*PLANS[kind], "verify.backward=false", f"hydra.run.dir={tmp_path}", env=ENV)
    assert made.returncode == 0, made.stdout + made.stderr
    plan = tmp_path / "param_groups.json"
    target = ["--target", "conftest.TwoBranchNet"] if kind == "target" else []
    trained = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), str(plan), "--steps", "2",
         "--batch-size", "2", *target],
        env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300,
    )
    assert trained.returncode == 0, trained.stdout + trained.stderr
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert result["frozen_max_change"] == 0.0 and result["frozen_norm_stats_changed"] == []
    assert result["trainable_max_change"] > 0 and result["trainable_unmoved"] == []
    assert json.loads(plan.read_text())["eval_modules"]  # frozen BN layers were there to hold


def test_example_says_what_a_target_model_needs(tmp_path):
    made = run_cli_here(*PLANS["target"], "verify.backward=false", f"hydra.run.dir={tmp_path}",
                        env=ENV)
    assert made.returncode == 0, made.stdout + made.stderr
    env = {**os.environ, **ENV}  # conftest.py importable: the file still never imports it
    trained = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), str(tmp_path / "param_groups.json"),
         "--steps", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert trained.returncode == 1
    assert "describes a _target_ model (conftest.TwoBranchNet); a plan file never imports or " \
        "calls a class it names. Pass the class yourself: finetune_prep.build_model(path, " \
        "target=TwoBranchNet)." in trained.stderr
