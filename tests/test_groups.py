"""Optimizer groups: absolute numbers, no-decay, first-match rules, layer decay, errors."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from finetune_prep.config import OptimConfig
from finetune_prep.errors import FinetunePrepError
from finetune_prep.plan.groups import build_groups


def optim(**overrides):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), overrides)


def by_name(groups):
    return {g["name"]: g for g in groups}


def test_head_only_gives_a_decay_and_a_no_decay_group(resnet18_table):
    groups = build_groups(resnet18_table, ["fc.weight", "fc.bias"], optim())
    assert [(g["name"], g["lr"], g["weight_decay"], g["params"]) for g in groups] == [
        ("head", 0.001, 0.05, ["fc.weight"]),
        ("head/no_decay", 0.001, 0.0, ["fc.bias"]),
    ]


def test_no_decay_covers_biases_norms_and_1d_parameters(resnet18_table, vit_table):
    t = resnet18_table
    groups = by_name(build_groups(t, list(t.names), optim()))
    no_decay = set(groups["backbone+head/no_decay"]["params"])
    assert no_decay == {n for n in t.names if len(t.shapes[n]) <= 1}
    assert "bn1.weight" in no_decay and "conv1.weight" not in no_decay
    # a ViT's class token and position embedding are not 1-d: the default's @no_weight_decay
    # (the model's own list) keeps them undecayed; without it they decay
    v = vit_table
    tokens = {"class_token", "encoder.pos_embedding"}
    default = build_groups(v, list(v.names), optim())
    assert not tokens & {n for g in default if g["weight_decay"] > 0 for n in g["params"]}
    plain = build_groups(v, list(v.names), optim(no_decay=["@bias", "@norm", "@ndim<=1"]))
    assert tokens <= {n for g in plain if g["weight_decay"] > 0 for n in g["params"]}


def test_groups_partition_the_trainable_parameters_in_model_order(resnet18_table):
    t = resnet18_table
    train = [n for n in t.names if n.startswith(("layer4", "fc"))]
    groups = build_groups(t, train, optim(layer_decay=0.5))
    listed = [n for g in groups for n in g["params"]]
    assert sorted(listed) == sorted(train) and len(listed) == len(set(listed))
    for g in groups:
        assert g["params"] == [n for n in t.names if n in g["params"]]


def test_first_matching_group_rule_wins_and_is_named(resnet18_table):
    t = resnet18_table
    rules = [{"match": "@head", "lr_mult": 10.0, "name": "head"},
             {"match": "*", "lr_mult": 0.1, "wd_mult": 0.5}]
    groups = by_name(build_groups(t, list(t.names), optim(groups=rules)))
    assert groups["head"]["lr"] == pytest.approx(0.01) and groups["head"]["params"] == [
        "fc.weight"]
    assert groups["*"]["lr"] == pytest.approx(1e-4)
    assert groups["*"]["weight_decay"] == pytest.approx(0.025)
    assert "optim.groups[0] (@head)" in groups["head"]["reasons"]


def test_layer_decay_by_block_scales_by_distance_from_the_head(resnet18_table):
    t = resnet18_table
    groups = build_groups(t, list(t.names), optim(layer_decay=0.5, no_decay=[]))
    lr = {n: g["lr"] for g in groups for n in g["params"]}
    layer = {n: i for g in groups for n, i in zip(g["params"], g["layer_ids"], strict=True)}
    assert lr["fc.weight"] == pytest.approx(1e-3) and layer["fc.weight"] == 9
    assert lr["layer4.1.conv1.weight"] == pytest.approx(1e-3 * 0.5)  # the last block
    assert lr["layer4.0.downsample.0.weight"] == pytest.approx(1e-3 * 0.5 ** 2)
    assert lr["layer3.1.bn2.bias"] == pytest.approx(1e-3 * 0.5 ** 3)
    assert lr["conv1.weight"] == lr["bn1.bias"] == pytest.approx(1e-3 * 0.5 ** 9)
    names = [g["name"] for g in groups]
    assert names == [*(f"layer{i}" for i in range(9)), "head"]
    assert all(g["lr_scale"] == pytest.approx(g["lr"] / 1e-3) for g in groups)
    assert all(set(g["layer_ids"]) == {int(g["name"][5:]) if g["name"] != "head" else 9}
               for g in groups)


def test_layer_decay_by_stage(resnet18_table):
    t = resnet18_table
    groups = build_groups(t, list(t.names), optim(layer_decay=0.5, no_decay=[],
                                                  layer_decay_granularity="stage"))
    lr = {n: g["lr"] for g in groups for n in g["params"]}
    assert lr["fc.weight"] == pytest.approx(1e-3)
    assert lr["layer4.0.conv1.weight"] == lr["layer4.1.conv1.weight"] == pytest.approx(5e-4)
    assert lr["layer3.0.conv1.weight"] == pytest.approx(1e-3 * 0.25)
    assert lr["conv1.weight"] == pytest.approx(1e-3 * 0.5 ** 5)
    names = [g["name"] for g in groups]
    assert names == ["stage0", "stage1", "stage2", "stage3", "stage4", "head"]


def test_every_group_records_its_parameters_layer_ids(resnet18_table):
    t = resnet18_table
    train = [n for n in t.names if n.startswith(("layer4", "fc"))]
    groups = build_groups(t, train, optim())  # no layer decay: groups span layers
    ids = {n: i for g in groups for n, i in zip(g["params"], g["layer_ids"], strict=True)}
    assert ids == {n: t.layers[n] for n in train}
    assert {ids["layer4.0.conv1.weight"], ids["layer4.1.conv1.weight"], ids["fc.bias"]} == {
        7, 8, 9}


def test_model_no_weight_decay_defaults(vit_table, make_cfg):
    """A torchvision ViT's class token and position embedding (2-d and 3-d) are not decayed
    under the presets; @no_weight_decay selects exactly them."""
    from finetune_prep.plan.rules import match

    assert match("@no_weight_decay", vit_table) == ["class_token", "encoder.pos_embedding"]
    v = vit_table
    for preset in ("adamw", "layer_decay", "sgd"):
        opt = make_cfg(f"optim={preset}").optim
        groups = build_groups(v, list(v.names), opt)
        wd = {n: g["weight_decay"] for g in groups for n in g["params"]}
        assert wd["class_token"] == wd["encoder.pos_embedding"] == 0.0, preset
        assert wd["conv_proj.weight"] > 0, preset


def test_frozen_parameters_are_in_no_group_and_nothing_trains_gives_no_groups(resnet18_table):
    assert build_groups(resnet18_table, [], optim()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"lr": 0.0}, r"optim.lr=0.0: must be a finite number > 0"),
     ({"lr": math.inf}, r"optim.lr=inf: must be a finite number > 0"),
     ({"lr": math.nan}, r"optim.lr=nan: must be a finite number"),
     ({"weight_decay": -1.0}, "must be a finite number >= 0"),
     ({"weight_decay": math.nan}, "optim.weight_decay=nan: must be a finite number >= 0"),
     ({"weight_decay": math.inf}, "optim.weight_decay=inf"),
     ({"layer_decay": 1.5}, r"must be a finite number in \(0, 1\]"),
     ({"layer_decay": math.nan}, r"optim.layer_decay=nan"),
     ({"groups": [{"match": "fc", "lr_mult": math.nan}]}, r"optim.groups\[0\].lr_mult=nan"),
     ({"groups": [{"match": "fc", "wd_mult": math.inf}]}, r"optim.groups\[0\].wd_mult=inf"),
     ({"layer_decay_granularity": "blocks"}, "use block .* or stage"),
     ({"groups": [{"match": "layr4", "lr_mult": 2.0}]}, "Did you mean: layer4")],
)
def test_bad_optim_settings(resnet18_table, overrides, message):
    with pytest.raises(FinetunePrepError, match=message):
        build_groups(resnet18_table, list(resnet18_table.names), optim(**overrides))


# --- layer decay against timm's optimizer, parameter by parameter ---------------------------

TIMM_ARCHS = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "convnext_tiny",
              "swin_tiny_patch4_window7_224", "resnet50", "efficientnet_b0", "regnetx_002",
              "beit_base_patch16_224", "eva02_tiny_patch14_224"]


def timm_reference(arch: str) -> dict[str, tuple[float, float]]:
    """Effective (lr, weight_decay) per parameter of timm's own optimizer for `arch`."""
    timm = pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2

    from finetune_prep.model.describe import init_on_meta

    if not timm.is_model(arch):
        pytest.skip(f"this timm has no {arch}")
    with init_on_meta():
        model = timm.create_model(arch, pretrained=False, num_classes=1)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"] * g["lr_scale"], g["weight_decay"])
            for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("arch", TIMM_ARCHS)
def test_layer_decay_matches_timm_parameter_by_parameter(make_cfg, arch):
    from finetune_prep import prepare

    expected = timm_reference(arch)
    cfg = make_cfg("optim=layer_decay", "model.source=timm", f"model.arch={arch}",
                   "freeze=full", "verify.backward=false")
    groups = prepare(cfg, materialize=False).document["groups"]
    got = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["params"]}
    assert list(got) == list(expected)  # every parameter, in model order
    wrong = [(n, got[n], expected[n]) for n in expected
             if got[n][1] != expected[n][1]
             or got[n][0] != pytest.approx(expected[n][0], rel=1e-12, abs=0)]
    assert not wrong, wrong[:5]
    assert len({lr for lr, _ in expected.values()}) > 5  # the comparison is not trivial


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lr": 10.0, "groups": [{"match": "fc", "lr_mult": 1e38}]}, r"group 'fc' .* gets lr 1e\+39"),
    ({"lr": 1e-30, "layer_decay": 1e-9}, r"group 'layer0' \(layer_decay 1e-09\^\d+\) gets lr"),
    ({"weight_decay": 1000.0}, r"1 - lr x weight_decay = 0\b"),
])
def test_the_numbers_a_group_ends_up_with_are_checked(resnet18_table, overrides, message):
    with pytest.raises(FinetunePrepError, match=message):
        build_groups(resnet18_table, list(resnet18_table.names), optim(**overrides))


def test_weight_decay_that_wipes_weights_is_refused_only_where_it_multiplies_them(
        resnet18_table):
    wide = optim(weight_decay=2000.0, optimizer={"_target_": "torch.optim.Adam"})
    assert build_groups(resnet18_table, ["fc.weight"], wide)[0]["weight_decay"] == 2000.0
    with pytest.raises(FinetunePrepError, match="torch.optim.AdamW every step multiplies"):
        build_groups(resnet18_table, ["fc.weight"], optim(weight_decay=2000.0))


def test_layer_decay_and_no_decay_are_data_in_each_group(vit_table):
    settings = optim(layer_decay=0.5, no_decay=["*.bias"])
    groups = build_groups(vit_table, vit_table.names, settings)
    top = max(vit_table.layer_ids().values())
    for g in groups:
        depths = {top - vit_table.layer_ids()[n] for n in g["params"]}
        assert {g["layer_decay"]["depth"]} == depths and g["layer_decay"]["factor"] == 0.5
        assert g["lr"] == pytest.approx(settings.lr * 0.5 ** g["layer_decay"]["depth"])
        biases = all(n.endswith(".bias") for n in g["params"])
        assert g["no_decay"] == (["*.bias"] if biases else [])
    plain = build_groups(vit_table, vit_table.names, optim(no_decay=[]))
    assert all("layer_decay" not in g and g["no_decay"] == [] for g in plain)
