"""The schema, its registration and `finetune_prep.compose`: configs compose from Python, and no
key is silently ignored."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import finetune_prep
from finetune_prep.config import BnStats, ModelSource, validate
from finetune_prep.errors import FinetunePrepError


def test_schemas_are_registered_under_a_namespaced_group_with_a_provider():
    repo = ConfigStore.instance().repo
    schemas = repo["finetune_prep"]["schema"]
    assert {"config.yaml", "freeze.yaml", "optim.yaml", "model.yaml"} <= set(schemas)
    assert schemas["freeze.yaml"].provider == "finetune_prep"
    assert "schema" not in repo  # no bare top-level group that a user's own schema could clash with


def test_hydras_own_compose_api_works_after_import_alone():
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(finetune_prep.CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=["freeze=last_stage"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.model.arch == "resnet18"
    assert [dict(r) for r in cfg.freeze.rules] == [
        {"freeze": "*"}, {"unfreeze": "@stage[-1]"}, {"unfreeze": "@head"}]


def test_compose_applies_presets_and_overrides():
    cfg = finetune_prep.compose(["model=vit_b_16", "optim=sgd", "head.num_outputs=10"])
    assert (cfg.model.arch, cfg.model.source) == ("vit_b_16", ModelSource.torchvision)
    assert cfg.optim.optimizer["_target_"] == "torch.optim.SGD"
    assert cfg.optim.lr == 0.01 and cfg.head.num_outputs == 10
    assert cfg.freeze.bn_stats == BnStats.eval  # from the primary config: presets set what differs


def test_compose_with_a_user_config_dir_adds_its_presets(tmp_path):
    (tmp_path / "freeze").mkdir()
    (tmp_path / "freeze" / "mine.yaml").write_text(
        "defaults:\n  - /finetune_prep/schema/freeze@_here_\n  - _self_\n"
        "rules:\n  - freeze: '*'\n  - unfreeze: layer3\n")
    cfg = finetune_prep.compose(["freeze=mine"], config_dir=tmp_path)
    assert [dict(r) for r in cfg.freeze.rules] == [{"freeze": "*"}, {"unfreeze": "layer3"}]
    with pytest.raises(FinetunePrepError, match="is not a folder"):
        finetune_prep.compose([], config_dir=tmp_path / "nope")


def test_an_unknown_preset_is_a_finetune_prep_error_listing_the_options():
    with pytest.raises(FinetunePrepError, match="head_only"):
        finetune_prep.compose(["freeze=nope"])


@pytest.mark.parametrize(("override", "expected"), [
    ("+head.num_output=10", "head.num_output is not a config key"),
    ("+model.archh=resnet50", "Did you mean: model.arch"),
    ("+verify.batchsize=4", "Did you mean: verify.batch_size"),
])
def test_a_key_outside_the_schema_is_an_error_even_with_plus(override, expected):
    cfg = finetune_prep.compose([override])  # Hydra accepts a '+' key...
    with pytest.raises(FinetunePrepError, match=expected.replace("[", r"\[").replace(".", r"\.")):
        validate(cfg)  # ...finetune_prep does not read it, so it says so
    with pytest.raises(FinetunePrepError, match="finetune_prep does not read it"):
        finetune_prep.prepare(cfg, materialize=False, verify=False)


def test_open_sections_take_any_key():
    cfg = validate(finetune_prep.compose(
        ["model=vit_b_16", "+model.kwargs.dropout=0.1", "+optim.optimizer.betas=[0.9,0.95]"]))
    assert cfg.model.kwargs["dropout"] == 0.1  # a typed Config: kwargs is a plain dict
    prepared = finetune_prep.prepare(cfg, materialize=False, verify=False)
    assert prepared.document["optimizer"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize(("override", "expected"), [
    ("+model.kwargs.weights=DEFAULT", "model.kwargs.weights: finetune_prep sets weights itself; "
                                      "use model.weights"),
    ("+model.kwargs.num_classes=10", "use head.num_outputs"),
    ("+model.kwargs.nope=1", "model.kwargs (nope) rejected by resnet18"),
])
def test_model_kwargs_the_builder_sets_or_rejects_are_clear_errors(override, expected):
    with pytest.raises(FinetunePrepError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        finetune_prep.prepare(finetune_prep.compose([override]), materialize=False, verify=False)


@pytest.mark.parametrize(("override", "values"), [
    ("model.source=foo", "torchvision, timm, target"),
    ("freeze.bn_stats=sometimes", "eval, train"),
])
def test_enum_keys_list_their_valid_values(override, values):
    with pytest.raises(FinetunePrepError, match=values):
        finetune_prep.compose([override])


def test_a_plain_dict_validates_against_the_same_schema():
    cfg = validate({"model": {"arch": "resnet50"}, "freeze": {"bn_stats": "train"}})
    assert cfg.model.arch == "resnet50" and cfg.freeze.bn_stats == BnStats.train
    with pytest.raises(FinetunePrepError, match="Did you mean: head.num_outputs"):
        validate({"head": {"num_output": 3}})
    with pytest.raises(FinetunePrepError, match=r"optim\.groups\[0\]\.lr_mul is not a config key"):
        validate({"optim": {"groups": [{"match": "fc", "lr_mul": 2}]}})


def test_every_yaml_key_has_a_comment():
    key = re.compile(r"^\s*(- )?[\w@/.()-]+:")
    missing = []
    for path in sorted(finetune_prep.CONF_DIR.rglob("*.yaml")):
        block = None  # indentation of a `key: |` text block being skipped
        for n, line in enumerate(path.read_text().splitlines(), 1):
            indent = len(line) - len(line.lstrip())
            if block is not None and (indent > block or not line.strip()):
                continue
            block = indent if re.search(r":\s*\|", line) else None
            if key.match(line) and "#" not in line:
                missing.append(f"{path.relative_to(finetune_prep.CONF_DIR)}:{n}: {line.strip()}")
    assert missing == []


@pytest.mark.slow
def test_compose_gives_the_config_the_cli_gets(tmp_path):
    overrides = ["model=vit_b_16", "freeze=last_two_stages", "optim=layer_decay"]
    done = subprocess.run([sys.executable, "-m", "finetune_prep", *overrides, "--cfg", "job"],
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    cli = yaml.safe_load(done.stdout)
    ours = OmegaConf.to_container(finetune_prep.compose(overrides), enum_to_str=True)
    assert ours == cli


def test_importing_the_package_does_not_import_the_cli_or_torch():
    code = ("import sys, finetune_prep; finetune_prep.compose(['freeze=full']);"
            "print('finetune_prep.__main__' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def _numeric_fields(schema: type, path: str = "") -> list[tuple[str, type]]:
    """(dotted path, int or float) of every number in the schema; list items as [0]."""
    import dataclasses
    import typing

    found = []
    for f in dataclasses.fields(schema):
        hint = typing.get_type_hints(schema)[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = hint if hint in (int, float) else args[0] if args in ([int], [float]) else None
        if kind is not None and hint is not bool:
            found.append((f"{path}{f.name}", kind))
        elif dataclasses.is_dataclass(hint):
            found += _numeric_fields(hint, f"{path}{f.name}.")
        elif args and dataclasses.is_dataclass(args[0]):
            found += _numeric_fields(args[0], f"{path}{f.name}[0].")
    return found


def test_every_number_of_the_schema_is_bounded_at_validation():
    """A number field added later without a bound fails here: each int refuses -1 and 2**70,
    each float NaN, inf and -inf, as one FinetunePrepError naming the key."""
    from finetune_prep.config import Config

    fields = _numeric_fields(Config)
    assert {"head.num_outputs", "verify.seed", "optim.lr", "optim.groups[0].lr_mult",
            "freeze.schedule[0].every", "freeze.schedule[0].lr"} <= {p for p, _ in fields}
    base = {"optim": {"groups": [{"match": "fc"}]},
            "freeze": {"schedule": [{"at": {"epoch": 1}, "rules": [{"unfreeze": "layer4"}]}]}}
    for path, kind in fields:
        for bad in ([-1, 2**70] if kind is int else [math.nan, math.inf, -math.inf]):
            cfg = OmegaConf.create(base)
            OmegaConf.update(cfg, path.replace("[0]", ".0"), bad, force_add=True)
            with pytest.raises(FinetunePrepError, match=re.escape(path.split("[0].")[-1])):
                validate(cfg)
    cfg = OmegaConf.create(base)
    OmegaConf.update(cfg, "freeze.schedule.0.at.epoch", 2**70)
    with pytest.raises(FinetunePrepError, match=r"at\.epoch=1180591620717411303424"):
        validate(cfg)


SHADOW = ("defaults:\n  - /finetune_prep/schema/freeze@_here_\n  - _self_\n"
          "rules:\n  - freeze: '*'\n  - unfreeze: layer4\n")


def test_a_user_preset_named_like_a_packaged_one_is_refused(tmp_path):
    """Hydra reads the packaged conf/ first: the user's freeze/head_only.yaml would be ignored."""
    (tmp_path / "freeze").mkdir()
    (tmp_path / "freeze" / "head_only.yaml").write_text(SHADOW)
    with pytest.raises(FinetunePrepError, match=re.escape(
            "has the name of the packaged preset freeze=head_only")) as err:
        finetune_prep.compose(["freeze=last_stage"], config_dir=tmp_path)  # even unselected
    assert "freeze=my_head_only" in str(err.value)  # says how to fix it
    (tmp_path / "freeze" / "head_only.yaml").rename(tmp_path / "freeze" / "my_head_only.yaml")
    cfg = finetune_prep.compose(["freeze=my_head_only"], config_dir=tmp_path)
    assert [dict(r) for r in cfg.freeze.rules] == [{"freeze": "*"}, {"unfreeze": "layer4"}]


def _run_config(folder, *overrides: str):
    """A run's .hydra/config.yaml: the composed config as YAML, as Hydra saves it."""
    cfg = finetune_prep.compose(list(overrides))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return cfg


def test_a_config_dir_holding_a_runs_config_composes_that_config_again(tmp_path):
    hydra_dir = tmp_path / "run" / ".hydra"
    first = _run_config(hydra_dir, "freeze=last_stage", "optim=sgd", "head.num_outputs=7",
                        "+model.kwargs.zero_init_residual=true")
    again = finetune_prep.compose([], config_dir=hydra_dir)
    assert OmegaConf.to_yaml(again) == OmegaConf.to_yaml(first)  # not the packaged defaults
    assert again.optim.optimizer == {"_target_": "torch.optim.SGD", "momentum": 0.9,
                                     "nesterov": True}  # no AdamW key merged in
    changed = finetune_prep.compose(["head.num_outputs=3"], config_dir=hydra_dir)
    assert changed.head.num_outputs == 3 and changed.optim.lr == first.optim.lr
    with pytest.raises(FinetunePrepError, match="keeps the run's own values"):
        finetune_prep.compose(["freeze=full"], config_dir=hydra_dir)
    from finetune_prep.config import is_rerun_override, origin_of

    assert origin_of(changed).overrides == ("head.num_outputs=3",)
    assert origin_of(changed).rerun == str(hydra_dir.resolve() / "config.yaml")
    kept = ["~model", "~freeze=null", "+finetune_prep/rerun@_global_=config"]  # a sweep's too
    assert all(map(is_rerun_override, kept))
    assert not any(map(is_rerun_override, ["~model.weights", "freeze=null", "model=x"]))


def test_a_primary_config_of_ones_own_named_config_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("defaults:\n  - _self_\nhead:\n  num_outputs: 5\n")
    with pytest.raises(FinetunePrepError, match="name of the packaged primary config"):
        finetune_prep.compose([], config_dir=tmp_path)


def test_compose_remembers_where_the_config_came_from(tmp_path):
    from finetune_prep.config import CONF_DIR, origin_of

    (tmp_path / "freeze").mkdir()
    (tmp_path / "freeze" / "mine.yaml").write_text(SHADOW)
    cfg = finetune_prep.compose(["freeze=mine", "head.num_outputs=2"], config_dir=tmp_path)
    origin = origin_of(cfg)
    assert origin.overrides == ("freeze=mine", "head.num_outputs=2")
    assert origin.config_dirs == (str(CONF_DIR), str(tmp_path.resolve()))
    assert origin.rerun is None
    assert origin_of(cfg.copy()) is None  # a copy is another config: nothing is assumed
    other = tmp_path / "more"
    (other / "optim").mkdir(parents=True)
    (other / "optim" / "mine.yaml").write_text("lr: 0.5\n")
    cfg = finetune_prep.compose(["freeze=mine", "optim=mine", f"hydra.searchpath=[{other}]"],
                                config_dir=tmp_path)  # both folders searched, in CLI order
    assert cfg.optim.lr == 0.5 and cfg.freeze.rules[-1] == {"unfreeze": "layer4"}
    assert origin_of(cfg).config_dirs == (str(CONF_DIR), str(tmp_path.resolve()),
                                          str(other.resolve()))
    assert origin_of(cfg).overrides == ("freeze=mine", "optim=mine")  # hydra.* as the CLI's
    (other / "optim" / "sgd.yaml").write_text("lr: 0.5\n")
    with pytest.raises(FinetunePrepError, match="packaged preset optim=sgd"):
        finetune_prep.compose([f"hydra.searchpath=[file://{other}]"])
    assert origin_of(OmegaConf.create({"head": {"num_outputs": 2}})) is None


def test_validate_returns_the_typed_config():
    """validate() gives the schema's dataclasses (attributes, enums, GroupRule items), not a
    DictConfig; prepare() takes it as it is."""
    from finetune_prep.config import Config, GroupRule, ModelSource

    cfg = validate(finetune_prep.compose(
        ["freeze=head_only", "+optim.groups=[{match: fc, lr_mult: 10}]"]))
    assert isinstance(cfg, Config) and not OmegaConf.is_config(cfg)
    assert cfg.model.source is ModelSource.torchvision and cfg.freeze.bn_stats is BnStats.eval
    assert cfg.optim.groups == [GroupRule(match="fc", lr_mult=10.0, wd_mult=1.0, name=None)]
    assert cfg.freeze.rules == [{"freeze": "*"}, {"unfreeze": "@head"}]
    assert cfg.head.get("module") is None and cfg.model.get("nope", 3) == 3
    assert validate(cfg) == cfg  # a Config validates to itself
    doc = finetune_prep.prepare(cfg, materialize=False, verify=False).document
    assert {g["lr"] for g in doc["groups"]} == {0.01}


@pytest.mark.parametrize(("given", "expected"), [
    ({"freeze": {"rules": "layer4"}}, r"freeze\.rules='layer4': must be a list of"),
    ({"freeze": {"rules": [{"freeze": ["a"]}]}}, r"freeze\.rules\[0\]\.freeze=\['a'\]: a pattern"),
    ({"freeze": {"rules": [{"freeze": None}]}}, r"freeze\.rules\[0\]\.freeze=None: a pattern"),
    ({"optim": {"no_decay": [{"a": 1}]}}, r"optim\.no_decay\[0\]=\{'a': 1\}: a pattern"),
    ({"optim": {"groups": [{"lr_mult": 2}]}}, r"optim\.groups\[0\]\.match is missing"),
    ({"optim": {"groups": ["fc"]}}, r"optim\.groups\[0\]='fc': a group rule is a mapping"),
    ({"optim": {"groups": [{"match": "fc", "lr_mult": "x"}]}},
     r"optim\.groups\[0\]\.lr_mult=x: must be a finite number"),
    ({"optim": {"groups": [{"match": "fc", "lr_mult": 2, "wd_mul": 0}]}},
     r"optim\.groups\[0\]\.wd_mul is not a config key.*Did you mean: optim\.groups\[0\]\.wd_mult"),
])
def test_rule_lists_are_checked_in_plain_python_with_clear_messages(given, expected):
    with pytest.raises(FinetunePrepError, match=expected):
        validate(given)


def test_rule_lists_are_loose_only_in_hydras_schema():
    """Hydra composes onto the loose schema (rule lists typed Any: no per-node validation), the
    typed Config keeps list[GroupRule]; scalars stay typed in both."""
    import typing

    from finetune_prep.config import Config, GroupRule, loose_schema

    loose = typing.get_type_hints(loose_schema(Config))
    assert typing.get_type_hints(loose["optim"])["groups"] is typing.Any
    assert typing.get_type_hints(typing.get_type_hints(Config)["optim"])["groups"] \
        == list[GroupRule]
    assert typing.get_type_hints(loose["freeze"])["bn_stats"] is BnStats
    with pytest.raises(FinetunePrepError, match="eval, train"):
        finetune_prep.compose(["freeze.bn_stats=sometimes"])
    # plain numbers and bools in a rule become text, as the typed schema made them
    assert validate({"freeze": {"rules": [{"freeze": 5}]}}).freeze.rules == [{"freeze": "5"}]


def test_freeze_rules_file_defaults_to_null_and_takes_a_path():
    assert validate(finetune_prep.compose([])).freeze.rules_file is None
    cfg = validate(finetune_prep.compose(["freeze.rules=[]", "freeze.rules_file=my/r.yaml"]))
    assert (cfg.freeze.rules_file, cfg.freeze.rules) == ("my/r.yaml", [])  # read by app.rulesfile
    with pytest.raises(FinetunePrepError, match="freeze.rules_file is empty: give the YAML file"):
        validate({"freeze": {"rules_file": " "}})


@pytest.mark.parametrize(("overrides", "source"), [
    (["freeze.rules_file=r.yaml"], "2 rules, set by the freeze preset head_only"),
    (["freeze=last_stage", "freeze.rules_file=r.yaml"], "3 rules, set by the freeze preset "
                                                         "last_stage"),
    (["freeze=full", "freeze.rules_file=r.yaml", "freeze.rules=[{freeze: fc}]"],
     "1 rule, set by the override freeze.rules=[{freeze: fc}]"),
])
def test_freeze_rules_file_beside_inline_rules_is_one_error_naming_their_source(overrides,
                                                                                 source):
    with pytest.raises(FinetunePrepError) as err:
        validate(finetune_prep.compose(overrides))
    message = str(err.value)
    assert message.startswith(f"freeze.rules_file=r.yaml and freeze.rules ({source}) are both "
                              "set; the rules come from one place.")
    assert "put `rules_file: r.yaml` into a freeze preset of your own" in message
    assert message.endswith("freeze.rules=[] freeze.rules_file=r.yaml.")
    # a plain dict has no origin: the message still names both keys
    with pytest.raises(FinetunePrepError, match=r"\(1 rule, set by a freeze preset or an "):
        validate({"freeze": {"rules": [{"freeze": "*"}], "rules_file": "r.yaml"}})


def test_register_configs_stores_once_and_again_after_the_store_is_cleared(monkeypatch):
    store = ConfigStore.instance()
    monkeypatch.setattr(store, "repo", {})  # a fresh store, put back afterwards
    finetune_prep.register_configs()
    first = store.repo["finetune_prep"]["schema"]["freeze.yaml"]
    finetune_prep.register_configs()
    assert store.repo["finetune_prep"]["schema"]["freeze.yaml"] is first  # not stored again
    store.repo["finetune_prep"]["schema"].pop("freeze.yaml")
    finetune_prep.register_configs()
    assert store.repo["finetune_prep"]["schema"]["freeze.yaml"].node == first.node


def _presets() -> list[str]:
    from finetune_prep.config import CONF_DIR

    return [f"{group.name}={preset.stem}" for group in sorted(CONF_DIR.iterdir())
            if group.is_dir() and group.name != "sweep" for preset in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("preset", _presets())
def test_a_composed_config_is_typed_as_the_schema_would_type_it(preset):
    from finetune_prep import config

    cfg = finetune_prep.compose(overrides=[preset])
    slow = validate(OmegaConf.to_container(cfg))  # a plain dict: merged into the schema
    assert validate(cfg) == slow
    skipped = config._composed(cfg, config._plain(cfg)) is None  # only for a schedule
    assert skipped == bool(slow.freeze.schedule)


def test_a_value_left_as_missing_is_an_error_not_the_schemas_default():
    cfg = finetune_prep.compose(overrides=["model.arch=???", "optim.lr=???"])
    for given in (cfg, OmegaConf.to_container(cfg)):
        with pytest.raises(FinetunePrepError, match=r"model.arch is \?\?\? .*model.arch=VALUE.*"
                                                    r"Also \?\?\? : optim.lr"):
            validate(given)


@pytest.mark.parametrize("schedule", ["''", "null", "0"])
def test_a_schedule_that_is_not_a_list_is_refused_whichever_way_it_came(schedule):
    cfg = finetune_prep.compose(overrides=[f"freeze.schedule={schedule}"])
    for given in (cfg, OmegaConf.to_container(cfg)):
        with pytest.raises(FinetunePrepError, match="(?s)invalid config: .*schedule"):
            validate(given)


def test_a_missing_value_inside_a_schedule_phase_is_named():
    phase = {"at": {"epoch": 2}, "every": "???", "rules": [{"unfreeze": "*"}]}
    with pytest.raises(FinetunePrepError, match=r"freeze.schedule\[0\].every is \?\?\?"):
        validate({"freeze": {"schedule": [phase]}})
