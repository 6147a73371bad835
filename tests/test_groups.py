"""Optimizer groups: absolute numbers, no-decay, first-match rules, layer decay, errors."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from finetune_prep.config import OptimConfig
from finetune_prep.errors import FinetunePrepError
from finetune_prep.groups import build_groups


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
    # a ViT's class token and position embedding are not 1-d: decayed unless a pattern says so
    v = vit_table
    plain = build_groups(v, list(v.names), optim())
    decayed = {n for g in plain if g["weight_decay"] > 0 for n in g["params"]}
    assert {"class_token", "encoder.pos_embedding"} <= decayed
    custom = build_groups(v, list(v.names), optim(no_decay=["@ndim<=1", "class_token",
                                                          "*pos_embedding"]))
    decayed = {n for g in custom if g["weight_decay"] > 0 for n in g["params"]}
    assert not {"class_token", "encoder.pos_embedding"} & decayed


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


def test_layer_decay_scales_by_distance_from_the_head(resnet18_table):
    t = resnet18_table
    groups = build_groups(t, list(t.names), optim(layer_decay=0.5, no_decay=[]))
    lr = {n: g["lr"] for g in groups for n in g["params"]}
    assert lr["fc.weight"] == pytest.approx(1e-3)
    assert lr["layer4.0.conv1.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr["layer3.0.conv1.weight"] == pytest.approx(1e-3 * 0.25)
    assert lr["conv1.weight"] == pytest.approx(1e-3 * 0.5 ** 5)
    names = [g["name"] for g in groups]
    assert names == ["stage0", "stage1", "stage2", "stage3", "stage4", "head"]
    assert all(g["lr_scale"] == pytest.approx(g["lr"] / 1e-3) for g in groups)


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
     ({"groups": [{"match": "layr4", "lr_mult": 2.0}]}, "Did you mean: layer4")],
)
def test_bad_optim_settings(resnet18_table, overrides, message):
    with pytest.raises(FinetunePrepError, match=message):
        build_groups(resnet18_table, list(resnet18_table.names), optim(**overrides))
