"""Stages on every torchvision classifier (built once, on meta), timm models, overrides."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import meta_model
from omegaconf import OmegaConf
from torch import nn

from finetune_prep.errors import FinetunePrepError
from finetune_prep.models import BuiltModel, build_model
from finetune_prep.stages import derive_stages, override_stages

ARCHS = torchvision.models.list_models(module=torchvision.models)
NUM_OUTPUTS = 3


def built(arch: str, source: str = "torchvision") -> BuiltModel:
    """A model on the meta device with a 3-output head, built once per session (do not mutate)."""
    return meta_model(arch, NUM_OUTPUTS, source)


def covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_invariants(b: BuiltModel) -> None:
    """Every parameter in exactly one stage or the head; stages non-empty, in model order."""
    table = b.table
    stages = table.stages
    assert len(stages) >= 2, stages
    modules = dict(b.model.named_modules())
    head_params = [n for n in table.names if any(covers(h, n) for h in table.head)]
    assert head_params, "the head holds parameters"
    in_order = []
    for stage in stages:
        assert stage, "empty stage"
        for entry in stage:
            assert entry in modules or entry in table.shapes, f"{entry} is not a name"
            assert any(covers(entry, n) for n in table.names), f"{entry} covers nothing"
        in_order += [n for n in table.names if any(covers(e, n) for e in stage)]
    # model order, contiguity and exactly-once coverage in one comparison
    assert in_order == [n for n in table.names if n not in head_params]
    assert all(p.is_meta for p in b.model.parameters())  # never materialized


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_invariants(arch):
    check_invariants(built(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_head_is_replaced(arch):
    b = built(arch)
    modules = dict(b.model.named_modules())
    expected = {"inception_v3": 2, "googlenet": 3}.get(arch, 1)
    assert len(b.table.head) == expected
    for name in b.table.head:
        head = modules[name]
        outputs = head.out_features if isinstance(head, nn.Linear) else head.out_channels
        assert outputs == NUM_OUTPUTS, name


# --- the expected stage lists --------------------------------------------------------------------

RESNETS = [a for a in ARCHS if a.startswith(("resnet", "resnext", "wide_resnet"))]


def stages_of(arch: str) -> list[list[str]]:
    return [list(s) for s in built(arch).table.stages]


def numbered(prefix: str, count: int) -> list[list[str]]:
    return [[f"{prefix}.{i}"] for i in range(count)]


@pytest.mark.parametrize("arch", RESNETS)
def test_resnets(arch):
    assert stages_of(arch) == [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("vit_")])
def test_vits_one_stage_per_encoder_block_final_norm_in_the_last(arch):
    stages = stages_of(arch)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(len(stages) - 1)]
    assert stages[0] == ["class_token", "conv_proj", "encoder.pos_embedding"]
    assert stages[1:-1] == [[name] for name in layers[:-1]]
    assert stages[-1] == [layers[-1], "encoder.ln"]
    assert len(stages) - 1 == {"b": 12, "l": 24, "h": 32}[arch[4]]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("swin")])
def test_swins(arch):
    assert stages_of(arch) == [*numbered("features", 7), ["features.7", "norm"]]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("convnext")])
def test_convnexts(arch):
    assert stages_of(arch) == [*numbered("features", 7), ["features.7", "classifier.0"]]


@pytest.mark.parametrize(
    "arch", [a for a in ARCHS if a.startswith(("efficientnet", "mobilenet_v2"))]
)
def test_feature_blocks(arch):
    count = len(built(arch).model.features)
    assert stages_of(arch) == numbered("features", count)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("mobilenet_v3")])
def test_mobilenet_v3_pre_logits_joins_the_last_block(arch):
    count = len(built(arch).model.features)
    last = f"features.{count - 1}"
    assert stages_of(arch) == [*numbered("features", count - 1), [last, "classifier.0"]]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("mnasnet")])
def test_mnasnets_leaf_stem_and_final_conv_bn(arch):
    stem = [f"layers.{i}" for i in (0, 1, 3, 4, 6, 7)]  # conv+bn pairs; ReLUs hold nothing
    assert stages_of(arch) == [
        stem, *[[f"layers.{i}"] for i in range(8, 13)], ["layers.13", "layers.14", "layers.15"]
    ]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("densenet")])
def test_densenets(arch):
    blocks = [
        [f"features.{kind}{i}"] for i in (1, 2, 3) for kind in ("denseblock", "transition")
    ]
    assert stages_of(arch) == [
        ["features.conv0", "features.norm0"],
        *blocks,
        ["features.denseblock4", "features.norm5"],
    ]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("vgg")])
def test_vggs_split_at_max_pools_then_the_classifier(arch):
    model = built(arch).model
    convs, segments = [], []
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.MaxPool2d):
            segments.append(convs)
            convs = []
        elif any(True for _ in layer.parameters()):
            convs.append(f"features.{i}")
    assert len(segments) == 5
    assert stages_of(arch) == [*segments, ["classifier.0", "classifier.3"]]
    assert stages_of("vgg16")[:2] == [["features.0", "features.2"], ["features.5", "features.7"]]


def test_alexnet():
    assert stages_of("alexnet") == [
        ["features.0"], ["features.3"], ["features.6", "features.8", "features.10"],
        ["classifier.1", "classifier.4"],
    ]


def test_squeezenets_split_at_pools_and_head_is_the_1x1_conv():
    assert stages_of("squeezenet1_0") == [
        ["features.0"], ["features.3", "features.4", "features.5"],
        ["features.7", "features.8", "features.9", "features.10"], ["features.12"],
    ]
    assert stages_of("squeezenet1_1") == [
        ["features.0"], ["features.3", "features.4"], ["features.6", "features.7"],
        ["features.9", "features.10", "features.11", "features.12"],
    ]
    for arch in ("squeezenet1_0", "squeezenet1_1"):
        assert built(arch).table.head == ("classifier.1",)


def test_inception_v3_stem_grouped_aux_classifier_joins_the_block_before_it():
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    mixed = [f"Mixed_{b}" for b in ("5b", "5c", "5d", "6a", "6b", "6c", "6d")]
    assert stages_of("inception_v3") == [
        stem, *[[m] for m in mixed], ["Mixed_6e", "AuxLogits.conv0", "AuxLogits.conv1"],
        ["Mixed_7a"], ["Mixed_7b"], ["Mixed_7c"],
    ]
    assert built("inception_v3").table.head == ("fc", "AuxLogits.fc")


def test_googlenet_aux_classifiers_join_the_last_block():
    blocks = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a"]
    assert stages_of("googlenet") == [
        ["conv1", "conv2", "conv3"], *[[f"inception{b}"] for b in blocks],
        ["inception5b", "aux1.conv", "aux1.fc1", "aux2.conv", "aux2.fc1"],
    ]
    assert built("googlenet").table.head == ("fc", "aux1.fc2", "aux2.fc2")


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("regnet")])
def test_regnets(arch):
    trunk = [[f"trunk_output.block{i}"] for i in range(1, 5)]
    assert stages_of(arch) == [["stem"], *trunk]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("shufflenet")])
def test_shufflenets(arch):
    assert stages_of(arch) == [["conv1"], ["stage2"], ["stage3"], ["stage4"], ["conv5"]]


def test_maxvit_classifier_parts_join_the_last_block():
    assert stages_of("maxvit_t") == [
        ["stem"], ["blocks.0"], ["blocks.1"], ["blocks.2"],
        ["blocks.3", "classifier.2", "classifier.3"],
    ]


def test_every_family_is_covered_by_an_expectation():
    families = (
        "resnet", "resnext", "wide_resnet", "vit_", "swin", "convnext", "efficientnet",
        "mobilenet", "mnasnet", "densenet", "vgg", "alexnet", "squeezenet", "inception_v3",
        "googlenet", "regnet", "shufflenet", "maxvit",
    )
    assert [a for a in ARCHS if not a.startswith(families)] == []


# --- the general rule on small hand-made models ---------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3), nn.BatchNorm2d(width))


class Net(nn.Module):
    """A stem, a trunk container of blocks (most of the parameters), a final norm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(4))
        self.stem = nn.Conv2d(3, 4, 3)
        self.trunk = nn.Sequential(Block(4), Block(4), Block(4))
        self.norm = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)


def test_a_dominant_trunk_is_opened_and_the_final_norm_joins_the_last_block():
    with torch.device("meta"):
        net = Net()
    assert derive_stages(net, ["fc"]) == [
        ["token", "stem"], ["trunk.0"], ["trunk.1"], ["trunk.2", "norm"]
    ]


def test_a_plain_sequential_is_split_at_pooling_layers():
    with torch.device("meta"):
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2),
        )
    assert derive_stages(net, ["8"]) == [["0"], ["3", "4"], ["7"]]


def test_tied_weights_are_counted_once():
    with torch.device("meta"):
        net = Net()
    net.norm2 = nn.BatchNorm2d(4)
    net.norm2.weight = net.norm.weight  # tied: named_parameters lists them under norm only
    net.norm2.bias = net.norm.bias
    assert derive_stages(net, ["fc"])[-1] == ["trunk.2", "norm"]  # norm2 would cover nothing


# --- timm ---------------------------------------------------------------------------------------

TIMM_EXPECTED = {
    "resnet18": [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    "convnext_tiny": [
        ["stem"], ["stages.0"], ["stages.1"], ["stages.2"], ["stages.3", "head.norm"]
    ],
    "vit_tiny_patch16_224": [
        ["cls_token", "pos_embed", "patch_embed"], *[[f"blocks.{i}"] for i in range(11)],
        ["blocks.11", "norm"],
    ],
    "efficientnet_b0": [
        ["conv_stem", "bn1"], *[[f"blocks.{i}"] for i in range(6)],
        ["blocks.6", "conv_head", "bn2"],
    ],
}


@pytest.mark.parametrize("arch", list(TIMM_EXPECTED))
def test_timm_models_use_timms_group_matcher(arch):
    pytest.importorskip("timm")
    b = built(arch, source="timm")
    check_invariants(b)
    assert hasattr(b.model, "group_matcher")
    assert [list(s) for s in b.table.stages] == TIMM_EXPECTED[arch]


# --- model.stages overrides -----------------------------------------------------------------


def resnet_override(spec) -> tuple[tuple[str, ...], ...]:
    b = built("resnet18")
    return override_stages(b.model, spec, b.table.head)


def test_override_names_lists_and_globs():
    spec = [["conv1", "bn1"], "layer[12]", ["layer3"], "layer4.*.conv?"]
    assert resnet_override(spec) == (
        ("conv1", "bn1"), ("layer1", "layer2"), ("layer3",),
        ("layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"),
    )


def test_override_accepts_parameter_names_and_leaves_the_rest_unstaged():
    assert resnet_override(["bn1.weight", "layer4"]) == (("bn1.weight",), ("layer4",))


def test_override_through_the_model_config():
    cfg = OmegaConf.create(
        {"source": "torchvision", "arch": "resnet18",
         "stages": [["conv1", "bn1"], "layer1", "layer2", "layer3", "layer4"]}
    )
    b = build_model(cfg, OmegaConf.create({"num_outputs": 2}), meta=True)
    assert b.table.stages == (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


@pytest.mark.parametrize(
    "spec, words",
    [
        (["layer5"], ["model.stages[0]", "'layer5'", "Did you mean", "layer4"]),
        (["conv1", ["bn1", "layer9*"]], ["model.stages[1]", "layer9*"]),
        (["layer1", "layer1.0"], ["model.stages[1]", "overlaps model.stages[0]"]),
        (["layer4", "fc"], ["model.stages[1]", "head"]),
        (["relu"], ["model.stages[0]", "no parameter"]),
        ([[]], ["model.stages[0]", "a stage is"]),
        ([3], ["model.stages[0]", "a stage is"]),
    ],
)
def test_override_errors_say_what_is_wrong(spec, words):
    with pytest.raises(FinetunePrepError) as err:
        resnet_override(spec)
    for word in words:
        assert word in str(err.value)
