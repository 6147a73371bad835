"""The Python API `prepare`: a real model, weights loaded, the plan proven."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from finetune_prep import prepare
from finetune_prep.app import proof
from finetune_prep.app.proof import measure_activations
from finetune_prep.errors import FinetunePrepError
from finetune_prep.plan import memory
from finetune_prep.plan.memory import check_memory, human_bytes


def test_prepare_loads_the_checkpoint_and_sets_requires_grad(make_cfg, resnet18_ckpt):
    prepared = prepare(make_cfg(f"checkpoint.path={resnet18_ckpt}"))
    state = torch.load(resnet18_ckpt, weights_only=True)
    model_state = prepared.model.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in state.items())
    assert not any(t.is_meta for t in model_state.values())
    assert [n for n, p in prepared.model.named_parameters() if p.requires_grad] == [
        "fc.weight", "fc.bias"]
    assert [g["params"] for g in prepared.param_groups] == [["fc.weight"], ["fc.bias"]]
    optimizer = prepared.build_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["params"][0] is prepared.model.fc.weight


def test_prepare_accepts_a_plain_dict():
    cfg = {"model": {"arch": "resnet18"}, "freeze": {"rules": [{"freeze": "*"},
                                                               {"unfreeze": "layer4"}]}}
    prepared = prepare(cfg, verify=False)
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in prepared.model.named_parameters()
                         if n.startswith("layer4.")}


def test_prepare_rejects_an_unknown_key():
    with pytest.raises(FinetunePrepError, match="archh"):
        prepare({"model": {"archh": "resnet18"}})


def test_strict_false_lists_a_skipped_head(make_cfg, tmp_path):
    import torchvision

    path = tmp_path / "imagenet_like.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    prepared = prepare(make_cfg(f"checkpoint.path={path}", "checkpoint.strict=false"),
                       materialize=False, verify=False)
    skipped = prepared.document["checkpoint"]["skipped"]
    assert {s["key"]: (s["checkpoint"], s["model"]) for s in skipped} == {
        "fc.weight": ([1000, 512], [1, 512]), "fc.bias": ([1000], [1])}
    assert "skipped (shape mismatch): fc.weight checkpoint [1000, 512] vs model [1, 512]" in (
        prepared.summary)
    excluded = prepare(make_cfg(f"checkpoint.path={path}", "checkpoint.exclude_head=true"),
                       verify=False)
    assert excluded.document["checkpoint"]["excluded"] == ["fc.weight", "fc.bias"]
    assert excluded.model.fc.weight.shape == (1, 512) and not excluded.model.fc.weight.is_meta


def test_proof_reports_a_trainable_layer_that_gets_no_gradient():
    cfg = {"model": {"source": "target", "target": {"_target_": "conftest.TwoBranchNet"},
                     "input_size": [3, 16, 16]},
           "freeze": {"rules": [{"freeze": "stem"}]}, "verify": {"backward": True}}
    prepared = prepare(cfg)
    verified = prepared.document["verified"]
    assert verified["backward"] and not verified["ok"]
    assert verified["trainable_without_grad"] == ["unused.weight", "unused.bias"]
    assert verified["frozen_changed"] == [] and verified["frozen_with_grad"] == []
    assert "got no gradient (unused: breaks DDP): unused.weight, unused.bias" in prepared.summary
    # the proof ran on a copy: the returned model is untouched by its optimizer step
    assert prepared.model.unused.weight.grad is None and prepared.model.fc.weight.grad is None


SMALL = "model.input_size=[3,64,64]"  # the proof batch where its size does not matter (224: 12x)


def test_proof_passes_on_last_stage_and_keeps_frozen_batchnorm_in_eval(make_cfg):
    prepared = prepare(make_cfg("freeze=last_stage"), verify=True)
    verified = prepared.document["verified"]
    assert verified["ok"] and verified["input"] == [2, 3, 224, 224]
    assert verified["trainable_unchanged"] == []
    assert "layer3.1.bn2" in prepared.eval_modules


def test_memory_estimate_counts_params_grads_and_adamw_state(make_cfg):
    memory = prepare(make_cfg(), materialize=False, verify=False).document["memory"]
    assert memory["plan_bytes"] == (11_177_025 + 513 * 3) * 4
    assert memory["full_finetune_bytes"] == 11_177_025 * 4 * 4
    sgd = prepare(make_cfg("optim=sgd", "freeze=full"), materialize=False,
                  verify=False).document["memory"]
    assert sgd["plan_bytes"] == 11_177_025 * 3 * 4  # params + grads + one momentum buffer


def test_a_wrong_optimizer_argument_fails_at_plan_time(make_cfg):
    with pytest.raises(FinetunePrepError, match="rejects its arguments.*momentum"):
        prepare(make_cfg("+optim.optimizer.momentum=0.9"), materialize=False)


def test_bn_stats_train_warns_about_live_running_statistics(make_cfg):
    prepared = prepare(make_cfg("freeze.bn_stats=train"), materialize=False, verify=False)
    assert prepared.eval_modules == []
    assert "WARNING: freeze.bn_stats=train: 20 frozen norm layers" in prepared.summary


def test_config_object_round_trips_through_omegaconf(make_cfg):
    cfg = make_cfg("freeze=full")
    a = prepare(cfg, materialize=False, verify=False).document
    b = prepare(OmegaConf.to_container(cfg), materialize=False, verify=False).document
    assert a["groups"] == b["groups"]
    assert a["provenance"]["config_sha256"] == b["provenance"]["config_sha256"]


def test_prepare_without_materialize_returns_the_meta_model_even_after_the_proof(make_cfg):
    prepared = prepare(make_cfg("freeze=last_stage"), materialize=False, verify=True)
    assert prepared.document["verified"]["ok"] is True  # the proof ran, on its own copy
    assert all(p.is_meta for p in prepared.model.parameters())
    assert all(b.is_meta for b in prepared.model.buffers())


def test_the_proof_never_touches_the_model_it_returns(make_cfg, resnet18_ckpt):
    prepared = prepare(make_cfg(f"checkpoint.path={resnet18_ckpt}", "freeze=full", SMALL),
                       verify=True)
    assert prepared.document["verified"]["ok"] is True
    state = torch.load(resnet18_ckpt, weights_only=True)
    model_state = prepared.model.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in state.items())  # no optimizer step
    assert all(p.grad is None for p in prepared.model.parameters())  # no backward either


def test_non_finite_weights_fail_the_proof_by_name_and_nothing_is_written(make_cfg, tmp_path,
                                                                          resnet18_ckpt):
    from finetune_prep.app.pipeline import run

    state = torch.load(resnet18_ckpt, weights_only=True)
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["bn1.running_var"][0] = float("inf")
    bad = tmp_path / "nan.pth"
    torch.save(state, bad)
    prepared = prepare(make_cfg(f"checkpoint.path={bad}", SMALL), materialize=False, verify=True)
    verified = prepared.document["verified"]
    assert verified["ok"] is False
    assert verified["non_finite"] == ["bn1.running_var", "layer1.0.conv1.weight"]
    assert verified["frozen_changed"] == []  # a NaN that did not move is unchanged
    out = tmp_path / "run"
    expected = (r"the one-step proof failed: weights or buffers that hold NaN or Inf "
                r"\(check the checkpoint\): .*layer1\.0\.conv1\.weight")
    with pytest.raises(FinetunePrepError, match=expected):
        run(make_cfg(f"checkpoint.path={bad}", "verify.backward=true"), out)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("override", "message"), [
    ("verify.batch_size=0", "verify.batch_size=0: the proof needs a batch of at least 1"),
    ("verify.batch_size=-1", "verify.batch_size=-1"),
    ("model.input_size=[0]", r"model.input_size=\[0\]: give \[C, H, W\]"),
    ("model.input_size=[3,0,224]", r"model.input_size=\[3, 0, 224\]"),
    ("optim.lr=inf", "optim.lr=inf: must be a finite number > 0"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan"),
])
def test_sizes_and_numbers_no_run_can_use_are_clear_errors(make_cfg, override, message):
    with pytest.raises(FinetunePrepError, match=message):
        prepare(make_cfg(override), materialize=False, verify=False)


# --------------------------------------------------------------------------- the proof moves

def _real(arch_cfg: dict, rules: list, input_size: list[int]):
    """A real (random-init) model with `rules` applied, and its groups, through prepare()."""
    cfg = {"model": {**arch_cfg, "input_size": input_size}, "freeze": {"rules": rules},
           "optim": {"weight_decay": 0.0}}
    prepared = prepare(cfg, verify=False)
    return prepared.model, prepared.param_groups


@pytest.mark.parametrize(("arch_cfg", "rules", "size"), [
    ({"arch": "resnet18"}, [{"freeze": "*"}, {"unfreeze": "layer4"}, {"unfreeze": "@head"}],
     [3, 64, 64]),
    ({"source": "target", "target": {"_target_": "conftest.TwoBranchNet"}},
     [{"freeze": "unused"}], [3, 16, 16]),
])
def test_the_proof_fails_when_the_update_underflows_and_passes_at_a_normal_lr(arch_cfg, rules,
                                                                              size):
    from finetune_prep.app.proof import FAILURES, optimizer_factory, prove
    from finetune_prep.paramfile.format import Group
    from finetune_prep.train.apply import tensor_groups

    for lr, ok in ((1e-320, False), (1e-3, True)):
        model, groups = _real(arch_cfg, rules, size)
        groups = [{**g, "lr": lr} for g in groups]  # past validation, as a hand-edited plan
        result = prove(model, tensor_groups(model, [Group.of(g) for g in groups]),
                       optimizer_factory({"_target_": "torch.optim.AdamW"}), size, 2, 0)
        trainable = [n for g in groups for n in g["params"]]
        assert result["ok"] is ok
        assert result["trainable_unchanged"] == ([] if ok else
                                                 [n for n in model.state_dict() if n in trainable])
        assert "trainable_unchanged" in FAILURES


def test_a_plan_whose_lr_is_too_small_for_float32_weights_fails_and_writes_nothing(make_cfg,
                                                                                    tmp_path):
    from finetune_prep.app.pipeline import run

    prepared = prepare(make_cfg("optim.lr=1e-30", SMALL), materialize=False)  # valid, too small
    verified = prepared.document["verified"]
    assert verified["ok"] is False and verified["trainable_unchanged"] == ["fc.weight", "fc.bias"]
    assert "trainable parameters the step did not change: fc.weight, fc.bias" in prepared.summary
    out = tmp_path / "run"
    with pytest.raises(FinetunePrepError, match=r"got a gradient but did not move .*fc\.weight"):
        run(make_cfg("optim.lr=1e-30", SMALL), out)
    assert not out.exists() or not any(out.iterdir())


def test_a_parameter_with_an_exactly_zero_gradient_is_listed_not_failed():
    cfg = {"model": {"source": "target", "target": {"_target_": "conftest.DeadUnitNet"},
                     "input_size": [12]},
           "optim": {"optimizer": {"_target_": "torch.optim.SGD"}, "weight_decay": 0.0},
           "verify": {"backward": True}}
    verified = prepare(cfg, materialize=False).document["verified"]
    assert verified["ok"] is True
    assert verified["trainable_zero_grad"] == ["dead.weight", "dead.bias"]
    assert verified["trainable_unchanged"] == []


# --------------------------------------------------------------------------- the memory guard

def test_the_memory_guard_counts_everything_the_proof_holds(make_cfg, monkeypatch):
    """One fp32 copy of resnet18 fits a 'machine' of 1.5 copies; the proof (the model, the
    user's copy, the snapshot, gradients, AdamW state, activations) does not."""

    cfg = make_cfg("freeze=full", "model.input_size=[3,64,64]")
    needed = prepare(cfg, materialize=False).document["verified"]["memory_bytes"]
    weights = 11_689_512 - 513_000 + 513  # resnet18 with a 1-output head
    assert needed > weights * 4 * (1 + 1 + 1 + 2)  # proof copy, snapshot, grads, AdamW x2
    small = int(weights * 4 * 1.5)
    monkeypatch.setattr(memory, "physical_memory", lambda: small)
    monkeypatch.setattr(proof, "physical_memory", lambda: small)
    check_memory(weights, "resnet18")  # the old guard: one copy fits
    with pytest.raises(FinetunePrepError) as err:
        prepare(cfg)
    text = str(err.value)
    assert text.startswith("the one-step proof needs about ")
    assert f"more than this machine's {human_bytes(small)} of memory" in text
    assert "activations" in text and "optimizer state" in text and "snapshot" in text
    assert "verify.backward=false" in text and "verify.batch_size" in text
    assert prepare(cfg, verify=False, materialize=False).document["verified"]["backward"] is False


def test_activations_are_measured_on_meta_and_grow_with_the_batch(make_cfg):
    from finetune_prep.app import cache
    from finetune_prep.config import validate

    cfg = validate(make_cfg("freeze=full"))
    built = cache.build_meta_model(cfg.model, cfg.head)
    two = measure_activations(built, 2, [])
    four = measure_activations(built, 4, [])
    assert 2 * 3 * 224 * 224 * 4 * 10 < two  # far more than the input batch
    assert 1.9 * two < four <= 2 * two  # per-sample tensors double; per-channel ones do not
    assert all(p.is_meta for p in built.model.parameters())  # nothing real was made


def test_the_summary_says_why_no_proof_ran(make_cfg):
    asked = prepare(make_cfg(), materialize=False, verify=False)  # resnet18: below max_params
    assert asked.document["verified"] == {"backward": False,
                                          "reason": "verify=False passed to prepare()"}
    assert "Verified: no backward pass (verify=False passed to prepare())" in asked.summary
    off = prepare(make_cfg("verify.backward=false"), materialize=False)
    assert off.document["verified"]["reason"] == "verify.backward=false"
    big = prepare(make_cfg("verify.max_params=1000"), materialize=False)
    assert big.document["verified"]["reason"] == "model above verify.max_params=1,000"
