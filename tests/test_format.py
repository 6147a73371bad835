"""paramfile/format.py: the typed Plan, read once and accepted by every training-side API."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torchvision

import finetune_prep
from finetune_prep.errors import FinetunePrepError
from finetune_prep.paramfile.format import Group, Plan, Unit, as_plan, load_plan


@pytest.fixture
def moved_plan(tmp_path, resnet18_plan):
    """A copy of the resnet18 plan that tests may delete after reading it."""
    return shutil.copy(resnet18_plan, tmp_path / "param_groups.json")


def test_load_plan_types_every_block(resnet18_plan):
    document = json.loads(resnet18_plan.read_text())
    plan = load_plan(resnet18_plan)
    assert [g.name for g in plan.groups] == [g["name"] for g in document["groups"]]
    assert plan.groups[0].params == tuple(document["groups"][0]["params"])
    assert plan.groups[0].optimizer_args() == {
        "lr": document["groups"][0]["lr"], "weight_decay": document["groups"][0]["weight_decay"]}
    assert plan.frozen == tuple(document["frozen"])
    assert plan.eval_modules == tuple(document["eval_modules"])
    assert (plan.model.source, plan.model.arch, plan.model.num_outputs) == ("torchvision",
                                                                          "resnet18", 10)
    assert plan.model.heads == ("fc",)
    assert len(plan.trainable) + len(plan.frozen) == len(set(plan.names)) == 62
    assert plan.optimizer["_target_"] == "torch.optim.SGD"
    assert plan.schedule == () and plan.origin == str(resnet18_plan)


def test_a_schedule_reads_as_typed_phases(gradual_plan):
    plan = load_plan(gradual_plan)
    assert [p.index for p in plan.schedule] == [1, 2, 3, 4, 5]
    assert {p.unit for p in plan.schedule} == {Unit.EPOCH}
    assert [p.at for p in plan.schedule] == [1, 2, 3, 4, 5]
    later = plan.at_phase(2)
    assert later.groups == plan.groups + plan.schedule[0].groups + plan.schedule[1].groups
    assert later.frozen == plan.schedule[1].frozen
    assert [p.index for p in later.schedule] == [3, 4, 5]
    with pytest.raises(FinetunePrepError, match="phase 9 is not in this plan: it has phases 0..5"):
        plan.at_phase(9)


def test_save_writes_back_the_bytes_it_read(tmp_path, gradual_plan):
    plan = load_plan(gradual_plan)
    plan.save(tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == gradual_plan.read_bytes()


def test_a_plan_cannot_be_changed_in_place(resnet18_plan):
    plan = load_plan(resnet18_plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.groups = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.document["groups"] = []  # type: ignore[index]
    copy = plan.to_document()
    copy["groups"] = []
    assert plan.groups  # a copy, not the plan's own


def test_from_document_checks_what_it_is_given(resnet18_plan):
    document = json.loads(resnet18_plan.read_text())
    document["groups"][0]["lr"] = "fast"
    with pytest.raises(FinetunePrepError, match=r"mine is not a valid param-group file: .*lr"):
        Plan.from_document(document, "mine")
    with pytest.raises(FinetunePrepError, match="expected a Plan or the path"):
        as_plan({"format": "finetune_prep/param_groups@2"})


def test_every_training_api_takes_a_plan_and_never_reads_the_file_again(moved_plan):
    plan = finetune_prep.load_plan(moved_plan)
    moved_plan.unlink()  # anything that read the path again would fail now
    model = finetune_prep.build_model(plan)
    optimizer = finetune_prep.build_optimizer(model, plan)
    assert isinstance(optimizer, torch.optim.SGD)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(plan.trainable)
    finetune_prep.train_mode(model, plan)
    assert not model.bn1.training and model.fc.training
    finetune_prep.check(model, optimizer, plan)
    schedule = finetune_prep.Schedule(model, optimizer, plan)
    assert schedule.step(epoch=3) == 0 and schedule.plan() is plan
    groups = finetune_prep.load_param_groups(torchvision.models.resnet18(num_classes=10), plan)
    assert [len(g["params"]) for g in groups] == [len(g.params) for g in plan.groups]


def test_schedule_and_check_follow_the_phases_of_a_plan(gradual_plan):
    plan = load_plan(gradual_plan)
    model = finetune_prep.build_model(plan)
    optimizer = finetune_prep.build_optimizer(model, plan)
    schedule = finetune_prep.Schedule(model, optimizer, plan)
    assert schedule.step(epoch=2) == 2
    assert len(optimizer.param_groups) == len(plan.at_phase(2).groups)
    finetune_prep.check(model, optimizer, plan, phase=2)
    with pytest.raises(FinetunePrepError, match="differs from"):
        finetune_prep.check(model, optimizer, plan, phase=1)


def test_prepared_saves_the_files_the_cli_writes(tmp_path, make_cfg):
    prepared = finetune_prep.prepare(make_cfg("head.num_outputs=3"), materialize=False,
                                     verify=False)
    target = prepared.save(tmp_path / "run")
    assert target == tmp_path / "run" / "param_groups.json"
    assert load_plan(target) == dataclasses.replace(prepared.plan, origin=str(target))
    assert (tmp_path / "run" / "trainability.txt").read_text() == prepared.summary
    assert isinstance(prepared.plan.groups[0], Group)
