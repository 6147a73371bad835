"""adapter=lora/ia3/loha: peft builds the adapters from patterns of the tool's own language, and
the plan is peft's exactly (counts, trainable names, head), on a torchvision ViT, a timm ViT and a
tiny Hugging Face Llama; weights load into the base model first; adapter folders resume."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from conftest import TINY_VIT

import finetune_prep
from finetune_prep.app.pipeline import prepare
from finetune_prep.errors import FinetunePrepError
from finetune_prep.model import adapters

VIT = torchvision.models.VisionTransformer


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n.removeprefix(adapters.PREFIX) for n, p in model.named_parameters()
            if p.requires_grad}


def peft_reference(model: torch.nn.Module, doc: dict) -> torch.nn.Module:
    """peft's own model from the recorded config, built directly with peft on a fresh model."""
    import peft

    block = doc["adapter"]
    cls = getattr(peft, adapters.CONFIG_CLASSES[block["peft_type"]])
    keep = {k: v for k, v in block["config"].items()
            if k not in ("peft_type", "peft_version", "auto_mapping")}
    return peft.get_peft_model(model, cls(**keep))


def fresh_vit() -> torch.nn.Module:
    return VIT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
               mlp_dim=64, num_classes=10)


@pytest.mark.parametrize("method", ["lora", "ia3", "loha"])
def test_counts_equal_peft_on_a_torchvision_vit(tiny_vit_cfg, method):
    import peft

    prepared = prepare(tiny_vit_cfg(f"adapter={method}"))
    doc = prepared.document
    model = prepared.model
    assert isinstance(model, peft.PeftModel)
    trainable, total = model.get_nb_trainable_parameters()
    assert (doc["counts"]["trainable"], doc["counts"]["total"]) == (trainable, total)
    ref = peft_reference(fresh_vit(), doc)
    assert ref.get_nb_trainable_parameters() == (trainable, total)
    assert set(prepared.plan.trainable) == trainable_names(ref) == trainable_names(model)
    assert doc["verified"]["ok"] is True  # one real step: every adapter got a gradient
    assert doc["adapter"]["params"] and all(
        adapters.is_adapter_param(n, doc["adapter"]["peft_type"]) for n in doc["adapter"]["params"])
    json.dumps(doc["adapter"], allow_nan=False)  # plain JSON


def test_head_is_the_trainable_copy_never_peft_frozen_copies(tiny_vit_cfg):
    prepared = prepare(tiny_vit_cfg("adapter=lora", "freeze=head_only"), materialize=False)
    trainable = set(prepared.plan.trainable)
    assert trainable == {"heads.head.modules_to_save.default.weight",
                         "heads.head.modules_to_save.default.bias"}
    assert "heads.head.original_module.weight" in prepared.plan.frozen
    assert prepared.document["model"]["heads"] == ["heads.head"]  # the base model's head
    assert "Adapters: LORA (peft) r=8" in prepared.summary


def test_freeze_rules_groups_and_loraplus_apply_to_adapter_names(tiny_vit_cfg):
    prepared = prepare(tiny_vit_cfg("adapter=lora", "optim=loraplus",
                                    "freeze.rules=[{unfreeze: encoder.ln}]"), materialize=False)
    groups = {g["name"]: g for g in prepared.param_groups}
    lora_b = groups["lora_B"]
    assert lora_b["params"] and all(".lora_B." in n for n in lora_b["params"])
    others = [g for g in prepared.param_groups if g["name"] != "lora_B"]
    assert lora_b["lr"] == pytest.approx(16 * max(g["lr"] for g in others))
    assert {"encoder.ln.weight", "encoder.ln.bias"} <= set(prepared.plan.trainable)


def test_target_patterns_are_checked_with_suggestions(tiny_vit_cfg):
    with pytest.raises(FinetunePrepError, match=r"adapter.target_modules\[0\].*matches no "
                                                r"parameter.*self_attention"):
        typo = "adapter.target_modules=[encoder.layers.encoder_layer_0.self_atention]"
        prepare(tiny_vit_cfg("adapter=lora", typo), materialize=False)
    with pytest.raises(FinetunePrepError, match="out_proj of an nn.MultiheadAttention"):
        prepare(tiny_vit_cfg("adapter=lora", "adapter.target_modules=['*.out_proj']"),
                materialize=False)
    with pytest.raises(FinetunePrepError, match="covers no layer adapter=lora can adapt"):
        prepare(tiny_vit_cfg("adapter=lora", "adapter.target_modules=['*.ln_1']"),
                materialize=False)
    with pytest.raises(FinetunePrepError, match="adapter.bias=all is not a setting of "
                                                "adapter=ia3"):
        prepare(tiny_vit_cfg("adapter=ia3", "adapter.bias=all"), materialize=False)


def test_default_targets_on_a_model_without_attention_say_what_to_set(make_cfg):
    with pytest.raises(FinetunePrepError, match=r"matches no parameter.*Set "
                                                r"adapter\.target_modules to layers of this model"):
        prepare(make_cfg("adapter=lora", "verify.backward=false"), materialize=False)  # resnet18
    prepared = prepare(make_cfg("adapter=lora", "adapter.target_modules=[layer4]",
                                "verify.backward=false"), materialize=False)
    targets = prepared.document["adapter"]["config"]["target_modules"]
    assert targets and all(t.startswith("layer4.") for t in targets)


def test_stage_alias_targets_the_last_block(tiny_vit_cfg):
    prepared = prepare(tiny_vit_cfg("adapter=lora", "adapter.target_modules=['@stage[-1]']"),
                       materialize=False)
    targets = prepared.document["adapter"]["config"]["target_modules"]
    assert targets and all(t.startswith("encoder.layers.encoder_layer_1") for t in targets)


def test_counts_equal_peft_on_timm_vit_tiny(make_cfg):
    import timm

    cfg = make_cfg("model.source=timm", "model.arch=vit_tiny_patch16_224", "head.num_outputs=7",
                   "adapter=lora", "verify.backward=false")
    prepared = prepare(cfg, materialize=False)
    doc = prepared.document
    assert (doc["counts"]["trainable"], doc["counts"]["total"]) == \
        prepared.model.get_nb_trainable_parameters()
    ref = peft_reference(timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                           num_classes=7), doc)
    assert ref.get_nb_trainable_parameters() == (doc["counts"]["trainable"],
                                                  doc["counts"]["total"])
    assert set(prepared.plan.trainable) == trainable_names(ref)
    adapted = adapters.adapted_layers(doc["adapter"]["params"], "LORA")
    assert len(adapted) == 24  # qkv + proj of 12 blocks (peft records them as suffixes)
    assert "LORA (peft) r=8 on 24 layers" in prepared.summary


def test_counts_equal_peft_on_tiny_hf_llama(make_cfg, hf_folder):
    import transformers as tf

    folder = hf_folder("llama")
    cfg = make_cfg("model=hf_folder", f"model.arch={folder}",
                   "model.hf_class=AutoModelForSequenceClassification", "head.num_outputs=5",
                   "adapter=lora", "+adapter.options.task_type=SEQ_CLS")
    prepared = prepare(cfg)
    doc = prepared.document
    assert doc["verified"]["ok"] is True
    counts = (doc["counts"]["trainable"], doc["counts"]["total"])
    assert counts == prepared.model.get_nb_trainable_parameters()
    base = tf.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=5,
                                                                 ignore_mismatched_sizes=True)
    ref = peft_reference(base, doc)
    assert ref.get_nb_trainable_parameters() == counts
    assert set(prepared.plan.trainable) == trainable_names(ref)
    assert {t.rpartition(".")[2] for t in doc["adapter"]["config"]["target_modules"]} == \
        {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_checkpoint_loads_into_the_base_model_before_the_adapters(tiny_vit_cfg, tmp_path):
    torch.manual_seed(3)
    base = fresh_vit()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    prepared = prepare(tiny_vit_cfg("adapter=lora", f"checkpoint.path={tmp_path / 'base.pt'}"))
    params = dict(prepared.model.named_parameters())
    inner = "base_model.model."
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert torch.equal(params[f"{inner}{attn}.base_layer.in_proj_weight"],
                       base.encoder.layers[0].self_attention.in_proj_weight)
    for copy in ("original_module", "modules_to_save.default"):  # the head's copies both
        assert torch.equal(params[f"{inner}heads.head.{copy}.weight"], base.heads.head.weight)
    assert prepared.document["checkpoint"]["loaded"] == len(base.state_dict())


def resume_folder(tmp_path, r: int = 8):
    """A LoRA folder written by PeftModel.save_pretrained, its adapters moved off their init."""
    import peft

    model = fresh_vit()
    prepared = prepare(finetune_prep.compose([*TINY_VIT, "adapter=lora", f"adapter.r={r}"]),
                       materialize=False)
    config = peft_reference(model, prepared.document).peft_config["default"]
    peft_model = peft.get_peft_model(fresh_vit(), config)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model


def test_adapter_folder_resumes(tiny_vit_cfg, tmp_path):
    folder, saved = resume_folder(tmp_path)
    prepared = prepare(tiny_vit_cfg("adapter=lora", f"adapter.resume={folder}"))
    assert prepared.document["adapter"]["resume"]["path"] == str(folder)
    ours = dict(prepared.model.named_parameters())
    for name, p in saved.named_parameters():
        if p.requires_grad:
            assert torch.equal(ours[name], p), name
    assert prepared.document["verified"]["ok"] is True


def test_adapter_folder_of_other_adapters_is_refused(tiny_vit_cfg, tmp_path):
    folder, _ = resume_folder(tmp_path, r=4)
    with pytest.raises(FinetunePrepError, match="holds other adapters than configured: its r"):
        prepare(tiny_vit_cfg("adapter=lora", f"adapter.resume={folder}"), materialize=False)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FinetunePrepError, match="has no adapter_model.safetensors"):
        prepare(tiny_vit_cfg("adapter=lora", f"adapter.resume={folder}"), materialize=False)


def test_base_name_strips_peft_segments():
    assert adapters.base_name("a.q.lora_A.default.weight", "LORA") == "a.q.weight"
    assert adapters.base_name("a.q.base_layer.weight", "LORA") == "a.q.weight"
    assert adapters.base_name("h.modules_to_save.default.bias", "LORA") == "h.bias"
    assert adapters.base_name("h.original_module.bias", "IA3") == "h.bias"
    assert adapters.base_name("k.ia3_l.default", "IA3") == "k"
    assert not adapters.is_adapter_param("h.modules_to_save.default.bias", "LORA")


@pytest.fixture
def lora_plan(tiny_vit_cfg, tmp_path):
    """A LoRA+ plan of the tiny ViT whose phase 1 (epoch 1) also trains the final norm."""
    cfg = tiny_vit_cfg("adapter=lora", "optim=loraplus",
                       "freeze.schedule=[{at: {epoch: 1}, rules: [{unfreeze: encoder.ln}]}]")
    return prepare(cfg, materialize=False).save(tmp_path / "plan")


def test_training_apis_apply_the_plan_to_the_peft_model(lora_plan):
    import peft

    plan = finetune_prep.load_plan(lora_plan)
    model = finetune_prep.build_model(lora_plan, target=VIT)
    assert isinstance(model, peft.PeftModel)
    assert model.get_nb_trainable_parameters() == (plan.counts["trainable"], plan.counts["total"])
    optimizer = finetune_prep.build_optimizer(model, lora_plan)
    finetune_prep.check(model, optimizer, lora_plan)
    finetune_prep.train_mode(model, plan)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()
    moved = {n.removeprefix(adapters.PREFIX) for n, p in model.named_parameters()
             if not torch.equal(before[n], p)}
    assert moved and moved <= set(plan.trainable)
    assert any(".lora_B." in n for n in moved) and "heads.head.original_module.weight" not in moved
    schedule = finetune_prep.Schedule(model, optimizer, plan)
    assert schedule.step(epoch=1) == 1
    inner = model.base_model.model
    assert inner.encoder.ln.weight.requires_grad
    assert not inner.heads.head.original_module.weight.requires_grad
    finetune_prep.check(model, optimizer, plan, phase=1)


def test_plan_applies_to_the_model_inside_the_peft_model(lora_plan):
    model = finetune_prep.build_model(lora_plan, target=VIT)
    groups = finetune_prep.load_param_groups(model.base_model.model, lora_plan)
    assert sum(p.numel() for g in groups for p in g["params"]) == \
        finetune_prep.load_plan(lora_plan).counts["trainable"]


def test_a_plan_without_adapters_names_what_differs_on_a_peft_model(tiny_vit_cfg, tmp_path):
    path = prepare(tiny_vit_cfg(), materialize=False).save(tmp_path / "bare")
    model = peft_reference(fresh_vit(), prepare(tiny_vit_cfg("adapter=lora"),
                                                materialize=False).document)
    with pytest.raises(FinetunePrepError, match="made for another model.*lora_A"):
        finetune_prep.load_param_groups(model, path)


def test_lightning_callback_maps_peft_names(lora_plan):
    lightning = pytest.importorskip("lightning.pytorch")
    from finetune_prep.train.lightning import FinetunePrepCallback

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = finetune_prep.build_model(lora_plan, target=VIT)

        def training_step(self, batch, _):
            return self.net(batch[0]).logsumexp(1).mean()

        def configure_optimizers(self):
            return None  # the callback builds the plan's optimizer

    module = Module()
    callback = FinetunePrepCallback(lora_plan, module="net")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32)),
                                       batch_size=2)
    trainer = lightning.Trainer(max_epochs=1, callbacks=[callback], logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu")
    before = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    trainer.fit(module, data)
    for name, p in module.net.named_parameters():
        if adapters.frozen_copy(name, "LORA"):
            assert not p.requires_grad, name
            # peft's LoRA on nn.MultiheadAttention merges and unmerges the adapter into the
            # frozen in_proj_weight on every forward: float rounding, never a gradient step
            torch.testing.assert_close(before[name], p.detach(), rtol=0, atol=1e-6)
    assert any(not torch.equal(before[n], p.detach()) for n, p in module.net.named_parameters()
               if ".lora_B." in n)


@pytest.mark.slow
def test_counts_equal_peft_on_the_real_vit_b_16(make_cfg):
    prepared = prepare(make_cfg("model=vit_b_16", "head.num_outputs=10", "adapter=lora",
                                "verify.backward=false"), materialize=False)
    doc = prepared.document
    ref = peft_reference(torchvision.models.vit_b_16(weights=None, num_classes=10), doc)
    assert ref.get_nb_trainable_parameters() == (doc["counts"]["trainable"],
                                                  doc["counts"]["total"])
    assert set(prepared.plan.trainable) == trainable_names(ref)
    assert len(adapters.adapted_layers(doc["adapter"]["params"], "LORA")) == 12


def test_adapter_config_that_is_a_fifo_or_huge_is_refused_not_read(tmp_path):
    import os
    import signal

    from finetune_prep.model.adapters import folder_config

    os.mkfifo(tmp_path / "adapter_config.json")
    signal.alarm(20)  # a blocking open would hang here: SIGALRM ends the test instead
    try:
        with pytest.raises(FinetunePrepError, match=r"adapter\.resume=.* named pipe \(FIFO\)"):
            folder_config(tmp_path)
    finally:
        signal.alarm(0)
    os.remove(tmp_path / "adapter_config.json")
    with open(tmp_path / "adapter_config.json", "wb") as f:
        f.truncate((1 << 20) + 1)  # sparse: a huge file costs no disk
    with pytest.raises(FinetunePrepError, match="more than the 1048576"):
        folder_config(tmp_path)


RELEASE = """
import os, sys, time
fifo, seconds, fired = sys.argv[1], float(sys.argv[2]), 0
time.sleep(seconds)
for _ in range(20):  # a reader blocked in open() returns once a writer opens the FIFO
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        fired = 1
    except OSError:  # no reader waiting (ENXIO), or no FIFO
        pass
    time.sleep(0.25)
sys.exit(fired)
"""


def guarded(fn, fifo, seconds: float = 30):
    """`fn()`'s FinetunePrepError, failing the test if it blocked on the FIFO. A blocked open
    sits in C (safetensors' open even holds the GIL), out of reach of signals and threads: a
    separate process opens the FIFO for writing after `seconds`, which releases the reader, so
    a regression fails here instead of hanging the suite."""
    import subprocess
    import sys
    import time

    watchdog = subprocess.Popen([sys.executable, "-c", RELEASE, str(fifo), str(seconds)])
    start = time.monotonic()
    try:
        with pytest.raises(FinetunePrepError) as err:
            fn()
        took = time.monotonic() - start  # the watchdog acts after `seconds` only
    finally:
        watchdog.kill()
        watchdog.wait()
    assert took < seconds, f"blocked on the FIFO {fifo} for {seconds} s (a writer released it)"
    return err.value


def test_adapter_weights_that_are_a_fifo_are_refused_not_waited_on(tiny_vit_cfg, tmp_path):
    import os

    from finetune_prep.app.pipeline import run

    folder, _ = resume_folder(tmp_path)
    weights = folder / adapters.WEIGHTS
    weights.unlink()
    os.mkfifo(weights)  # planted: no writer ever comes, a plain open blocks forever
    out = tmp_path / "out"
    err = guarded(lambda: run(tiny_vit_cfg("adapter=lora", f"adapter.resume={folder}"), out),
                  weights)
    assert str(err).startswith(f"adapter.resume={folder}: adapter_model.safetensors is not a "
                               "regular file but a named pipe (FIFO)"), err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    # read directly (no check_folder first): the pinned open refuses it too
    for step in (adapters.folder_shapes, lambda f: adapters.load_weights(f, None)):
        err = guarded(lambda step=step: step(folder), weights)
        assert str(err).startswith(f"adapter.resume={folder}: adapter_model.safetensors is not a "
                                   "regular file but a named pipe (FIFO)"), err


@pytest.mark.parametrize("after", [1, 2], ids=["plan", "load"])
def test_adapter_weights_swapped_for_a_fifo_after_the_check_are_refused(tiny_vit_cfg, tmp_path,
                                                                         monkeypatch, after):
    """The file is a regular one when check_folder looks, a FIFO when it is read: once while the
    plan checks the folder's shapes, once when the weights load into the real model."""
    import os

    from finetune_prep.app.pipeline import run

    folder, _ = resume_folder(tmp_path)
    weights = folder / adapters.WEIGHTS
    original, calls = adapters.check_folder, []

    def check_then_swap(path):
        result = original(path)
        calls.append(path)
        if len(calls) == after:
            weights.unlink()
            os.mkfifo(weights)
        return result

    monkeypatch.setattr(adapters, "check_folder", check_then_swap)
    out = tmp_path / "out"
    err = guarded(lambda: run(tiny_vit_cfg("adapter=lora", f"adapter.resume={folder}"), out),
                  weights)
    assert len(calls) == after  # swapped, and refused at the very next read
    assert f"adapter.resume={folder}: adapter_model.safetensors is not a regular file but a " \
        "named pipe (FIFO) (it changed since it was checked" in str(err), err
    assert not out.exists() or not any(out.iterdir())
