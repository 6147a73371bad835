"""finetune_prep/paramfile/param_groups.schema.json: the format's JSON Schema (draft 2020-12).

Real files (written as the CLI writes them, and by the CLI itself in a sweep) validate against
it; documents the reader refuses are refused by the schema too. The runtime reader never uses
the schema (paramfile.validate is the checker); this keeps the two consistent.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from conftest import run_cli_here

import finetune_prep
from finetune_prep.app.pipeline import prepare
from finetune_prep.errors import FinetunePrepError
from finetune_prep.paramfile.format import FORMAT, Plan

PRESETS = {
    "head_only": ["freeze=head_only"],
    "last_stage_sgd": ["freeze=last_stage", "optim=sgd", "head.num_outputs=10"],
    "gradual": ["freeze=gradual"],
    "gradual_steps_layer_decay": ["freeze=gradual", "optim=layer_decay",
                                  "freeze.schedule=[{at:{step:100},each_stage:true,every:50}]"],
    "layer_decay": ["freeze=full", "optim=layer_decay"],
    "vit_layer_decay": ["model=vit_b_16", "freeze=last_two_stages", "optim=layer_decay"],
}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    text = (resources.files("finetune_prep.paramfile") / "param_groups.schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, dict]:
    """Each preset's param_groups.json as the CLI writes it (Prepared.save), read back."""
    found = {}
    for name, overrides in PRESETS.items():
        cfg = finetune_prep.compose([*overrides, "verify.backward=false",
                                     "model.input_size=[3,32,32]"])
        path = prepare(cfg, materialize=False, verify=False).save(
            tmp_path_factory.mktemp(name))
        found[name] = json.loads(path.read_text())
    return found


def test_the_schema_is_inside_the_package_and_names_the_format(validator):
    assert validator.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert FORMAT in validator.schema["properties"]["format"]["enum"]


@pytest.mark.parametrize("name", PRESETS)
def test_written_files_validate(written, validator, name):
    document = written[name]
    assert list(validator.iter_errors(document)) == []
    if name.startswith("gradual"):
        assert document["schedule"], "a gradual plan has phases"
    if "layer_decay" in name:
        assert any("layer_decay" in g for g in document["groups"])


def test_a_target_model_plan_validates(target_plan, validator):
    document = json.loads(Path(target_plan).read_text())
    assert document["model"]["target"]["_target_"] == "conftest.TwoBranchNet"
    assert list(validator.iter_errors(document)) == []


def _set(document: dict, path: str, value) -> dict:
    """A copy of `document` with the value at a dotted path (list indexes as numbers) set;
    `value` DELETE removes the key."""
    changed = copy.deepcopy(document)
    *parents, last = path.split(".")
    node = changed
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return changed


DELETE = object()
INVALID = {
    "another format": ("format", "finetune_prep/param_groups@9"),
    "no groups": ("groups", DELETE),
    "lr 0": ("groups.0.lr", 0),
    "lr as text": ("groups.0.lr", "0.001"),
    "lr a bool": ("groups.0.lr", True),
    "negative weight decay": ("groups.0.weight_decay", -0.1),
    "a group without params": ("groups.0.params", []),
    "a parameter that is not a name": ("groups.0.params", [3]),
    "layer decay without depth": ("groups.0.layer_decay", {"factor": 0.75}),
    "frozen not names": ("frozen", "conv1.weight"),
    "the whole model in eval mode": ("eval_modules", [""]),
    "negative counts": ("counts.frozen", -1),
    "an unknown model source": ("model.source", "pip"),
    "zero outputs": ("model.num_outputs", 0),
    "a Hydra key in model kwargs": ("model.kwargs", {"x": {"_target_": "os.system"}}),
    "an interpolation in model kwargs": ("model.kwargs", {"root": "${oc.env:HOME}"}),
    "optimizer without a class": ("optimizer", {"lr": 0.1}),
    "a nested Hydra key in the optimizer": ("optimizer.betas", {"_target_": "os.system"}),
    "a partial optimizer": ("optimizer._partial_", True),
    "an interpolation in the optimizer": ("optimizer.lr", "${oc.env:LR}"),
    "phase at epoch 0": ("schedule.0.at", {"epoch": 0}),
    "phase at two units": ("schedule.0.at", {"epoch": 1, "step": 2}),
    "phase at minutes": ("schedule.0.at", {"minute": 1}),
    "phase without counts": ("schedule.0.counts", DELETE),
    "phase group lr negative": ("schedule.0.groups.0.lr", -1.0),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_documents_are_refused_by_the_schema_and_the_reader(written, validator, case):
    path, value = INVALID[case]
    base = written["gradual_steps_layer_decay"]
    document = _set(base, path, value)
    assert list(validator.iter_errors(document)), f"the schema accepts {case}"
    with pytest.raises(FinetunePrepError):
        Plan.from_document(document, case)


def test_a_partial_target_model_is_refused(target_plan, validator):
    document = json.loads(Path(target_plan).read_text())
    document["model"]["target"]["_partial_"] = True
    assert list(validator.iter_errors(document))
    with pytest.raises(FinetunePrepError):
        Plan.from_document(document, "partial target")


@pytest.mark.slow
def test_files_the_cli_writes_in_a_sweep_validate(tmp_path, validator):
    done = run_cli_here("-m", "freeze=head_only,gradual", "optim=adamw,layer_decay",
                        "verify.backward=false", "model.input_size=[3,32,32]",
                        f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    files = sorted(tmp_path.glob("*/param_groups.json"))
    assert len(files) == 4
    for path in files:
        document = json.loads(path.read_text())
        assert list(validator.iter_errors(document)) == [], path
    assert any(json.loads(p.read_text()).get("schedule") for p in files)
