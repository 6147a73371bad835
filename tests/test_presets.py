"""Every freeze preset on every torchvision classifier: the presets mean the same everywhere."""

from __future__ import annotations

import pytest
import torchvision
from conftest import REPO, meta_model
from omegaconf import OmegaConf

from finetune_prep.config import CONF_DIR
from finetune_prep.plan.phases import plan_phases
from finetune_prep.plan.rules import evaluate, match, parse_rules

ARCHS = torchvision.models.list_models(module=torchvision.models)
PRESETS = sorted(p.stem for p in (CONF_DIR / "freeze").glob("*.yaml"))


def trainable_under(table, preset: str) -> set[str]:
    rules = OmegaConf.load(CONF_DIR / "freeze" / f"{preset}.yaml").rules
    plan = evaluate(parse_rules(rules), table)
    return {n for n, t in plan.trainable.items() if t}


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_order_and_meaning(arch):
    table = meta_model(arch, 3).table
    head = set(match("@head", table))
    every = set(table.names)
    got = {p: trainable_under(table, p) for p in PRESETS}
    assert got["head_only"] == head
    assert got["full"] == every and got["frozen"] == set()
    assert head < got["last_stage"] < every  # strictly between head_only and full
    assert got["last_stage"] <= got["last_two_stages"] < every
    norms = set(match("@norm", table))
    assert got["norm_only"] == norms | head
    assert got["bn_frozen"] == every - norms
    assert got["gradual"] == got["backbone_at"] == head  # phase 0 of the schedules
    assert got["trainable_backbone_layers"] == every - set(  # the first two stages frozen
        n for i in range(min(2, len(table.stages))) for n in table.stage_params(i))
    assert got["adapters"] == every  # no rules: what peft made trainable (all, without peft)


def phases_under(table, preset: str) -> list[set[str]]:
    """Who trains in each later phase of a preset's schedule."""
    from finetune_prep.config import FreezeConfig, OptimConfig

    cfg = OmegaConf.merge(OmegaConf.structured(FreezeConfig),
                          OmegaConf.load(CONF_DIR / "freeze" / f"{preset}.yaml"))
    first = evaluate(parse_rules(cfg.rules), table)
    phases = plan_phases(table, first, cfg.schedule, OmegaConf.structured(OptimConfig))
    return [{n for n, t in p.plan.trainable.items() if t} for p in phases]


@pytest.mark.parametrize("arch", ARCHS)
def test_schedule_presets_plan_on_every_model(arch):
    table = meta_model(arch, 3).table
    head, every = set(match("@head", table)), set(table.names)
    gradual = phases_under(table, "gradual")
    assert len(gradual) == len(table.stages)  # one stage per epoch, from the top
    assert gradual[0] == head | set(table.stage_params(len(table.stages) - 1))
    assert all(a < b for a, b in zip([head, *gradual], gradual, strict=False))
    assert gradual[-1] == head | {n for i in range(len(table.stages))
                                  for n in table.stage_params(i)}
    assert phases_under(table, "backbone_at") == [every]


def test_every_preset_file_is_tested():
    assert {"head_only", "last_stage", "last_two_stages", "full", "frozen", "norm_only",
            "bn_frozen", "gradual", "backbone_at", "trainable_backbone_layers",
            "adapters"} == set(PRESETS)


def test_an_alias_that_selects_nothing_is_reported_not_fatal():
    table = meta_model("vgg16", 3).table  # no normalization layers
    plan = evaluate(parse_rules([{"unfreeze": "*"}, {"freeze": "@norm"}]), table)
    assert plan.empty == ("freeze.rules[1] {freeze: @norm}",)
    assert all(plan.trainable.values())


def documented_layer_decay_rows() -> dict[str, list[str]]:
    """docs/configuration.md's 'What optim=layer_decay gives' table: model preset -> its cells."""
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = text.split("### What `optim=layer_decay` gives", 1)[1].split("\n#", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `model=")]
    return {row[0].strip("`").removeprefix("model="): row[1:] for row in rows}


def test_documented_layer_decay_table_is_what_the_code_gives(make_cfg):
    from finetune_prep import prepare

    rows = documented_layer_decay_rows()
    assert list(rows) == ["resnet50", "vit_b_16", "convnext_tiny"]
    for model, (layers, first, last) in rows.items():
        cfg = make_cfg(f"model={model}", "optim=layer_decay", "freeze=full",
                       "verify.backward=false")
        lrs: dict[int, set[float]] = {}
        for g in prepare(cfg, materialize=False).document["groups"]:
            for layer in g["layer_ids"]:
                lrs.setdefault(layer, set()).add(g["lr"])
        assert all(len(v) == 1 for v in lrs.values())  # one lr per layer
        n = len(lrs)
        assert layers.split(":")[0] == str(n), model
        assert first == ", ".join(f"{lrs[k].pop():.3g}" for k in range(3)), model
        assert last == ", ".join(f"{lrs[k].pop():.3g}" for k in range(n - 3, n)), model
