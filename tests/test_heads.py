"""Heads the user means (replace / keep / none, family builders, declared auxiliary heads only),
torchvision detection and segmentation by name, what the constructor froze (freeze.start), and
models that compute in their constructor: all with the real libraries, weights=None, on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone

import finetune_prep
from finetune_prep.app.proof import detection_targets
from finetune_prep.errors import FinetunePrepError
from finetune_prep.model.build import build_architecture
from finetune_prep.plan.rules import evaluate, parse_rules
from finetune_prep.train.apply import build_model

DETECTION = torchvision.models.list_models(module=torchvision.models.detection)
SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)


def build(model: dict, meta: bool = True, **head):
    model = {"source": "torchvision", **model}
    head = {"num_outputs": 5, **head}
    return build_architecture(OmegaConf.create(model), OmegaConf.create(head), meta=meta)


def target(name: str, **kwargs) -> dict:
    """A model.target config of a torchvision builder without any weights."""
    return {"source": "target", "arch": "custom",
            "target": {"_target_": name, "weights": None, "weights_backbone": None, **kwargs}}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# --- detection and segmentation by name: N classes, torchvision's own heads -------------------


@pytest.mark.parametrize("arch", DETECTION + SEGMENTATION)
def test_every_detection_and_segmentation_model_builds_by_name(arch):
    b = build({"arch": arch})
    assert b.table.head and all(p.is_meta for p in b.model.parameters())
    assert b.num_outputs == 5 and b.task in ("detection", "segmentation")
    assert not any(h in n for s in b.table.stages for n in s for h in b.table.head)


def test_faster_rcnn_predictor_has_n_classes_and_4n_box_outputs():
    b = build({"arch": "fasterrcnn_resnet50_fpn"})
    predictor = b.model.roi_heads.box_predictor
    assert b.table.head == ("roi_heads.box_predictor",)
    assert predictor.cls_score.out_features == 5 and predictor.bbox_pred.out_features == 20


def test_mask_rcnn_box_and_mask_predictors_have_n_classes():
    b = build({"arch": "maskrcnn_resnet50_fpn"})
    assert b.table.head == ("roi_heads.box_predictor", "roi_heads.mask_predictor")
    assert b.model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert b.model.roi_heads.box_predictor.bbox_pred.out_features == 20


def test_retinanet_classification_head_has_n_classes_per_anchor():
    head = build({"arch": "retinanet_resnet50_fpn"}).model.head.classification_head
    assert head.num_classes == 5 and head.cls_logits.out_channels == 9 * 5


def test_deeplab_with_aux_loss_replaces_both_classifiers():
    b = build({"arch": "deeplabv3_resnet50", "kwargs": {"aux_loss": True}})
    assert b.table.head == ("classifier.4", "aux_classifier.4")
    assert b.model.classifier[4].out_channels == 5 and b.model.aux_classifier[4].out_channels == 5
    assert b.table.head_params() == ["classifier.4.weight", "classifier.4.bias",
                                     "aux_classifier.4.weight", "aux_classifier.4.bias"]


def test_fcn_head_is_its_last_conv():
    b = build({"arch": "fcn_resnet50"})
    assert b.table.head == ("classifier.4",) and b.model.classifier[4].out_channels == 5


def test_resnet_fpn_stages_come_from_the_backbone_body():
    stages = [list(s) for s in build({"arch": "fasterrcnn_resnet50_fpn"}).table.stages]
    assert stages == [["backbone.body.conv1", "backbone.body.bn1"], *[
        [f"backbone.body.layer{i}"] for i in range(1, 5)], ["backbone.fpn"], ["rpn"],
        ["roi_heads.box_head"]]


def test_backbone_weights_are_never_downloaded_or_passed():
    with pytest.raises(FinetunePrepError, match="checkpoint.path"):
        build({"arch": "fasterrcnn_resnet50_fpn", "kwargs": {"weights_backbone": "DEFAULT"}})


# --- family builders: a head named (or declared) on a _target_ model ---------------------------


@pytest.mark.parametrize("name", [
    "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "ssd300_vgg16",
    "fcn_resnet50", "lraspp_mobilenet_v3_large",
])
def test_replaced_heads_equal_torchvisions_own_construction(name):
    """A _target_ model built with torchvision's default classes, its head replaced by the
    family builder, has the names, shapes and module types of torchvision's num_classes=5."""
    replaced = build(target(f"torchvision.models.{_module(name)}.{name}")).model
    with torch.device("meta"):
        own = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                           num_classes=5)
    assert shapes(replaced) == shapes(own)
    assert [type(m) for m in replaced.modules()] == [type(m) for m in own.modules()]


def _module(name: str) -> str:
    return "detection" if name in DETECTION else "segmentation"


def test_head_module_on_a_detection_model_uses_the_predictor_builder():
    b = build(target("torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn"),
              module="roi_heads.box_predictor", num_outputs=3)
    assert b.model.roi_heads.box_predictor.bbox_pred.out_features == 12


def test_a_module_without_a_builder_is_refused_with_the_options():
    with pytest.raises(FinetunePrepError, match="head.mode=keep") as err:
        build({"arch": "fasterrcnn_mobilenet_v3_large_320_fpn"}, module="rpn")
    assert "MaskRCNNPredictor" in str(err.value)


def test_squeezenet_1x1_conv_head_rebuilds_from_its_plan(tmp_path):
    prepared = finetune_prep.prepare(finetune_prep.compose(
        ["model.arch=squeezenet1_0", "head.num_outputs=4", "verify.backward=false"]),
        materialize=False)
    path = prepared.save(tmp_path)
    model = build_model(path / "param_groups.json" if path.is_dir() else path)
    assert isinstance(model.classifier[1], nn.Conv2d) and model.classifier[1].out_channels == 4


# --- keep and none --------------------------------------------------------------------------


def test_keep_leaves_the_models_own_head_of_any_size():
    b = build({"arch": "retinanet_resnet50_fpn"}, mode="keep", num_outputs=None)
    assert b.table.head == ("head.classification_head",) and b.num_outputs == 91
    b = build({"arch": "resnet18"}, mode="keep", num_outputs=7)
    assert b.table.head == ("fc",) and b.model.fc.out_features == 1000


def test_none_has_no_head_and_head_rules_are_refused(make_cfg):
    b = build({"arch": "resnet18"}, mode="none")
    assert b.table.head == () and b.model.fc.out_features == 1000
    with pytest.raises(FinetunePrepError, match="no head"):
        finetune_prep.prepare(make_cfg("head.mode=none", "freeze=head_only"), materialize=False)
    plan = finetune_prep.prepare(make_cfg("head.mode=none", "freeze=trainable_backbone_layers",
                                          "verify.backward=false"), materialize=False)
    assert plan.document["model"]["heads"] == [] and "Head: none" in plan.report


def test_replace_needs_a_size():
    with pytest.raises(FinetunePrepError, match="head.mode=keep"):
        build({"arch": "resnet18"}, num_outputs=None)


# --- never guess: transformers keep every internal Linear -------------------------------------


class Encoder(nn.Module):
    """A custom nn.TransformerEncoder model, optionally with a final classifier."""

    def __init__(self, classes: int = 0) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=16, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, classes) if classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.encoder(self.embed(x))
        return self.fc(y.mean(1)) if self.fc is not None else y


def _custom(classes: int, **head):
    cfg = {"source": "target", "arch": "custom",
           "target": {"_target_": "tests.test_heads.Encoder", "classes": classes}}
    return build(cfg, meta=False, **head)


def test_a_transformer_without_a_classifier_is_asked_about_not_rewired():
    with pytest.raises(FinetunePrepError, match="never guesses") as err:
        _custom(0)
    assert "head.mode=none" in str(err.value) and "head.module" in str(err.value)


def test_a_final_classifier_is_the_only_layer_replaced():
    before = Encoder(10)
    b = _custom(10, num_outputs=3)
    assert b.table.head == ("fc",) and b.model.fc.out_features == 3
    kept = {n: type(m).__name__ for n, m in b.model.named_modules() if n != "fc"}
    assert kept == {n: type(m).__name__ for n, m in before.named_modules() if n != "fc"}
    assert [tuple(p.shape) for n, p in b.model.named_parameters() if not n.startswith("fc")] == \
        [tuple(p.shape) for n, p in before.named_parameters() if not n.startswith("fc")]


def test_none_and_keep_on_a_transformer_touch_no_module():
    b = _custom(0, mode="none")
    modules = dict(b.model.named_modules())
    twin = Encoder(0)
    assert {n: type(m).__name__ for n, m in modules.items()} == {
        n: type(m).__name__ for n, m in twin.named_modules()}
    assert b.table.head == ()
    kept = _custom(0, mode="keep", module="encoder.layers.1.linear2")
    assert kept.table.head == ("encoder.layers.1.linear2",)
    assert kept.model.encoder.layers[1].linear2.out_features == 16


def test_head_module_inside_a_transformer_is_replaced_only_when_named():
    b = _custom(0, module="encoder.layers.1.linear2", num_outputs=16)
    ids_before = {n: id(m) for n, m in b.model.named_modules()}
    assert b.table.head == ("encoder.layers.1.linear2",)
    assert ids_before["encoder.layers.0.linear2"] != ids_before["encoder.layers.1.linear2"]


# --- torchvision's trainable_backbone_layers = @stages[:5-k] ----------------------------------


@pytest.fixture(scope="module")
def fasterrcnn_table():
    return build({"arch": "fasterrcnn_resnet50_fpn"}).table


@pytest.mark.parametrize("k", range(6))
def test_trainable_backbone_layers_parity(fasterrcnn_table, k):
    with torch.device("meta"):
        own = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=k,
                                  norm_layer=nn.BatchNorm2d)
    expected = {f"backbone.{n}" for n, p in own.named_parameters() if p.requires_grad}
    plan = evaluate(parse_rules([{"freeze": f"@stages[:{5 - k}]"}]), fasterrcnn_table)
    ours = {n for n, ok in plan.trainable.items() if ok and n.startswith("backbone.")}
    assert ours == expected


@pytest.fixture(scope="module")
def mobilenet_table():
    return build({"arch": "fasterrcnn_mobilenet_v3_large_fpn"}).table


@pytest.mark.parametrize("k", range(7))
def test_trainable_backbone_layers_parity_mobilenet(mobilenet_table, k):
    """mobilenet bodies are staged as torchvision's mobilenet_backbone counts (6 stages)."""
    body = sum(s[0].startswith("backbone.body") for s in mobilenet_table.stages)
    assert body == 6
    with torch.device("meta"):
        own = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                 trainable_layers=k, norm_layer=nn.BatchNorm2d)
    expected = {f"backbone.{n}" for n, p in own.named_parameters() if p.requires_grad}
    plan = evaluate(parse_rules([{"freeze": f"@stages[:{body - k}]"}]), mobilenet_table)
    assert {n for n, ok in plan.trainable.items() if ok and n.startswith("backbone.")} == expected


def test_trainable_backbone_layers_preset_is_torchvisions_default(make_cfg):
    cfg = make_cfg("model.arch=fasterrcnn_resnet50_fpn", "freeze=trainable_backbone_layers")
    assert list(cfg.freeze.rules) == [{"freeze": "@stages[:2]"}]


# --- what the constructor froze: freeze.start ------------------------------------------------


def _backbone_cfg(*extra: str):
    return finetune_prep.compose([
        "model.source=target", "+model.target._target_=" + resnet_fpn_backbone.__module__
        + ".resnet_fpn_backbone", "+model.target.backbone_name=resnet18",
        "+model.target.weights=null", "+model.target.trainable_layers=2", "head.mode=none",
        "freeze=full", "verify.backward=false", *extra])


def test_freeze_start_model_keeps_what_the_constructor_froze():
    with torch.device("meta"):
        own = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=2)
    expected = [n for n, p in own.named_parameters() if p.requires_grad]
    cfg = _backbone_cfg("freeze.start=model", "freeze.rules=[]")
    prepared = finetune_prep.prepare(cfg, materialize=False)
    trainable = [n for g in prepared.document["groups"] for n in g["params"]]
    assert sorted(trainable) == sorted(expected)
    assert any("constructor froze" in n and "freeze.start=model" in n for n in prepared.notes)


def test_freeze_start_all_reports_what_it_overrides():
    prepared = finetune_prep.prepare(_backbone_cfg(), materialize=False)
    assert prepared.document["counts"]["frozen"] == 0
    assert any("set freeze.start=model" in n for n in prepared.notes)


# --- a two-step training loop trains exactly the plan ----------------------------------------


def _two_steps(arch: str, *extra: str) -> None:
    torch.manual_seed(0)
    det = arch in DETECTION
    cfg = finetune_prep.compose([
        f"model.arch={arch}", "head.num_outputs=3", "verify.backward=false",
        "model.input_size=[3,64,64]", "freeze=last_stage",
        *(["+model.kwargs.min_size=64", "+model.kwargs.max_size=64"] if det else []), *extra])
    prepared = finetune_prep.prepare(cfg)
    model, plan = prepared.train_mode(), set(prepared.document["frozen"])
    optimizer = prepared.build_optimizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    moved: set[str] = set()
    for _ in range(2):
        batch = torch.rand(2, 3, 64, 64, generator=generator)
        optimizer.zero_grad()
        if det:
            loss = sum(model(list(batch), detection_targets(model, batch, generator)).values())
        else:
            loss = sum(o.pow(2).mean() for o in model(batch).values())
        loss.backward()
        moved |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for g in prepared.document["groups"] for n in g["params"]}
    assert changed and not changed & plan
    assert changed <= trainable and moved <= trainable
    head = set(prepared.table.head_params())
    assert head <= trainable and head & changed


def test_two_steps_fasterrcnn_mobilenet():
    _two_steps("fasterrcnn_mobilenet_v3_large_320_fpn")


def test_two_steps_lraspp():
    _two_steps("lraspp_mobilenet_v3_large")


@pytest.mark.slow
@pytest.mark.parametrize("arch, extra", [
    ("fasterrcnn_resnet50_fpn", ()), ("maskrcnn_resnet50_fpn", ()),
    ("retinanet_resnet50_fpn", ()), ("fcn_resnet50", ()),
    ("deeplabv3_resnet50", ("+model.kwargs.aux_loss=true",)),
])
def test_two_steps_resnet50_families(arch, extra):
    _two_steps(arch, *extra)


def test_proof_runs_detection_in_train_mode_with_targets():
    cfg = finetune_prep.compose([
        "model.arch=fasterrcnn_mobilenet_v3_large_320_fpn", "head.num_outputs=3",
        "verify.backward=true", "model.input_size=[3,64,64]", "+model.kwargs.min_size=64",
        "+model.kwargs.max_size=64", "freeze=head_only"])
    verified = finetune_prep.prepare(cfg, materialize=False).document["verified"]
    assert verified["backward"] and verified["ok"], verified


def test_deepcopy_of_meta_detection_model_is_cheap():
    b = build({"arch": "fasterrcnn_mobilenet_v3_large_320_fpn"})
    assert all(p.is_meta for p in copy.deepcopy(b.model).parameters())


# --- open_clip: computes in its constructor, towers staged as its lock() ---------------------


@pytest.fixture(scope="module")
def clip_model():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.create_model("ViT-B-32", pretrained=None)


CLIP_CFG = {"source": "target", "arch": "clip", "target": {
    "_target_": "open_clip.create_model", "model_name": "ViT-B-32", "pretrained": None}}


def _snapshot(model: nn.Module) -> dict[str, tuple[int, str]]:
    return {n: (id(m), type(m).__name__) for n, m in model.named_modules()}


@pytest.mark.slow
def test_open_clip_is_never_rewired(clip_model):
    before = _snapshot(clip_model)
    cfg = OmegaConf.create(CLIP_CFG)
    with pytest.raises(FinetunePrepError, match="never guesses"):
        build_architecture(cfg, OmegaConf.create({"num_outputs": 3}), meta=False,
                           make_target=lambda: clip_model)
    assert _snapshot(clip_model) == before
    b = build_architecture(cfg, OmegaConf.create({"mode": "none"}), meta=False,
                           make_target=lambda: clip_model)
    assert _snapshot(b.model) == before and b.table.head == ()


@pytest.mark.slow
def test_open_clip_plans_off_meta_with_lock_stages():
    b = build_architecture(OmegaConf.create(CLIP_CFG), OmegaConf.create({"mode": "none"}),
                           meta=True)
    assert all(p.is_meta for p in b.model.parameters())
    assert any("built on the CPU" in n and "bytes" in n and " s " in n for n in b.notes)
    stages = [list(s) for s in b.table.stages]
    assert stages[0] == ["visual.conv1", "visual.class_embedding",
                         "visual.positional_embedding", "visual.ln_pre"]
    assert stages[1:12] == [[f"visual.transformer.resblocks.{i}"] for i in range(11)]
    assert stages[12:14] == [["visual.transformer.resblocks.11", "visual.ln_post"],
                             ["visual.proj"]]
    assert stages[14] == ["token_embedding", "positional_embedding"]
    assert stages[-2:] == [["transformer.resblocks.11", "ln_final"], ["text_projection"]]


class Recorder(nn.Module):
    """Records the types its constructor got (peft and smp break on DictConfig)."""

    def __init__(self, options: dict, sizes: list) -> None:
        super().__init__()
        self.got = (type(options), type(sizes))
        self.fc = nn.Linear(sizes[0], 2)


def test_target_constructors_get_plain_containers():
    b = build({"source": "target", "arch": "custom", "target": {
        "_target_": "tests.test_heads.Recorder", "options": {"a": 1}, "sizes": [4]}})
    assert b.model.got == (dict, list)
