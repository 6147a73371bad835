"""finetune_prep.app.diff: what changed between two plans, and the `diff` command's exit codes.

The plans are real ones, made by `prepare` (meta device, no proof) from the packaged presets;
a few are then edited as a person editing a committed file would (provenance, checkpoint).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
from conftest import run_cli, run_cli_here

import finetune_prep
from finetune_prep.app import diff
from finetune_prep.app.diff import diff_plans, render
from finetune_prep.app.pipeline import prepare
from finetune_prep.paramfile.format import Plan, dumps

FAST = ("verify.backward=false", "model.input_size=[3,32,32]")


@cache
def plan(*overrides: str) -> Plan:
    """The plan the CLI would write for `overrides`, as a typed Plan (made once per session)."""
    cfg = finetune_prep.compose([*FAST, *overrides])
    document = prepare(cfg, materialize=False, verify=False).document
    return Plan.from_document(json.loads(dumps(document)), f"<{' '.join(overrides)}>")


def edited(base: Plan, **changes) -> Plan:
    """`base` with some top-level keys replaced, checked again as a file would be."""
    document = base.to_document()
    document.update(changes)
    return Plan.from_document(document, base.origin + "*")


def row(d: diff.Diff, label: str) -> diff.StageRow:
    return next(r for r in d.stages if r.label == label)


def test_a_plan_is_the_same_as_itself():
    p = plan("freeze=last_stage")
    d = diff_plans(p, p)
    assert d.same and d.headlines() == []
    assert render(d).startswith("Same plan:")


def test_provenance_verification_and_memory_are_not_compared():
    p = plan("freeze=head_only")
    other = edited(p, provenance={"config_sha256": "0" * 64, "overrides": ["x=1"], "git": []},
                   verified={"backward": False, "reason": "edited"},
                   memory={"plan_bytes": 1, "full_finetune_bytes": 2})
    assert diff_plans(p, other).same


def test_a_stage_that_starts_training_is_counted_in_its_row():
    d = diff_plans(plan("freeze=head_only"), plan("freeze=last_stage"))
    assert not d.same
    layer4 = row(d, "4 layer4")
    assert (layer4.tensors, layer4.old_trainable, layer4.new_trainable) == (15, 0, 15)
    assert len(layer4.started) == 15 and layer4.stopped == ()
    assert all(n.startswith("layer4.") for n in layer4.started)
    assert not row(d, "3 layer3").changed and not row(d, "head fc").changed
    assert [r.label for r in d.stages] == ["0 conv1+bn1", "1 layer1", "2 layer2", "3 layer3",
                                          "4 layer4", "head fc"]
    assert len(d.eval_removed) == 5 and d.eval_added == ()
    assert set(d.groups_added) == {"backbone+head", "backbone+head/no_decay"}
    text = render(d)
    assert "4 layer4                  Frozen     Trainable        15       15        0" in text
    assert "counts.trainable" not in text and "trainable: 513 -> 8,394,241 (+8,393,728)" in text


def test_a_stage_that_stops_training_reads_the_other_way():
    d = diff_plans(plan("freeze=last_stage"), plan("freeze=head_only"))
    layer4 = row(d, "4 layer4")
    assert len(layer4.stopped) == 15 and layer4.started == ()
    assert "15 tensors stop training (4 layer4: 15)" in "\n".join(d.headlines())


def test_lr_and_weight_decay_changes_per_group():
    d = diff_plans(plan("freeze=head_only"), plan("freeze=head_only", "optim.lr=0.01",
                                                  "optim.weight_decay=0.1"))
    assert not any(r.changed for r in d.stages)
    by_group = {r.old_group: r for r in d.rates}
    assert set(by_group) == {"head", "head/no_decay"}
    head = by_group["head"]
    assert (head.old_lr, head.new_lr, head.old_weight_decay, head.new_weight_decay) == (
        0.001, 0.01, 0.05, 0.1)
    assert head.params == ("fc.weight",)
    assert by_group["head/no_decay"].old_weight_decay == by_group["head/no_decay"].new_weight_decay
    text = render(d)
    assert "head: lr 0.001 -> 0.01, weight_decay 0.05 -> 0.1, 1 tensor (fc.weight)" in text
    assert "head/no_decay: lr 0.001 -> 0.01, 1 tensor (fc.bias)" in text


def test_layer_decay_changes_lr_per_layer():
    d = diff_plans(plan("freeze=last_two_stages"),
                   plan("freeze=last_two_stages", "optim=layer_decay"))
    assert not any(r.changed for r in d.stages)
    lrs = {r.new_group: r.new_lr for r in d.rates}
    assert lrs["layer8"] == pytest.approx(0.00075) and lrs["layer7"] == pytest.approx(0.0005625)
    assert "layer8" in d.groups_added


def test_gradual_unfreezing_shows_phases_and_when_each_stage_starts():
    d = diff_plans(plan("freeze=head_only"), plan("freeze=gradual"))
    assert not any(r.changed for r in d.stages)  # phase 0 is the same: only the head
    assert [(c.what, c.old, c.new) for c in d.phases][:2] == [
        ("phase 1", None, "epoch 1"), ("phase 2", None, "epoch 2")]
    moves = {m.new_phase: m for m in d.moves}
    assert set(moves) == {1, 2, 3, 4, 5} and all(m.old_phase is None for m in d.moves)
    assert dict(moves[1].stages) == {"4 layer4": 15}
    assert dict(moves[5].stages) == {"0 conv1+bn1": 3}
    assert "never -> phase 1 (epoch 1): 15 tensors (4 layer4: 15)" in render(d)


def test_a_phase_that_starts_later():
    later = ("freeze.schedule=[{at:{epoch:3},each_stage:true}]",)
    d = diff_plans(plan("freeze=gradual"), plan("freeze=gradual", *later))
    assert ("phase 1 starts at", "epoch 1", "epoch 3") in [(c.what, c.old, c.new)
                                                          for c in d.phases]
    assert d.moves == () and not any(r.changed for r in d.stages)


def test_model_and_optimizer_changes():
    d = diff_plans(plan("freeze=head_only"), plan("freeze=head_only", "head.num_outputs=10",
                                                  "optim=sgd"))
    assert ("model.num_outputs", 1, 10) in [(c.what, c.old, c.new) for c in d.model]
    targets = {c.what: (c.old, c.new) for c in d.optimizer}
    assert targets["optimizer._target_"] == ("torch.optim.AdamW", "torch.optim.SGD")
    assert not d.only_old and not d.only_new  # same names, another head size
    heads = d.headlines()
    assert heads[0] == "model: num_outputs 1 -> 10"
    assert heads[1].startswith("optimizer: _target_ torch.optim.AdamW -> torch.optim.SGD")


def test_another_architecture_lists_the_names_only_one_side_has():
    d = diff_plans(plan("freeze=head_only"), plan("freeze=head_only", "model=resnet50"))
    assert ("model.arch", "resnet18", "resnet50") in [(c.what, c.old, c.new) for c in d.model]
    assert "layer1.0.conv3.weight" in d.only_new and d.only_old == ()
    assert "tensors only in the new plan" in render(d)


def test_checkpoint_changes():
    p = plan("freeze=head_only")
    block = dict(p.document["checkpoint"], path="best.ckpt")
    d = diff_plans(p, edited(p, checkpoint=block))
    assert [(c.what, c.old, c.new) for c in d.checkpoint] == [
        ("checkpoint.path", None, "best.ckpt")]
    assert d.headlines() == ["checkpoint: path (none) -> best.ckpt"]


def test_check_prints_the_verdict_and_one_line_per_section():
    d = diff_plans(plan("freeze=head_only"), plan("freeze=last_stage"))
    lines = render(d, check=True).splitlines()
    assert lines[0].startswith("Plans differ: ")
    assert lines[1:] == [f"  {h}" for h in d.headlines()]


def test_json_has_every_section_and_the_verdict():
    d = diff_plans(plan("freeze=head_only"), plan("freeze=last_stage"))
    data = json.loads(json.dumps(d.to_json()))
    assert data["same"] is False
    layer4 = next(r for r in data["stages"] if r["label"] == "4 layer4")
    assert layer4["changed"] and len(layer4["started"]) == 15


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("diff_files")
    found = {}
    for name, preset in (("head", "freeze=head_only"), ("last", "freeze=last_stage")):
        found[name] = folder / f"{name}.json"
        plan(preset).save(found[name])
    (folder / "notes.json").write_text('{"format": "something else"}\n')
    found["notes"] = folder / "notes.json"
    return found


def test_main_exit_codes(files, capsys):
    assert diff.main([str(files["head"]), str(files["head"])]) == 0
    assert "Same plan" in capsys.readouterr().out
    assert diff.main([str(files["head"]), str(files["last"])]) == 1
    assert capsys.readouterr().out.startswith("Plans differ: ")


def test_a_file_that_is_not_a_plan_is_one_error_line(files, capsys):
    assert diff.main([str(files["head"]), str(files["notes"])]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("[ERROR] ")
    assert "notes.json has format 'something else'" in err


@pytest.mark.parametrize("args, expected", [
    (["only_one.json"], "the following arguments are required: NEW.json"),
    (["a.json", "b.json", "--color"], "unrecognized arguments: --color"),
])
def test_usage_mistakes_are_user_errors(args, expected, capsys):
    assert diff.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("[ERROR] diff: ") and expected in err


def test_json_output_is_machine_readable(files, capsys):
    assert diff.main([str(files["head"]), str(files["last"]), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["same"] is False and data["new"] == str(files["last"])


# --------------------------------------------------------------------------- CI story


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                        "PATH": "/usr/bin:/bin"})


def _run(repo: Path, out: Path) -> Path:
    done = run_cli_here("--config-dir", str(repo / "conf"), "freeze=mine", *FAST,
                        f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr
    return out / "param_groups.json"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_two_commits_of_a_user_config(tmp_path):
    """The CI use: a plan committed with the configs, held against the plan made again."""
    repo = tmp_path / "repo"
    (repo / "conf" / "freeze").mkdir(parents=True)
    preset = repo / "conf" / "freeze" / "mine.yaml"
    preset.write_text("# mine\nrules:\n  - freeze: '*'\n  - unfreeze: '@head'\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "head only")
    first = _run(repo, tmp_path / "run1")
    preset.write_text("# mine: a comment changed, nothing else\n"
                      "rules:\n  - freeze: '*'\n  - unfreeze: '@head'\n")
    _git(repo, "commit", "-qam", "comment")
    second = _run(repo, tmp_path / "run2")
    assert first.read_bytes() != second.read_bytes()  # another commit in the provenance
    same = run_cli_here("diff", str(first), str(second), "--check")
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.startswith("Same plan:")
    preset.write_text("# mine\nrules:\n  - freeze: '*'\n  - unfreeze: '@stage[-1]'\n"
                      "  - unfreeze: '@head'\n")
    _git(repo, "commit", "-qam", "last stage too")
    third = _run(repo, tmp_path / "run3")
    changed = run_cli_here("diff", str(first), str(third))
    assert changed.returncode == 1 and changed.stderr == ""
    assert "4 layer4" in changed.stdout and "15 start training" in changed.stdout
    check = run_cli("diff", str(first), str(third), "--check")
    assert check.returncode == 1
    assert check.stdout.splitlines()[1] == ("  training from the start: 15 tensors start "
                                            "training (4 layer4: 15)")
    bad = run_cli_here("diff", str(first), str(tmp_path / "run3" / "trainability.txt"))
    assert bad.returncode == 1 and bad.stdout == "" and bad.stderr.startswith("[ERROR] ")


def test_an_internal_error_exits_2(files, capsys, monkeypatch):
    def broken(old, new):
        raise RuntimeError("boom")

    monkeypatch.setattr(diff, "diff_plans", broken)
    assert diff.main([str(files["head"]), str(files["last"])]) == 2
    assert capsys.readouterr().err.startswith("[ERROR] internal error in diff (RuntimeError")


PAIRS = [("freeze=head_only",), ("freeze=last_stage",), ("freeze=gradual",), ("freeze=full",),
         ("freeze=full", "optim=layer_decay")]


@pytest.mark.parametrize("a", PAIRS, ids=" ".join)
@pytest.mark.parametrize("b", PAIRS, ids=" ".join)
def test_every_pair_of_presets_differs_and_the_diff_reads_both_ways(a, b):
    forward, backward = diff_plans(plan(*a), plan(*b)), diff_plans(plan(*b), plan(*a))
    assert forward.same == backward.same == (a == b)
    for there, back in zip(forward.stages, backward.stages, strict=True):
        assert there.label == back.label  # the names come in each new plan's order
        assert (set(there.started), set(there.stopped)) == (set(back.stopped), set(back.started))
    assert (forward.groups_added, forward.eval_added) == (backward.groups_removed,
                                                          backward.eval_removed)
    assert {(m.old_phase, m.new_phase, frozenset(m.params)) for m in forward.moves} == {
        (m.new_phase, m.old_phase, frozenset(m.params)) for m in backward.moves}


@pytest.mark.slow
def test_help_lists_the_diff_command():
    done = run_cli_here("--help")
    assert done.returncode == 0 and "python -m finetune_prep diff " in done.stdout
