"""param_groups.json: atomic writing, reading back, and the training-script API."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import TwoBranchNet

from finetune_prep import paramfile
from finetune_prep.errors import FinetunePrepError
from finetune_prep.paramfile.format import Group
from finetune_prep.train import apply


@pytest.fixture
def planned(make_cfg, tmp_path):
    """A last_stage plan with SGD for resnet18, written to tmp_path/param_groups.json."""
    from finetune_prep.app.pipeline import run

    cfg = make_cfg("freeze=last_stage", "verify.backward=false", "optim=sgd")
    return run(cfg, tmp_path)


def fresh_resnet18(num_outputs: int = 1) -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=num_outputs)


def test_file_keeps_the_contract_invariants(planned):
    doc = json.loads(planned.read_text())
    assert doc["format"] == "finetune_prep/param_groups@2"
    names = [n for n, _ in fresh_resnet18().named_parameters()]
    grouped = [n for g in doc["groups"] for n in g["params"]]
    assert sorted(grouped + doc["frozen"]) == sorted(names)
    assert len(set(grouped + doc["frozen"])) == len(names)
    assert doc["frozen"] == [n for n in names if n in doc["frozen"]]
    assert set(grouped) == {n for n in names if n.startswith(("layer4.", "fc."))}
    assert all(isinstance(g["lr"], float) and isinstance(g["weight_decay"], float)
               for g in doc["groups"])
    assert doc["optimizer"] == {"_target_": "torch.optim.SGD", "momentum": 0.9, "nesterov": True}
    assert "layer3.1.bn2" in doc["eval_modules"] and "layer4.1.bn2" not in doc["eval_modules"]


def test_load_param_groups_sets_requires_grad_and_gives_tensors(planned):
    model = fresh_resnet18()
    groups = apply.load_param_groups(model, planned)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("layer4.", "fc."))}
    params = {id(p) for g in groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(groups)  # the one-call contract
    head = next(g for g in optimizer.param_groups if g["lr"] == pytest.approx(0.1))
    assert head["params"][0] is model.fc.weight


def test_build_optimizer_uses_the_recorded_target(planned):
    optimizer = apply.build_optimizer(fresh_resnet18(), planned)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True


def test_train_mode_keeps_frozen_batchnorm_in_eval(planned):
    model = apply.train_mode(fresh_resnet18(), planned)
    assert not model.layer3[1].bn2.training and not model.bn1.training
    assert model.layer4[1].bn2.training and model.training


def test_a_file_for_another_model_lists_the_differences(planned):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(FinetunePrepError) as err:
        apply.load_param_groups(model, planned)
    text = str(err.value)
    assert "made for another model (resnet18, 1 outputs)" in text
    assert "2 parameters of the model not in the file: 0.weight, 0.bias" in text
    assert "62 names in the file not in the model: layer4.0.conv1.weight" in text


def test_wrong_format_and_broken_json(tmp_path, planned):
    other = tmp_path / "old.json"
    other.write_text(json.dumps({"format": "finetune_prep/param_groups@0", "groups": []}))
    with pytest.raises(FinetunePrepError, match="has format 'finetune_prep/param_groups@0'"):
        paramfile.read(other)
    broken = tmp_path / "broken.json"
    broken.write_text(planned.read_text()[:-40])
    with pytest.raises(FinetunePrepError, match="is not valid JSON"):
        paramfile.read(broken)


def _edited(planned, tmp_path, edit) -> str:
    """Write an edited copy of the plan; return its path."""
    doc = json.loads(planned.read_text())
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _first_frozen_into_group(doc):
    doc["groups"][0]["params"].append(doc["frozen"][0])


EDITS = {
    "a frozen parameter also in a group": (_first_frozen_into_group, "listed twice"),
    "a name in two groups": (lambda d: d["groups"][1]["params"].append(
        d["groups"][0]["params"][0]), "listed twice"),
    "lr as a string": (lambda d: d["groups"][0].update(lr="0.01"), "groups[0].lr is '0.01'"),
    "lr null": (lambda d: d["groups"][0].update(lr=None), "groups[0].lr is None"),
    "lr negative": (lambda d: d["groups"][0].update(lr=-1), "must be a finite number > 0"),
    "lr true": (lambda d: d["groups"][0].update(lr=True), "groups[0].lr is True"),
    "weight decay missing": (lambda d: d["groups"][0].pop("weight_decay"),
                             "groups[0].weight_decay is None"),
    "a group without params": (lambda d: d["groups"][0].pop("params"),
                               "groups[0].params must be a non-empty list"),
    "a group that is a string": (lambda d: d["groups"].append("head"), "is not an object"),
    "non-string names": (lambda d: d["groups"][0].update(params=[1, 2]),
                         "groups[0].params must be a non-empty list of parameter names"),
    "eval_modules not a list": (lambda d: d.update(eval_modules="bn1"),
                                "'eval_modules' must be a list"),
    "an optimizer block without _target_": (lambda d: d.update(optimizer={"lr": 1}),
                                            "'optimizer' must be an object with a '_target_'"),
    "frozen not a list": (lambda d: d.update(frozen=None), "must be lists"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_every_malformed_file_is_one_clear_error(planned, tmp_path, case):
    edit, expected = EDITS[case]
    path = _edited(planned, tmp_path, edit)
    model = fresh_resnet18()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for call in (apply.load_param_groups, apply.build_optimizer):
        with pytest.raises(FinetunePrepError, match=re.escape(expected)):
            call(model, path)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # untouched


def test_nan_in_a_file_is_refused(planned, tmp_path):
    path = tmp_path / "nan.json"
    path.write_text(planned.read_text().replace('"lr": 0.01', '"lr": NaN', 1))
    with pytest.raises(FinetunePrepError, match="groups.0..lr is nan"):
        paramfile.read(path)


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"format": "finetune_prep/param_groups@1", "x": ' + "[" * 100_000
                    + "]" * 100_000 + "}")
    with pytest.raises(FinetunePrepError, match="nested too deeply"):
        paramfile.read(path)


def test_unknown_eval_modules_and_a_rejected_optimizer_are_clear_errors(planned, tmp_path):
    model = fresh_resnet18()
    unknown = _edited(planned, tmp_path, lambda d: d.update(eval_modules=["bn9"]))
    with pytest.raises(FinetunePrepError, match="1 eval_modules not in the model: bn9"):
        apply.train_mode(model, unknown)
    bad = _edited(planned, tmp_path, lambda d: d["optimizer"].update(momentum="fast"))
    with pytest.raises(FinetunePrepError, match="rejects the file's arguments"):
        apply.build_optimizer(model, bad)
    missing = _edited(planned, tmp_path, lambda d: d["optimizer"].update(_target_="torch.nope"))
    with pytest.raises(FinetunePrepError, match="optimizer._target_ 'torch.nope' is not in "
                                                "torch.optim, and the caller did not allow it"):
        apply.build_optimizer(model, missing)


def test_name_checks_are_linear(planned, tmp_path):
    doc = json.loads(planned.read_text())
    doc["frozen"] += [f"extra.{i}.weight" for i in range(300_000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(FinetunePrepError, match="300000 names in the file not in the model"):
        apply.load_param_groups(fresh_resnet18(), path)  # quadratic checks took minutes


def test_build_model_rebuilds_each_source_from_the_file(make_cfg, tmp_path):
    from finetune_prep.app.pipeline import run

    for i, overrides in enumerate([
        ("head.num_outputs=3",),
        ("model=timm_convnext_tiny", "model.arch=test_efficientnet"),
        ("model=custom", "model.target._target_=conftest.TwoBranchNet",
         "~model.target.num_classes", "+model.target.width=4", "model.input_size=[3,16,16]"),
    ]):
        plan = run(make_cfg(*overrides, "freeze=head_only", "verify.backward=false"),
                   tmp_path / str(i))
        doc = json.loads(plan.read_text())
        model = apply.build_model(plan, target=TwoBranchNet if i == 2 else None)
        names = [n for n, _ in model.named_parameters()]
        assert sorted(names) == sorted(doc["frozen"] + [n for g in doc["groups"]
                                                        for n in g["params"]])
        assert not any(p.is_meta for p in model.parameters())
    assert doc["model"]["target"] == {"_target_": "conftest.TwoBranchNet", "width": 4}
    assert doc["model"]["input_size"] == [3, 16, 16] and model.stem.out_channels == 4


def test_build_model_says_what_an_older_target_file_lacks(planned, tmp_path):
    doc = json.loads(planned.read_text())
    doc["model"].update(source="target", arch="mypkg.Net")
    doc["model"].pop("target")
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    with pytest.raises(FinetunePrepError, match="names a _target_ model .mypkg.Net. but not its "
                                                "arguments"):
        apply.build_model(old)


def test_unknown_names_are_errors_not_key_errors(planned):
    model = fresh_resnet18()
    with pytest.raises(FinetunePrepError, match="1 names in the groups not in the model: fc.wieght"
                                                ". Did you mean: fc.weight"):
        apply.tensor_groups(model, [Group("g", 0.1, 0.0, ("fc.wieght",))])
    with pytest.raises(FinetunePrepError, match="1 eval_modules not in the model: layer1.0.bn9. "
                                                "Did you mean: layer1.0.bn2, layer1.0.bn1"):
        apply.set_train_mode(model, ["bn1", "layer1.0.bn9"])


def test_groups_for_torch_optim_never_carry_lr_scale(planned):
    groups = apply.load_param_groups(fresh_resnet18(), planned)
    assert {frozenset(g) for g in groups} == {frozenset({"params", "lr", "weight_decay"})}
    assert any(g["lr_scale"] != 1.0 for g in json.loads(planned.read_text())["groups"])


@pytest.mark.parametrize("field, value, message", [
    ("layer_decay", {"factor": "0.75", "depth": 1}, "groups[0].layer_decay is"),
    ("layer_decay", {"factor": 0.75, "depth": -1}, "groups[0].layer_decay is"),
    ("no_decay", "bias", "groups[0].no_decay must be a list of patterns"),
])
def test_the_structured_group_fields_are_checked(tmp_path, resnet18_plan, field, value, message):
    document = json.loads(resnet18_plan.read_text())
    document["groups"][0][field] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(document))
    with pytest.raises(FinetunePrepError, match=re.escape(message)):
        paramfile.read(path)
