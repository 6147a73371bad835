"""finetune_prep.check finds each way a running setup can differ from the plan, and schedulers
(torch's and timm's) keep the plan's per-group learning rates when built as the README says."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import finetune_prep
from finetune_prep.errors import FinetunePrepError


@pytest.fixture
def setup(resnet18_plan):
    """A model and optimizer set up as the plan says, in train mode."""
    torch.manual_seed(0)
    model = finetune_prep.build_model(resnet18_plan)
    optimizer = finetune_prep.build_optimizer(model, resnet18_plan)
    finetune_prep.train_mode(model, resnet18_plan)
    return model, optimizer


def differences(model, optimizer, plan) -> str:
    with pytest.raises(FinetunePrepError) as err:
        finetune_prep.check(model, optimizer, plan)
    return str(err.value)


def plan_lrs(plan) -> dict[str, float]:
    return {n: g["lr"] for g in json.loads(plan.read_text())["groups"] for n in g["params"]}


def test_a_setup_made_from_the_file_passes(setup, resnet18_plan):
    finetune_prep.check(*setup, resnet18_plan)


def test_a_stale_optimizer_is_caught(setup, resnet18_plan):
    model, _ = setup
    other = copy.deepcopy(model)  # e.g. the tensors before fully_shard replaced them
    text = differences(model, finetune_prep.build_optimizer(other, resnet18_plan), resnet18_plan)
    assert "in 2 way(s)" in text
    assert "- 17 optimizer parameter(s) are not parameters of the model" in text
    assert "- 17 trainable in the plan but in no optimizer group: layer4.0.conv1.weight" in text


def test_requires_grad_and_optimizer_membership_are_compared(setup, resnet18_plan):
    model, _ = setup
    model.layer3[1].conv2.weight.requires_grad_(True)
    model.fc.bias.requires_grad_(False)
    optimizer = torch.optim.SGD([model.fc.weight, model.layer3[0].conv1.weight], lr=0.1)
    text = differences(model, optimizer, resnet18_plan)
    assert "- 1 trainable in the plan but requires_grad=False: fc.bias" in text
    assert "- 1 frozen in the plan but requires_grad=True: layer3.1.conv2.weight" in text
    assert "- 16 trainable in the plan but in no optimizer group: layer4.0.conv1.weight" in text
    assert "- 1 frozen in the plan but in an optimizer group: layer3.0.conv1.weight" in text


def test_frozen_norm_layers_in_train_mode_are_caught(setup, resnet18_plan):
    model, optimizer = setup
    model.train()
    text = differences(model, optimizer, resnet18_plan)
    assert "15 frozen norm layers in train mode" in text and ": bn1, layer1.0.bn1" in text


def test_a_flattened_plan_is_caught_and_peak_lrs_keeps_it(setup, resnet18_plan):
    model, optimizer = setup
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    text = differences(model, optimizer, resnet18_plan)
    assert "group 'backbone': lr 0.004 in the optimizer, but the plan's ratios give 0.0004" in text
    assert "give OneCycleLR max_lr=finetune_prep.peak_lrs(optimizer)" in text

    optimizer = finetune_prep.build_optimizer(model, resnet18_plan)
    peaks = finetune_prep.peak_lrs(optimizer)
    assert sorted(set(peaks)) == sorted(set(plan_lrs(resnet18_plan).values())) == [0.01, 0.1]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    finetune_prep.check(model, optimizer, resnet18_plan)
    with pytest.raises(FinetunePrepError, match="Call finetune_prep.peak_lrs.*before any"):
        finetune_prep.peak_lrs(optimizer)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
])
def test_torch_schedulers_scale_every_group_together(make, setup, resnet18_plan):
    model, optimizer = setup
    scheduler = make(optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = plan_lrs(resnet18_plan)
    ratios = {g["lr"] / lrs[n] for g in optimizer.param_groups for n in
              [next(k for k, p in model.named_parameters() if p is g["params"][0])]}
    assert len({round(r, 12) for r in ratios}) == 1 and ratios != {1.0}
    finetune_prep.check(model, optimizer, resnet18_plan)


def test_weight_decay_ratios_are_compared(setup, resnet18_plan):
    model, optimizer = setup
    optimizer.param_groups[0]["weight_decay"] *= 3
    assert "weight_decay" in differences(model, optimizer, resnet18_plan)


def timm_lrs(optimizer, model) -> dict[str, float]:
    name = {id(p): n for n, p in model.named_parameters()}
    return {name[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_timm_scheduler_applies_the_plan_once(setup, resnet18_plan):
    from timm.scheduler import create_scheduler_v2

    model, optimizer = setup
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=4, warmup_epochs=1)
    finetune_prep.check(model, optimizer, resnet18_plan)  # warm-up starts all groups equal
    scheduler.step(2)
    lrs, planned = timm_lrs(optimizer, model), plan_lrs(resnet18_plan)
    assert lrs["fc.weight"] / lrs["layer4.0.conv1.weight"] == pytest.approx(
        planned["fc.weight"] / planned["layer4.0.conv1.weight"]) == pytest.approx(10)
    assert all("lr_scale" not in g for g in optimizer.param_groups)
    finetune_prep.check(model, optimizer, resnet18_plan)


def test_spreading_the_files_groups_applies_lr_scale_twice_and_check_says_so(resnet18_plan):
    from timm.scheduler import create_scheduler_v2

    torch.manual_seed(0)
    model = finetune_prep.build_model(resnet18_plan)
    finetune_prep.load_param_groups(model, resnet18_plan)
    params = dict(model.named_parameters())
    groups = json.loads(resnet18_plan.read_text())["groups"]
    optimizer = torch.optim.SGD([{**g, "params": [params[n] for n in g["params"]]}
                                 for g in groups], lr=0.01)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=4)
    scheduler.step(1)
    lrs = timm_lrs(optimizer, model)
    assert lrs["fc.weight"] / lrs["layer4.0.conv1.weight"] == pytest.approx(100)  # 10 x 10
    finetune_prep.train_mode(model, resnet18_plan)
    text = differences(model, optimizer, resnet18_plan)
    assert "carry lr_scale beside an lr that already includes it" in text


def test_every_difference_is_listed_at_once(setup, resnet18_plan):
    model, optimizer = setup
    model.train()
    model.layer3[1].conv2.weight.requires_grad_(True)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    text = differences(model, optimizer, resnet18_plan)
    assert "in 4 way(s)" in text


def test_a_model_on_the_meta_device_fails_with_how_to_materialize(resnet18_plan):
    """A meta-built model set up exactly as the plan says passed: now it is refused, and the
    same model materialized passes."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18(num_classes=10)
    optimizer = finetune_prep.build_optimizer(model, resnet18_plan)
    finetune_prep.train_mode(model, resnet18_plan)
    text = differences(model, optimizer, resnet18_plan)
    # 62 parameters and 60 buffers (BatchNorm statistics)
    assert text.startswith("122 tensors of the model are on the meta device: conv1.weight")
    assert "Materialize it first: `model.to_empty(device='cpu')`" in text
    model.to_empty(device="cpu")
    finetune_prep.check(model, finetune_prep.build_optimizer(model, resnet18_plan), resnet18_plan)


def test_a_model_built_by_accelerates_init_empty_weights_is_refused(resnet18_plan):
    """accelerate's init_empty_weights puts parameters (not buffers) on meta: still refused."""
    import torchvision
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = torchvision.models.resnet18(num_classes=10)
    assert model.conv1.weight.is_meta and not model.bn1.running_mean.is_meta
    optimizer = finetune_prep.build_optimizer(model, resnet18_plan)
    finetune_prep.train_mode(model, resnet18_plan)
    text = differences(model, optimizer, resnet18_plan)
    assert text.startswith("62 tensors of the model are on the meta device: conv1.weight")
    assert "to_empty" in text
