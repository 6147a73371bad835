"""Gradual unfreezing: phases planned from freeze.schedule and applied by Schedule in a loop."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import finetune_prep
from finetune_prep.app.pipeline import prepare, run
from finetune_prep.errors import FinetunePrepError


def test_gradual_plans_one_stage_per_epoch_from_the_top(gradual_plan):
    doc = json.loads(gradual_plan.read_text())
    assert doc["format"] == "finetune_prep/param_groups@2"
    assert [p["at"] for p in doc["schedule"]] == [{"epoch": e} for e in range(1, 6)]
    stages = doc["model"]["stages"]
    for phase, stage in zip(doc["schedule"], reversed(stages), strict=True):
        new = {n for g in phase["groups"] for n in g["params"]}
        assert new and all(n.split(".")[0] in stage for n in new)  # exactly that stage's params
    assert doc["schedule"][-1]["frozen"] == []
    trainable = [p["counts"]["trainable"] for p in doc["schedule"]]
    assert trainable == sorted(trainable) and trainable[-1] == doc["counts"]["total"]


def test_plain_loop_trains_exactly_the_planned_parameters_each_epoch(gradual_plan):
    doc = json.loads(gradual_plan.read_text())
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1)
    optimizer = finetune_prep.build_optimizer(model, gradual_plan)
    schedule = finetune_prep.Schedule(model, optimizer, gradual_plan)
    head_state_steps = []
    for epoch in range(4):
        phase = schedule.step(epoch=epoch)
        schedule.train_mode()
        assert phase == epoch
        planned_frozen = set(doc["schedule"][phase - 1]["frozen"]) if phase else set(doc["frozen"])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = {n: b.clone() for n, b in model.named_buffers()}
        for _ in range(2):
            loss = model(torch.randn(4, 3, 32, 32)).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved == {n for n, _ in model.named_parameters()} - planned_frozen
        frozen_bn = set(schedule.eval_modules)
        assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers()
                   if n.rpartition(".")[0] in frozen_bn)
        head_state_steps.append(float(optimizer.state[model.fc.weight]["step"]))
    assert head_state_steps == [2.0, 4.0, 6.0, 8.0]  # the head's AdamW state survives transitions
    assert len(optimizer.param_groups) == len(doc["groups"]) + sum(
        len(p["groups"]) for p in doc["schedule"][:3])


def test_backbone_at_unfreezes_everything_at_the_chosen_epoch_at_a_tenth_of_the_lr():
    prepared = prepare(finetune_prep.compose(["freeze=backbone_at",
                                              "freeze.schedule.0.at.epoch=3"]),
                       materialize=False, verify=False)
    (phase,) = prepared.document["schedule"]
    assert phase["at"] == {"epoch": 3} and phase["frozen"] == []
    assert {g["lr"] for g in phase["groups"]} == {1e-4}
    assert "fc.weight" not in {n for g in phase["groups"] for n in g["params"]}  # already grouped


@pytest.mark.parametrize(("schedule", "message"), [
    ("[{at: {epoch: 1}, rules: [{unfreeze: '@head'}]}]", r"freeze.schedule\[0\] changes nothing"),
    ("[{at: {epoch: 1}, rules: [{unfreeze: laye4}]}]", "'laye4' matches no parameter"),
    ("[{at: {epoch: 0}, rules: [{unfreeze: layer4}]}]", "a whole number >= 1"),
    ("[{at: {hour: 1}, rules: [{unfreeze: layer4}]}]", r"write \{epoch: N\} or \{step: N\}"),
    ("[{at: {epoch: 2}, rules: [{unfreeze: layer4}]}, {at: {epoch: 2}, rules: "
     "[{unfreeze: layer3}]}]", "phases must start in increasing order"),
    ("[{at: {epoch: 1}, rules: [{unfreeze: layer4}]}, {at: {step: 900}, rules: "
     "[{unfreeze: layer3}]}]", "mixes epoch and step"),
    ("[{at: {epoch: 1}, rules: [{unfreeze: layer4}], lr_mult: nan}]", "lr_mult=nan"),
    ("[{at: {epoch: 1}}]", "has no rules"),
    ("[{at: {epoch: 1}, rules: [{unfreeze: '@all'}]}, {at: {epoch: 2}, rules: "
     "[{freeze: '@stage[0]'}]}]", r"freeze.schedule\[1\] freezes 3 parameters that train in an "
                                  "earlier phase"),
    ("[{at: {epoch: 1}, rules: [{unfreeze: '@all'}]}, {at: {epoch: 2}, each_stage: true}]",
     r"freeze.schedule\[1\] \(each_stage\) changes nothing"),
])
def test_every_phase_is_validated_like_the_first(schedule, message):
    cfg = finetune_prep.compose([f"freeze.schedule={schedule}"])
    with pytest.raises(FinetunePrepError, match=message):
        prepare(cfg, materialize=False, verify=False)


def test_the_proof_covers_the_last_phase():
    prepared = prepare(finetune_prep.compose(["freeze=backbone_at", "model.input_size=[3,32,32]"]),
                       materialize=False, verify=True)
    verified = prepared.document["verified"]
    assert verified["ok"] and verified["phase"] == 1
    assert verified["trainable_without_grad"] == [] and verified["frozen_changed"] == []
    assert "Phases (2; freeze.schedule)" in prepared.summary
    assert "Verified (last phase, 1)" in prepared.summary


def test_a_version_1_file_still_reads(gradual_plan, tmp_path):
    doc = json.loads(gradual_plan.read_text())
    doc["format"] = "finetune_prep/param_groups@1"
    del doc["schedule"]
    old = tmp_path / "v1.json"
    old.write_text(json.dumps(doc))
    model = torchvision.models.resnet18(num_classes=1)
    groups = finetune_prep.load_param_groups(model, old)
    assert [p for g in groups for p in g["params"]] == [model.fc.weight, model.fc.bias]


DDP_SCRIPT = '''
import sys, torch, torchvision, finetune_prep
from torch.nn.parallel import DistributedDataParallel as DDP

plan, out = sys.argv[1], sys.argv[2]
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=1)
start = {n: p.detach().clone() for n, p in model.named_parameters()}
optimizer = finetune_prep.build_optimizer(model, plan)      # before wrapping: phase 0 trains
schedule = finetune_prep.Schedule(model, optimizer, plan)
ddp = DDP(model)
for epoch in range(3):
    phase = schedule.phase
    if schedule.step(epoch=epoch) != phase:
        ddp = DDP(model)  # the trainable set changed: DDP must see it, so wrap again
    schedule.train_mode()
    for step in range(2):
        torch.manual_seed(100 * epoch + 10 * step + rank)
        loss = ddp(torch.randn(2, 3, 32, 32)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
if rank == 0:
    torch.save({n: p.detach() for n, p in model.named_parameters()} | {"_start": start}, out)
'''


@pytest.mark.slow
def test_ddp_recipe_rewraps_at_each_transition_without_a_reducer_error(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from conftest import REPO

    plan_dir = tmp_path / "plan"
    run(finetune_prep.compose(["freeze=backbone_at", "freeze.schedule.0.at.epoch=2",
                               "freeze.schedule.0.rules=[{unfreeze: layer4}]",
                               "verify.backward=false"]), plan_dir)
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={port}", str(script), str(plan_dir / "param_groups.json"),
         str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    final = torch.load(tmp_path / "out.pt", weights_only=True)
    start = final.pop("_start")
    moved = {n for n, t in final.items() if not torch.equal(t, start[n])}
    assert moved == {n for n in final if n.startswith(("layer4.", "fc."))}


def lightning_module(model: torch.nn.Module):
    """A LightningModule around `model` whose optimizer the FinetunePrepCallback provides."""
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return None  # the callback builds the plan's optimizer

    return Classifier(model)


class _Snapshots:
    """A Lightning callback recording the planned model's tensors at each epoch's end."""

    def __init__(self, net):
        import lightning as L

        outer = self

        class Recorder(L.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                outer.states.append({n: t.detach().clone() for n, t in
                                     [*net.named_parameters(), *net.named_buffers()]})

        self.states = [{n: t.detach().clone() for n, t in
                        [*net.named_parameters(), *net.named_buffers()]}]
        self.callback = Recorder()


@pytest.mark.slow
def test_lightning_applies_backbone_at_at_its_epoch(tmp_path):
    import lightning as L

    from finetune_prep.train.lightning import FinetunePrepCallback

    run(finetune_prep.compose(["freeze=backbone_at", "freeze.schedule.0.at.epoch=1",
                               "head.num_outputs=3", "verify.backward=false"]), tmp_path)
    plan = tmp_path / "param_groups.json"
    torch.manual_seed(0)
    net = finetune_prep.build_model(plan)

    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    snapshots = _Snapshots(net)
    callback = FinetunePrepCallback(plan)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback, snapshots.callback])
    trainer.fit(lightning_module(net), loader)
    start, epoch0, epoch1 = snapshots.states
    params = {n for n, _ in net.named_parameters()}
    moved0 = {n for n in start if not torch.equal(start[n], epoch0[n])}
    moved1 = {n for n in start if not torch.equal(epoch0[n], epoch1[n])}
    assert moved0 == {"fc.weight", "fc.bias"}  # phase 0: the head only, BN statistics fixed
    assert params <= moved1  # phase 1 from epoch 1: everything trains
    assert "bn1.running_mean" in moved1  # and the BN layers now train their statistics
    assert callback.schedule.phase == 1
    doc = json.loads(plan.read_text())
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == len(doc["groups"]) + len(doc["schedule"][0]["groups"])
    assert {g["lr"] for g in optimizer.param_groups[len(doc["groups"]):]} == {1e-4}


def test_check_knows_the_current_phase(gradual_plan):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1)
    optimizer = finetune_prep.build_optimizer(model, gradual_plan)
    schedule = finetune_prep.Schedule(model, optimizer, gradual_plan)
    schedule.train_mode()
    finetune_prep.check(model, optimizer, gradual_plan)  # phase 0
    schedule.step(epoch=2)
    schedule.train_mode()
    finetune_prep.check(model, optimizer, gradual_plan, phase=schedule.phase)
    with pytest.raises(FinetunePrepError, match="differs from"):
        finetune_prep.check(model, optimizer, gradual_plan)  # phase 0 no longer holds
    with pytest.raises(FinetunePrepError, match=r"phase 9 is not in this plan: it has phases 0..5"):
        finetune_prep.check(model, optimizer, gradual_plan, phase=9)


@pytest.mark.slow
def test_lightning_refuses_a_schedule_under_ddp(tmp_path):
    import lightning as L

    from finetune_prep.train.lightning import FinetunePrepCallback

    run(finetune_prep.compose(["freeze=backbone_at", "verify.backward=false"]), tmp_path)
    plan = tmp_path / "param_groups.json"

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, strategy="ddp",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[FinetunePrepCallback(plan)])
    try:
        with pytest.raises(FinetunePrepError, match="DDPStrategy builds its wrapper once"):
            trainer.fit(lightning_module(finetune_prep.build_model(plan)),
                        torch.utils.data.DataLoader(data, batch_size=2))
    finally:  # the fit stopped before Lightning's teardown: its one-process group is still up
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_step_boundaries_apply_at_the_planned_step(tmp_path):
    run(finetune_prep.compose([
        "freeze.schedule=[{at: {step: 100}, rules: [{unfreeze: layer4}]}, "
        "{at: {step: 250}, rules: [{unfreeze: layer3}], lr: 0.0003}]",
        "verify.backward=false"]), tmp_path)
    plan = tmp_path / "param_groups.json"
    model = torchvision.models.resnet18(num_classes=1)
    optimizer = finetune_prep.build_optimizer(model, plan)
    schedule = finetune_prep.Schedule(model, optimizer, plan)
    assert schedule.unit == "step"
    assert [schedule.step(step=s) for s in (0, 99, 100, 249, 250, 999)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(FinetunePrepError, match=r"start at step boundaries; call step\(step="):
        schedule.step(epoch=5)  # the wrong unit alone would never unfreeze anything
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("layer3.", "layer4.", "fc."))}
    assert {g["lr"] for g in optimizer.param_groups[-2:]} == {0.0003}  # phase 2's absolute lr


def test_each_stage_after_a_rules_phase_skips_what_already_trains():
    prepared = prepare(finetune_prep.compose([
        "freeze.schedule=[{at: {epoch: 1}, rules: [{unfreeze: '@stage[-1]'}]}, "
        "{at: {epoch: 2}, each_stage: true}]"]), materialize=False, verify=False)
    phases = prepared.document["schedule"]
    assert [p["at"]["epoch"] for p in phases] == [1, 2, 3, 4, 5]
    assert [p["rules"][0].rsplit("{", 1)[1] for p in phases[1:]] == [
        "unfreeze: @stage[3]}", "unfreeze: @stage[2]}", "unfreeze: @stage[1]}",
        "unfreeze: @stage[0]}"]


@pytest.mark.slow
def test_lightning_resumes_a_fit_after_a_phase_change(tmp_path):
    import lightning as L

    from finetune_prep.train.lightning import FinetunePrepCallback

    run(finetune_prep.compose(["freeze=backbone_at", "freeze.schedule.0.at.epoch=1",
                               "verify.backward=false"]), tmp_path)
    plan = tmp_path / "param_groups.json"

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=2)

    def trainer(epochs: int, callback) -> L.Trainer:
        return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])

    first = trainer(2, FinetunePrepCallback(plan))
    first.fit(lightning_module(finetune_prep.build_model(plan)), loader)  # phase 1 from epoch 1
    first.save_checkpoint(tmp_path / "last.ckpt")
    callback = FinetunePrepCallback(plan)
    second = trainer(3, callback)
    second.fit(lightning_module(finetune_prep.build_model(plan)), loader,
               ckpt_path=tmp_path / "last.ckpt")  # the saved optimizer has phase 1's groups
    assert callback.schedule.phase == 1
    assert len(second.optimizers[0].param_groups) == len(first.optimizers[0].param_groups)
