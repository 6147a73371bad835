"""A plan file is untrusted input (issue 19): every attack a crafted param_groups.json tried,
each derived from a real plan the tool wrote. Reading, applying and rebuilding from a file never
imports or calls a name it holds (only an allowlisted optimizer class, or the class the caller
passes), never resolves an interpolation, and refuses every malformed schedule phase with one
FinetunePrepError naming the file and the key path."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import REPO, TwoBranchNet

import finetune_prep
from finetune_prep import paramfile
from finetune_prep.errors import FinetunePrepError
from finetune_prep.train import apply


def crafted(plan: Path, tmp_path: Path, edit: Callable[[dict], object], name: str = "x") -> Path:
    """A copy of the real plan `plan`, changed by `edit`, written as JSON."""
    doc = json.loads(plan.read_text())
    edit(doc)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def resnet18(num_outputs: int = 10) -> torch.nn.Module:
    """The plan's model on the meta device: these tests read files, they never compute."""
    with torch.device("meta"):
        return torchvision.models.resnet18(weights=None, num_classes=num_outputs)


def every_reader(path: Path) -> None:
    """Each public way of reading a file; each must raise FinetunePrepError (checked by caller)."""
    for call in (lambda: apply.load_param_groups(resnet18(), path),
                 lambda: apply.build_optimizer(resnet18(), path),
                 lambda: apply.build_model(path)):
        with pytest.raises(FinetunePrepError):
            call()


class RunsShell:
    """A pickle that runs a shell command when loaded with weights_only=False."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def marker(tmp_path) -> Path:
    """A file that only an attack that ran would create."""
    return tmp_path / "pwned"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file an attack would truncate or overwrite."""
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious data\n" * 100)
    return path


def _code_targets(marker: Path, tmp_path: Path) -> dict[str, dict]:
    """`_target_` blocks that each create `marker` if anything calls them."""
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump(RunsShell(f"touch {marker}"), f)
    return {
        "os.system": {"_target_": "os.system", "_args_": [f"touch {marker}"]},
        "subprocess.run": {"_target_": "subprocess.run", "args": ["touch", str(marker)]},
        "builtins.exec": {"_target_": "builtins.exec",
                          "_args_": [f"open({str(marker)!r}, 'w').close()"]},
        "pickle.loads via torch.load": {"_target_": "torch.load", "f": str(evil),
                                        "weights_only": False},
        "builtins.open": {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
    }


WHERE = {  # where a crafted block goes in the plan
    "the optimizer itself": lambda d, b: d.update(optimizer=b),
    "an optimizer argument": lambda d, b: d["optimizer"].update(momentum=b),
    "deep in an optimizer argument": lambda d, b: d["optimizer"].update(
        betas=[0.9, {"x": [b]}]),
    "a model kwarg": lambda d, b: d["model"].update(kwargs={"zero_init_residual": b}),
    "the model target": lambda d, b: d["model"].update(source="target", target=b,
                                                       arch=b["_target_"]),
    "a model target argument": lambda d, b: d["model"].update(
        source="target", target={"_target_": "conftest.TwoBranchNet", "width": b}),
}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("attack", ["os.system", "subprocess.run", "builtins.exec",
                                    "pickle.loads via torch.load", "builtins.open"])
def test_no_target_in_a_file_is_ever_called(resnet18_plan, tmp_path, marker, attack, where):
    block = _code_targets(marker, tmp_path)[attack]
    path = crafted(resnet18_plan, tmp_path, lambda d: WHERE[where](d, block))
    uses = {  # the calls that use the crafted block: each refuses it
        "optimizer": (lambda: apply.build_optimizer(resnet18(), path),
                      lambda: apply.build_optimizer(resnet18(), path,
                                                        optimizers=[torch.optim.SGD])),
        "model": (lambda: apply.build_model(path),
                  lambda: apply.build_model(path, target=TwoBranchNet)),
    }
    for kind, calls in uses.items():
        for call in calls:
            if kind in where:
                with pytest.raises(FinetunePrepError, match=re.escape(str(path))):
                    call()
            else:
                with contextlib.suppress(FinetunePrepError):  # refused as data, or unused
                    call()
    for call in (lambda: apply.load_param_groups(resnet18(), path),
                 lambda: finetune_prep.train_mode(resnet18(), path)):
        with contextlib.suppress(FinetunePrepError):  # these never use the optimizer block
            call()
    assert not marker.exists()


def test_nested_open_never_truncates_a_file(resnet18_plan, tmp_path, victim):
    """The tester's first finding: builtins.open(victim, 'w') nested in the optimizer block,
    while build_optimizer still returned a working AdamW."""
    before = victim.read_bytes()
    opener = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    path = crafted(resnet18_plan, tmp_path, lambda d: d.update(
        optimizer={"_target_": "torch.optim.AdamW", "foreach": None,
                   "differentiable": {"_target_": "builtins.bool", "_args_": [opener]}}))
    model = resnet18()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(FinetunePrepError) as err:
        apply.build_optimizer(model, path)
    assert "optimizer.differentiable._target_ is a Hydra key" in str(err.value)
    assert victim.read_bytes() == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # untouched


def test_hydra_instantiate_would_have_run_it(resnet18_plan, tmp_path, victim):
    """The same block through Hydra's instantiate (what the reader did before) truncates the
    victim: the attack above is real, and only the reader stops it."""
    from hydra.utils import instantiate

    instantiate({"_target_": "builtins.open", "file": str(victim), "mode": "w"}).close()
    assert victim.read_bytes() == b""


def test_an_optimizer_in_a_module_never_imported_is_not_imported(resnet18_plan, tmp_path):
    module = "this"  # the Zen of Python: printed on import, never imported by the library
    assert module not in sys.modules
    path = crafted(resnet18_plan, tmp_path, lambda d: d.update(
        optimizer={"_target_": f"{module}.Optimizer"}))
    with pytest.raises(FinetunePrepError, match="'this.Optimizer' is not in torch.optim, and "
                                                "the caller did not allow it"):
        apply.build_optimizer(resnet18(), path)
    with pytest.raises(FinetunePrepError):  # a caller's class does not widen it either
        apply.build_optimizer(resnet18(), path, optimizers=[torch.optim.SGD])
    assert module not in sys.modules


@pytest.mark.parametrize("target, why", [
    ("torch.optim.lr_scheduler.LambdaLR", "is not an optimizer class of torch.optim"),
    ("torch.optim.lr_scheduler", "is not an optimizer class of torch.optim"),
    ("torch.optim.Optimizer", "is the base class, not an optimizer"),
    ("torch.optim.swa_utils.AveragedModel", "is not an optimizer class of torch.optim"),
    ("torch.optim.SGD.__init__", "is not an optimizer class of torch.optim"),
    ("torch.optim._functional", "is not an optimizer class of torch.optim"),
    ("torch.nn.Linear", "is not in torch.optim"),
])
def test_only_torch_optim_optimizer_classes_are_allowed(resnet18_plan, tmp_path, target, why):
    path = crafted(resnet18_plan, tmp_path, lambda d: d.update(optimizer={"_target_": target}))
    model = resnet18()
    with pytest.raises(FinetunePrepError) as err:
        apply.build_optimizer(model, path)
    assert f"optimizer._target_ {target!r} {why}" in str(err.value)
    assert "optimizers=[MyOptimizer]" in str(err.value)  # how to allow one
    assert all(p.requires_grad for p in model.parameters())  # refused before applying


def test_every_torch_optim_optimizer_builds_from_a_file(resnet18_plan, tmp_path):
    from finetune_prep.paramfile.allowlist import torch_optimizers

    known = torch_optimizers()
    assert {"torch.optim.AdamW", "torch.optim.SGD", "torch.optim.Adam"} <= set(known)
    for target in ("torch.optim.Adam", "torch.optim.RMSprop", "torch.optim.Adagrad"):
        path = crafted(resnet18_plan, tmp_path, lambda d, t=target: d.update(
            optimizer={"_target_": t}), name=target)
        optimizer = apply.build_optimizer(resnet18(), path)
        assert type(optimizer) is known[target]
        assert len(optimizer.param_groups) == len(json.loads(path.read_text())["groups"])


@pytest.mark.parametrize("where", ["optimizer arg", "optimizer target", "model arch",
                                   "model kwargs", "target arg"])
def test_interpolations_are_never_resolved(resnet18_plan, tmp_path, monkeypatch, where):
    monkeypatch.setenv("HOME", "/secret-home-0x5eed")
    literal = "${oc.env:HOME}"
    edit = {
        "optimizer arg": lambda d: d["optimizer"].update(momentum=literal),
        "optimizer target": lambda d: d.update(optimizer={"_target_": literal}),
        "model arch": lambda d: d["model"].update(arch=literal),
        "model kwargs": lambda d: d["model"].update(kwargs={"a": {"b": literal}}),
        "target arg": lambda d: d["model"].update(
            source="target", target={"_target_": "conftest.TwoBranchNet", "width": literal}),
    }[where]
    path = crafted(resnet18_plan, tmp_path, edit)
    for call in (lambda: apply.build_optimizer(resnet18(), path),
                 lambda: apply.build_model(path, target=TwoBranchNet)):
        with pytest.raises(FinetunePrepError) as err:
            call()
        text = str(err.value)
        assert "/secret-home-0x5eed" not in text
        assert f"is '{literal}': an interpolation; a plan file is plain data" in text


def test_a_target_model_needs_the_callers_class(target_plan, tmp_path):
    with pytest.raises(FinetunePrepError) as err:
        apply.build_model(target_plan)
    assert "describes a _target_ model (conftest.TwoBranchNet); a plan file never imports " \
           "or calls a class it names" in str(err.value)
    assert "build_model(path, target=TwoBranchNet)" in str(err.value)

    with pytest.raises(FinetunePrepError, match=r"was made for conftest.TwoBranchNet, but "
                                                r"target= is torch.nn.modules.linear.Linear"):
        apply.build_model(target_plan, target=torch.nn.Linear)

    model = apply.build_model(target_plan, target=TwoBranchNet)
    assert isinstance(model, TwoBranchNet) and model.stem.out_channels == 4  # the file's width
    optimizer = apply.build_optimizer(model, target_plan)
    finetune_prep.train_mode(model, target_plan)
    finetune_prep.check(model, optimizer, target_plan)


def test_a_class_named_like_the_target_but_elsewhere_is_refused(target_plan, tmp_path):
    class TwoBranchNet(torch.nn.Module):  # same name, another module: not the file's class
        pass

    with pytest.raises(FinetunePrepError, match="was made for conftest.TwoBranchNet, but "
                                                "target= is test_untrusted_plan"):
        apply.build_model(target_plan, target=TwoBranchNet)


def test_target_given_for_a_registry_model_is_refused(resnet18_plan):
    with pytest.raises(FinetunePrepError, match="describes a torchvision model .resnet18., not "
                                                "a _target_ one"):
        apply.build_model(resnet18_plan, target=TwoBranchNet)


@pytest.mark.parametrize("source, kwarg", [("timm", "checkpoint_path"),
                                           ("timm", "pretrained_cfg"),
                                           ("hf", "trust_remote_code"),
                                           ("hf", "revision")])
def test_kwargs_that_read_files_or_run_code_are_refused(resnet18_plan, tmp_path, marker,
                                                        source, kwarg):
    evil = tmp_path / "evil.pth"
    torch.save({"x": RunsShell(f"touch {marker}")}, evil)
    path = crafted(resnet18_plan, tmp_path, lambda d: d["model"].update(
        source=source, arch="test_efficientnet" if source == "timm" else str(tmp_path),
        kwargs={kwarg: str(evil) if kwarg == "checkpoint_path" else True}))
    with pytest.raises(FinetunePrepError, match=f"model.kwargs.{kwarg} is not accepted from a "
                                                "plan file"):
        apply.build_model(path)
    assert not marker.exists()


def test_an_arch_outside_the_registry_is_refused(resnet18_plan, tmp_path):
    path = crafted(resnet18_plan, tmp_path, lambda d: d["model"].update(arch="os.system"))
    with pytest.raises(FinetunePrepError, match="model.arch=.os.system. is not a torchvision "
                                                "classification, detection or segmentation model"):
        apply.build_model(path)


def test_a_timm_optimizer_builds_only_when_allowed(resnet18_plan, tmp_path):
    import timm.optim

    for target in ("timm.optim.Lamb", "timm.optim.lamb.Lamb"):
        path = crafted(resnet18_plan, tmp_path, lambda d, t=target: d.update(
            optimizer={"_target_": t, "weight_decay": 0.01}), name=target)
        with pytest.raises(FinetunePrepError, match="the caller did not allow it"):
            apply.build_optimizer(resnet18(), path)
        for allowed in ([timm.optim.Lamb], [target]):
            optimizer = apply.build_optimizer(resnet18(), path, optimizers=allowed)
            assert type(optimizer) is timm.optim.Lamb
            assert optimizer.defaults["weight_decay"] == 0.01
    other = crafted(resnet18_plan, tmp_path, lambda d: d.update(
        optimizer={"_target_": "timm.optim.Adan"}), name="adan")
    with pytest.raises(FinetunePrepError, match="'timm.optim.Adan' is not in torch.optim"):
        apply.build_optimizer(resnet18(), other, optimizers=[timm.optim.Lamb])
    with pytest.raises(FinetunePrepError, match="takes torch.optim.Optimizer subclasses"):
        apply.build_optimizer(resnet18(), other, optimizers=[torch.nn.Linear])


def test_import_finetune_prep_stays_light():
    code = "import finetune_prep, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------- schedule phases


def _phase(k: int, **changes) -> Callable[[dict], None]:
    return lambda d: d["schedule"][k].update(**changes)


def _drop(k: int, key: str) -> Callable[[dict], None]:
    return lambda d: d["schedule"][k].pop(key)


def _refreeze_head(d: dict) -> None:
    d["schedule"][2]["frozen"].append("fc.weight")  # the head trains from phase 0


def _leave_outside(d: dict) -> None:
    d["schedule"][0]["frozen"].remove("conv1.weight")  # in no group and no longer frozen


def _swap_order(d: dict) -> None:
    d["schedule"][1]["at"], d["schedule"][2]["at"] = {"epoch": 3}, {"epoch": 2}


PHASE_EDITS = {
    "at missing": (_drop(0, "at"), "schedule[0].at is None"),
    "at a string": (_phase(1, at="1"), "schedule[1].at is '1'"),
    "at a bare number": (_phase(1, at=2), "schedule[1].at is 2"),
    "at negative": (_phase(0, at={"epoch": -1}), "schedule[0].at is {'epoch': -1}"),
    "at zero": (_phase(0, at={"epoch": 0}), "schedule[0].at is {'epoch': 0}"),
    "at a float": (_phase(0, at={"epoch": 1.5}), "schedule[0].at is {'epoch': 1.5}"),
    "at a bool": (_phase(0, at={"epoch": True}), "schedule[0].at is {'epoch': True}"),
    "at with two units": (_phase(0, at={"epoch": 1, "step": 5}), "schedule[0].at is"),
    "at an unknown unit": (_phase(0, at={"hour": 1}), "schedule[0].at is {'hour': 1}"),
    "at empty": (_phase(0, at={}), "schedule[0].at is {}"),
    "units mixed": (_phase(1, at={"step": 900}), "schedule[1].at uses step, the phase before "
                                                 "epoch"),
    "phases out of order": (_swap_order, "schedule[2].at is epoch 2, not after the phase before"),
    "phase number wrong": (_phase(1, phase=7), "schedule[1].phase is 7; it must be 2"),
    "phase number a string": (_phase(1, phase="2"), "schedule[1].phase is '2'"),
    "phase missing": (_drop(3, "phase"), "schedule[3].phase is None"),
    "counts missing": (_drop(0, "counts"), "schedule[0].counts is None"),
    "counts a string": (_phase(0, counts="many"), "schedule[0].counts is 'many'"),
    "counts negative": (_phase(0, counts={"total": 5, "trainable": -1, "frozen": 6}),
                        "schedule[0].counts is"),
    "counts inconsistent": (_phase(0, counts={"total": 5, "trainable": 1, "frozen": 1}),
                            "schedule[0].counts: trainable 1 + frozen 1 is not total 5"),
    "counts of another model": (_phase(0, counts={"total": 5, "trainable": 5, "frozen": 0}),
                                "schedule[0].counts.total is 5, the plan's is 11177025"),
    "frozen missing": (_drop(2, "frozen"), "schedule[2].frozen must be a list"),
    "frozen names not strings": (_phase(2, frozen=[1, 2]), "schedule[2].frozen must be a list"),
    "rules not a list": (_phase(0, rules="unfreeze all"), "schedule[0].rules must be a list"),
    "groups not a list": (_phase(0, groups={"params": ["fc.weight"]}),
                          "schedule[0].groups must be a list"),
    "a group lr a string": (lambda d: d["schedule"][1]["groups"][0].update(lr="1e-3"),
                            "schedule[1].groups[0].lr is '1e-3'"),
    "eval module '' (the whole model)": (_phase(0, eval_modules=[""]),
                                         "schedule[0].eval_modules[0] is '': the whole model"),
    "eval_modules not a list": (_phase(0, eval_modules="bn1"), "'schedule[0].eval_modules' "
                                                               "must be a list"),
    "a phase not an object": (lambda d: d["schedule"].append("later"),
                              "schedule[5] is not an object"),
    "the head frozen later": (_refreeze_head, "schedule[2].frozen: 1 parameters that train in "
                                              "an earlier phase (a phase only adds what trains)"
                                              ": fc.weight"),
    "a parameter outside every group": (_leave_outside, "schedule[0]: 1 parameters in no group "
                                                        "so far and not frozen"),
    "a phase frozen name the plan lacks": (lambda d: d["schedule"][0]["frozen"].append("x.y"),
                                           "schedule[0].frozen: 1 parameters the plan does not "
                                           "list: x.y"),
    "a phase group name the plan lacks": (
        lambda d: d["schedule"][0]["groups"][0]["params"].append("x.y"),
        "schedule[0].groups: 1 parameters the plan does not list: x.y"),
    "a phase group name also frozen in that phase": (
        lambda d: d["schedule"][0]["frozen"].append(d["schedule"][0]["groups"][0]["params"][0]),
        "schedule[0].frozen: 1 parameters in a group of the same phase"),
    "top-level eval module ''": (lambda d: d.update(eval_modules=["bn1", ""]),
                                 "eval_modules[1] is '': the whole model"),
    "top-level counts inconsistent": (lambda d: d["counts"].update(frozen=0),
                                      "counts: trainable 513 + frozen 0 is not total"),
    "model num_outputs a string": (lambda d: d["model"].update(num_outputs="10"),
                                   "model.num_outputs is '10'; it must be a whole number >= 1"),
    "model source unknown": (lambda d: d["model"].update(source="pip"), "model.source is 'pip'"),
    "model stages not lists": (lambda d: d["model"].update(stages=[1]), "model.stages is [1]"),
    "model input_size negative": (lambda d: d["model"].update(input_size=[3, -1, 4]),
                                  "model.input_size is [3, -1, 4]"),
}


@pytest.mark.parametrize("case", list(PHASE_EDITS))
def test_every_malformed_phase_is_one_clear_error(gradual_plan, tmp_path, case):
    edit, expected = PHASE_EDITS[case]
    path = crafted(gradual_plan, tmp_path, edit)
    with pytest.raises(FinetunePrepError) as err:
        paramfile.read(path)
    text = str(err.value)
    assert text.startswith(f"{path} is not a valid param-group file: ")
    assert expected in text


def test_schedule_and_check_refuse_a_malformed_phase_not_crash(gradual_plan, tmp_path):
    """Each reader (Schedule, check, the Lightning callback) gets the one clear error, where a
    missing `at` gave KeyError and an ill-typed one TypeError."""
    from finetune_prep.train.lightning import FinetunePrepCallback

    model = resnet18(1)
    optimizer = finetune_prep.build_optimizer(model, gradual_plan)
    for case in ("at missing", "at a string", "counts missing", "the head frozen later"):
        path = crafted(gradual_plan, tmp_path, PHASE_EDITS[case][0], name=case)
        for call in (lambda p: finetune_prep.Schedule(model, optimizer, p),
                     lambda p: finetune_prep.check(model, optimizer, p, phase=1),
                     FinetunePrepCallback):
            with pytest.raises(FinetunePrepError, match=re.escape(PHASE_EDITS[case][1])):
                call(path)


def test_check_no_longer_passes_with_the_whole_model_as_an_eval_module(resnet18_plan, tmp_path):
    """eval_modules [""] put the whole model in eval mode and `check` passed."""
    path = crafted(resnet18_plan, tmp_path, lambda d: d.update(eval_modules=[""]))
    model = finetune_prep.build_model(resnet18_plan)
    optimizer = finetune_prep.build_optimizer(model, resnet18_plan)
    with pytest.raises(FinetunePrepError, match=re.escape("eval_modules[0] is '': the whole "
                                                          "model")):
        finetune_prep.check(model, optimizer, path)
    with pytest.raises(FinetunePrepError):
        finetune_prep.train_mode(model, path)


def test_a_valid_schedule_still_reads(gradual_plan):
    doc = paramfile.read(gradual_plan)
    assert [p["phase"] for p in doc["schedule"]] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- adapter blocks


@pytest.fixture(scope="module")
def lora_plan(tmp_path_factory) -> Path:
    """A real LoRA plan of a tiny torchvision ViT (adapter=lora)."""
    from conftest import TINY_VIT

    from finetune_prep.app.pipeline import prepare

    cfg = finetune_prep.compose([*TINY_VIT, "adapter=lora"])
    return prepare(cfg, materialize=False).save(tmp_path_factory.mktemp("lora"))


def rebuild(path: Path) -> torch.nn.Module:
    return apply.build_model(path, target=torchvision.models.VisionTransformer)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["adapter"].update(peft_type="ADALORA"), r"adapter.peft_type is 'ADALORA'"),
    (lambda d: d["adapter"]["config"].update(_target_="os.system"),
     r"adapter.config._target_ is a Hydra key"),
    (lambda d: d["adapter"]["config"].update(r="${oc.env:HOME}"), r"an interpolation"),
    (lambda d: d["adapter"]["config"].update(r=-1), r"adapter.config.r is -1"),
    (lambda d: d["adapter"]["config"].update(init_lora_weights="loftq"),
     r"adapter.config.init_lora_weights is 'loftq'"),
    (lambda d: d["adapter"]["config"].update(target_modules="re:.*"),
     r"adapter.config.target_modules is 're:.\*'"),
    (lambda d: d["adapter"].update(params="all"), r"adapter.params must be a list"),
])
def test_a_malformed_adapter_block_is_refused_on_read(lora_plan, tmp_path, edit, message):
    path = crafted(lora_plan, tmp_path, edit)
    with pytest.raises(FinetunePrepError, match=message):
        finetune_prep.load_plan(path)
    with pytest.raises(FinetunePrepError, match=message):
        rebuild(path)


@pytest.mark.parametrize(("key", "value"), [
    ("megatron_core", "antigravity"),  # peft would import it
    ("megatron_config", {"tensor_model_parallel_size": 1}),
    ("loftq_config", {"loftq_bits": 4}),
    ("revision", "main"),
    ("eva_config", {"rho": 2.0}),
])
def test_adapter_fields_outside_the_allowlist_must_hold_peft_defaults(
        lora_plan, tmp_path, key, value):
    path = crafted(lora_plan, tmp_path, lambda d: d["adapter"]["config"].update({key: value}))
    finetune_prep.load_plan(path)  # plain data: readable; rebuilding refuses it
    with pytest.raises(FinetunePrepError, match=rf"adapter.config.{key} is .*a plan file may "
                                                "set only"):
        rebuild(path)
    assert "antigravity" not in sys.modules


def test_unknown_adapter_field_is_refused(lora_plan, tmp_path):
    path = crafted(lora_plan, tmp_path, lambda d: d["adapter"]["config"].update(evil=1))
    with pytest.raises(FinetunePrepError, match="adapter.config.evil is not a field"):
        rebuild(path)


def test_the_real_adapter_plan_rebuilds_the_peft_model(lora_plan):
    import peft

    model = rebuild(lora_plan)
    assert isinstance(model, peft.PeftModel)
    counts = finetune_prep.load_plan(lora_plan).counts
    assert model.get_nb_trainable_parameters() == (counts["trainable"], counts["total"])
