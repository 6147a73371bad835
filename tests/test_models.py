"""build_model: meta construction of every torchvision classifier, heads, sources, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import meta_model
from omegaconf import OmegaConf
from torch import nn

from finetune_prep.errors import FinetunePrepError
from finetune_prep.model.build import build_architecture
from finetune_prep.model.describe import BuiltModel, init_on_meta
from finetune_prep.model.heads import main_heads
from finetune_prep.plan.table import covers

ARCHS = torchvision.models.list_models(module=torchvision.models)


def build(model: dict, num_outputs: int = 3, meta: bool = True, **head) -> BuiltModel:
    model = {"source": "torchvision", **model}
    head_cfg = OmegaConf.create({"num_outputs": num_outputs, **head})
    return build_architecture(OmegaConf.create(model), head_cfg, meta=meta)


def built(arch: str) -> BuiltModel:
    """Each torchvision classifier on meta with a 3-output head, once per session."""
    return meta_model(arch, 3)


def count(model: nn.Module) -> int:
    return sum(p.numel() for _, p in model.named_parameters())


# --- meta construction ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_and_buffer_is_on_meta(arch):
    b = built(arch)
    assert all(p.is_meta for p in b.model.parameters())
    assert all(t.is_meta for t in b.model.buffers())
    assert b.table.names == tuple(n for n, _ in b.model.named_parameters())


def test_regnets_build_on_meta_too():
    # `with torch.device("meta")` cannot build these (their block widths use torch ops)
    regnets = [a for a in ARCHS if "regnet" in a]
    assert regnets, "torchvision's registry lists regnets"
    assert all(built(a).model.stem[0].weight.is_meta for a in regnets)


def test_init_on_meta_keeps_parameter_flags_and_restores_registration():
    with init_on_meta():
        layer = nn.Linear(2, 2)
        layer.register_parameter("frozen", nn.Parameter(torch.ones(2), requires_grad=False))
        layer.register_buffer("stat", torch.zeros(2))
    assert layer.weight.is_meta and layer.frozen.is_meta and layer.stat.is_meta
    assert isinstance(layer.frozen, nn.Parameter) and not layer.frozen.requires_grad
    with pytest.raises(RuntimeError), init_on_meta():
        raise RuntimeError("construction failed")
    assert not nn.Linear(2, 2).weight.is_meta  # registration restored, even after an error


def test_cpu_build_has_real_tensors():
    b = build({"arch": "resnet18"}, num_outputs=4, meta=False)
    assert all(p.device.type == "cpu" for p in b.model.parameters())
    assert b.model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)


# --- heads -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_outputs, total", [(1, 11_177_025), (10, 11_181_642)])
def test_resnet18_head_replacement_counts(num_outputs, total):
    b = build({"arch": "resnet18"}, num_outputs=num_outputs)
    assert count(b.model) == total
    assert sum(b.table.numel(n) for n in b.table.names) == total
    assert b.table.head == ("fc",) and b.model.fc.out_features == num_outputs


def test_resnet18_table_facts():
    t = build({"arch": "resnet18"}).table
    norm_params = sum(t.numel(n) for n in t.names if t.owner[n] in t.norm_modules)
    assert norm_params == 9_600  # BN affine parameters stay parameters
    assert "bn1" in t.stat_modules and "layer4.1.bn2" in t.norm_modules
    assert t.shapes["fc.weight"] == (3, 512)


def test_param_table_owns_stage_and_head_membership():
    t = build({"arch": "resnet18"}).table
    assert covers("layer1", "layer1.0.conv1.weight") and covers("fc.bias", "fc.bias")
    assert not covers("layer1", "layer10.weight") and not covers("layer1.0", "layer1")
    assert t.stages[0] == ("conv1", "bn1") and t.stage_label(0) == "conv1+bn1"
    assert t.stage_params(0) == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert t.stage_params(-1) == [n for n in t.names if n.startswith("layer4.")]
    assert t.head_params() == ["fc.weight", "fc.bias"]
    assert t.stage_lists() == [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    assert t.position["bn1.bias"] == 0 and t.position["layer3.1.bn2.weight"] == 3
    assert t.position["fc.weight"] == len(t.stages)
    assert t.numel("conv1.weight") == 64 * 3 * 7 * 7
    assert t.count() == 11_689_512 - 1000 * 513 + 3 * 513  # torchvision's total, 3-output head
    assert t.count(t.head_params()) == 3 * 513


def test_head_module_override():
    b = build({"arch": "vgg16"}, num_outputs=5, module="classifier.3")
    assert b.table.head == ("classifier.3",)
    assert b.model.classifier[3].out_features == 5
    assert b.model.classifier[6].out_features == 1000  # not the head: left alone
    assert any("classifier.6" in s for s in b.table.stages)


def test_head_module_must_have_a_family_builder():
    with pytest.raises(FinetunePrepError, match="cannot rebuild") as err:
        build({"arch": "resnet18"}, module="layer4")
    assert "head.mode=keep" in str(err.value) and "FastRCNNPredictor" in str(err.value)


def test_unknown_head_module_suggests_a_linear():
    with pytest.raises(FinetunePrepError, match="not a module") as err:
        build({"arch": "resnet18"}, module="fc1")
    assert "fc" in str(err.value)


def test_aux_heads_follow_kwargs():
    b = build({"arch": "inception_v3", "kwargs": {"aux_logits": False, "init_weights": False}})
    assert b.table.head == ("fc",)
    assert b.input_size == (3, 299, 299)
    assert build({"arch": "googlenet"}).table.head == ("fc", "aux1.fc2", "aux2.fc2")


def test_unknown_models_need_a_final_linear_or_1x1_conv():
    assert main_heads(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)), "target") == ["1"]
    with pytest.raises(FinetunePrepError, match="head.module"):
        main_heads(nn.Sequential(nn.Conv2d(3, 4, 3)), "target")


# --- config errors and sources ---------------------------------------------------------------


def test_unknown_arch_suggests_close_names():
    with pytest.raises(FinetunePrepError, match="resnet18"):
        build({"arch": "resnet181"})


@pytest.mark.parametrize("num_outputs", [0, -2])
def test_a_head_needs_outputs(num_outputs):
    with pytest.raises(FinetunePrepError, match="num_outputs"):
        build({"arch": "resnet18"}, num_outputs=num_outputs)


def test_unknown_source():
    with pytest.raises(FinetunePrepError, match="torchvision, timm, target"):
        build({"source": "hub", "arch": "resnet18"})


def test_target_source_builds_any_module():
    target = {"_target_": "torchvision.models.resnet18", "num_classes": 7}
    b = build({"source": "target", "arch": None, "target": target}, num_outputs=2)
    assert b.arch == "torchvision.models.resnet18"
    assert b.table.head == ("fc",) and b.model.fc.out_features == 2
    assert b.table.stages[0] == ("conv1", "bn1")
    assert all(p.is_meta for p in b.model.parameters())


@pytest.mark.parametrize(
    "target, words",
    [
        (None, "needs model.target"),
        ({"_target_": "torchvision.models.no_such_net"}, "could not build"),
        ({"_target_": "builtins.dict"}, "not a torch.nn.Module"),
    ],
)
def test_target_errors(target, words):
    with pytest.raises(FinetunePrepError, match=words):
        build({"source": "target", "arch": None, "target": target})


def test_timm_source():
    pytest.importorskip("timm")
    b = build({"source": "timm", "arch": "resnet18"}, num_outputs=3)
    assert b.table.head == ("fc",) and b.model.fc.out_features == 3
    assert b.input_size == (3, 224, 224)
    assert all(p.is_meta for p in b.model.parameters())
    with pytest.raises(FinetunePrepError, match="resnet18"):
        build({"source": "timm", "arch": "resnet181"})


def test_timm_distilled_model_has_both_heads():
    pytest.importorskip("timm")
    b = build({"source": "timm", "arch": "deit_tiny_distilled_patch16_224"}, num_outputs=3)
    assert b.table.head == ("head", "head_dist")
    assert b.model.head.out_features == 3 and b.model.head_dist.out_features == 3
    staged = {n for s in b.table.stages for e in s for n in b.table.names
              if n == e or n.startswith(e + ".")}
    assert not staged & {"head.weight", "head_dist.weight"}


def test_init_functions_skip_meta_tensors_only_and_are_put_back():
    before = torch.nn.init.normal_
    cpu = torch.zeros(64)
    with init_on_meta():
        meta = torch.empty(3, 3, device="meta")
        assert torch.nn.init.normal_(meta) is meta
        assert torch.nn.init.kaiming_uniform_(meta, a=1.0) is meta
        torch.nn.init.normal_(cpu)  # a CPU tensor in a constructor's arithmetic: filled
        layer = torch.nn.Linear(4, 2)
    assert cpu.abs().sum() > 0
    assert layer.weight.is_meta
    assert torch.nn.init.normal_ is before
