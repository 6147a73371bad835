"""Stages on every torchvision classifier (built once, on meta), timm models, overrides."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import meta_model
from omegaconf import OmegaConf
from torch import nn

from finetune_prep.errors import FinetunePrepError
from finetune_prep.model.build import build_architecture
from finetune_prep.model.describe import BuiltModel
from finetune_prep.model.stages import derive_layers, derive_stages, override_stages

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


# --- layer ids (layer decay's units) -------------------------------------------------------------


def layers_of(arch: str) -> list[list[str]]:
    """The parameter names of each layer id, in id order."""
    layers = built(arch).table.layers
    return [[n for n, i in layers.items() if i == k] for k in range(max(layers.values()) + 1)]


def tops(names: list[str], depth: int) -> list[str]:
    """The distinct module prefixes of `depth` parts, in order."""
    return list(dict.fromkeys(".".join(n.split(".")[:depth]) for n in names))


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_invariants(arch):
    """Ids 0..n-1 all used; the stem is 0; the head is last; stages never go back in depth."""
    t = built(arch).table
    ids = t.layers
    assert set(ids) == set(t.names) and set(ids.values()) == set(range(max(ids.values()) + 1))
    assert {ids[n] for n in t.stage_params(0)} == {0}
    top = max(ids.values())
    assert {ids[n] for n in t.head_params()} == {top}
    floor = 0
    for i in range(len(t.stages)):
        below_head = [ids[n] for n in t.stage_params(i) if ids[n] != top]
        assert below_head == sorted(below_head) and min(below_head, default=floor) >= floor
        floor = max(below_head, default=floor)
    assert len(set(ids.values())) >= len(t.stages) - 1  # blocks refine stages, never merge 2+


def test_layers_are_what_build_model_stored():
    b = built("convnext_tiny")
    assert derive_layers(b.model, b.table.head, b.table.stages) == b.table.layers


@pytest.mark.parametrize(("arch", "blocks"), [("resnet18", [2, 2, 2, 2]),
                                              ("resnet50", [3, 4, 6, 3])])
def test_resnet_layers_are_blocks(arch, blocks):
    layers = layers_of(arch)
    expected = [f"layer{s + 1}.{b}" for s, count in enumerate(blocks) for b in range(count)]
    assert layers[0] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert [tops(names, 2) for names in layers[1:-1]] == [[e] for e in expected]
    assert layers[-1] == ["fc.weight", "fc.bias"]


def test_vit_layers_are_encoder_layers():
    layers = layers_of("vit_b_16")
    assert layers[0] == ["class_token", "conv_proj.weight", "conv_proj.bias",
                         "encoder.pos_embedding"]
    assert [tops(n, 3) for n in layers[1:12]] == [
        [f"encoder.layers.encoder_layer_{i}"] for i in range(11)]
    assert tops(layers[12], 3) == ["encoder.layers.encoder_layer_11", "encoder.ln.weight",
                                   "encoder.ln.bias"]  # the final norm joins the last block
    assert layers[13] == ["heads.head.weight", "heads.head.bias"]


def test_convnext_and_swin_downsampling_joins_the_next_block():
    layers = [tops(n, 3) for n in layers_of("convnext_tiny")]
    assert len(layers) == 1 + 3 + 3 + 9 + 3 + 1  # stem, 18 blocks, head (as timm's)
    assert layers[4] == ["features.2.0", "features.2.1", "features.3.0"]
    assert layers[-2] == ["features.7.2"]
    assert layers[-1] == ["classifier.0.weight", "classifier.0.bias", "classifier.2.weight",
                          "classifier.2.bias"]  # the head's norm at the head's lr, as timm
    swin = [tops(n, 3) for n in layers_of("swin_t")]
    assert len(swin) == 1 + 2 + 2 + 6 + 2 + 1
    assert swin[3] == ["features.2.reduction", "features.2.norm", "features.3.0"]
    assert swin[-2] == ["features.7.1", "norm.weight", "norm.bias"]


def test_efficientnet_and_mobilenet_layers_are_inverted_residual_blocks():
    eff = [tops(n, 3) for n in layers_of("efficientnet_b0")]
    assert len(eff) == 1 + 16 + 1 and eff[1] == ["features.1.0"]
    assert eff[-2] == ["features.7.0", "features.8.0", "features.8.1"]  # final 1x1 conv joins
    mob = [tops(n, 2) for n in layers_of("mobilenet_v3_large")]
    assert mob[1:15] == [[f"features.{i}"] for i in range(1, 15)]
    assert mob[15] == ["features.15", "features.16"]
    assert mob[-1] == ["classifier.0", "classifier.3"]  # pre-logits with the head, as timm


def test_models_without_blocks_get_a_layer_per_stage():
    t = built("vgg11").table
    layers = layers_of("vgg11")
    assert len(layers) == len(t.stages)  # the last stage (pre-logits) joins the head
    assert layers[0] == t.stage_params(0)


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
    b = build_architecture(cfg, OmegaConf.create({"num_outputs": 2}), meta=True)
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
