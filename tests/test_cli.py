"""The CLI end to end, run as a subprocess the way a user runs it (all slow); a test that runs it
more than once may run the others in-process (conftest.run_cli_here)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
from conftest import REPO, run_cli, run_cli_here


@pytest.mark.slow
def test_default_run_writes_the_plan_files(tmp_path, resnet18_ckpt):
    run_dir = tmp_path / "run"
    done = run_cli("freeze=head_only", f"checkpoint.path={resnet18_ckpt}",
                   f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".finetune_prep.lock", ".hydra", "finetune_prep.log", "param_groups.json",
        "trainability.txt"]
    last = done.stdout.strip().splitlines()[-1]
    assert last.endswith(f"Wrote {run_dir / 'param_groups.json'}")
    doc = json.loads((run_dir / "param_groups.json").read_text())
    assert doc["counts"] == {"total": 11177025, "trainable": 513, "frozen": 11176512}
    assert doc["checkpoint"]["path"] == str(resnet18_ckpt)
    assert doc["verified"]["ok"] is True
    summary = (run_dir / "trainability.txt").read_text()
    for line in summary.splitlines():  # the console shows the same text
        assert not line or line in done.stdout
    assert "Trainable parameters: 513 (<0.01%)" in (run_dir / "finetune_prep.log").read_text()
    assert doc["provenance"]["overrides"] == [
        "freeze=head_only", f"checkpoint.path={resnet18_ckpt}"]


@pytest.mark.slow
def test_same_config_gives_a_byte_identical_groups_section(tmp_path):
    docs = []
    for name, runner in (("a", run_cli), ("b", run_cli_here)):  # a process, and in-process
        done = runner("optim=layer_decay", "freeze=full", "verify.backward=false",
                      f"hydra.run.dir={tmp_path / name}")
        assert done.returncode == 0, done.stderr
        docs.append(json.loads((tmp_path / name / "param_groups.json").read_text()))
    assert json.dumps(docs[0]["groups"]) == json.dumps(docs[1]["groups"])
    assert docs[0]["provenance"]["config_sha256"] == docs[1]["provenance"]["config_sha256"]


@pytest.mark.slow
def test_a_typo_in_a_pattern_is_one_clear_message_and_no_file(tmp_path):
    done = run_cli("freeze.rules=[{freeze: '*'}, {unfreeze: layr4}]", "verify.backward=false",
                   f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "'layr4' matches no parameter. Did you mean: layer4" in output
    assert "Traceback" not in output
    assert not (tmp_path / "param_groups.json").exists()
    assert "Did you mean: layer4" in (tmp_path / "finetune_prep.log").read_text()


@pytest.mark.slow
def test_example_training_loop_leaves_frozen_weights_alone(tmp_path):
    done = run_cli_here("freeze=last_stage", "verify.backward=false", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    example = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), str(tmp_path / "param_groups.json"),
         "--steps", "2"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's finetune_prep
    assert example.returncode == 0, example.stderr
    result = json.loads(example.stdout.strip().splitlines()[-1])
    assert result["frozen_max_change"] == 0.0
    assert result["trainable_max_change"] > 0.0
    assert result["frozen_norm_stats_changed"] == []


@pytest.mark.slow
def test_version_names_finetune_prep_and_torch():
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(f"finetune_prep {finetune_prep_version()} (torch ")


@pytest.mark.slow
def test_help_says_what_each_preset_does():
    done = run_cli("--help")
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert any(line.startswith("head_only") and "Train only the fresh head" in line
               for line in lines), done.stdout
    assert any(line.startswith("sgd") and "SGD with Nesterov momentum" in line for line in lines)


@pytest.mark.slow
def test_console_shows_plain_summary_and_warnings_before_the_last_line(tmp_path):
    done = run_cli("verify.backward=false", f"hydra.run.dir={tmp_path}",
                   "freeze.rules=[{freeze: layer4}, {freeze: '*'}, {unfreeze: '@head'}]")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Model: resnet18 (torchvision)")  # no timestamp prefix
    warnings = [i for i, line in enumerate(lines) if line.startswith("[WARNING] ")]
    assert warnings and "freeze.rules[0] {freeze: layer4} has no effect" in lines[warnings[0]]
    assert max(warnings) < len(lines) - 1 and lines[-1].startswith("Wrote ")
    log = (tmp_path / "finetune_prep.log").read_text()
    assert "][finetune_prep][WARNING] - freeze.rules[0]" in log  # the file keeps timestamps


def finetune_prep_version() -> str:
    return version("finetune_prep")


# --------------------------------------------------------------------------- .hydra and the plan

FAST = "verify.backward=false"
DYING = ("model.source=target", "+model.target._target_=dying_net.DyingNet", FAST)
TESTS_ON_PATH = {"PYTHONPATH": str(REPO / "tests")}  # run_cli puts the checkout first


def _snapshot(folder) -> dict:
    """Every file under `folder` by content; the lock and log (each run touches them) and a
    killed run's pending folder (checked apart) aside."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".finetune_prep.lock", "finetune_prep.log")
            and not p.relative_to(folder).parts[0].startswith("..hydra.")}


def _pending(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("..hydra."))


@pytest.mark.slow
def test_a_failed_rerun_leaves_hydra_describing_the_plan_beside_it(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(FAST, "freeze=head_only", f"hydra.run.dir={run_dir}").returncode == 0
    before = _snapshot(run_dir)
    done = run_cli_here(FAST, "freeze=full", f"checkpoint.path={tmp_path / 'missing.pt'}",
                        f"hydra.run.dir={run_dir}")
    assert done.returncode == 1 and "missing.pt does not exist" in done.stdout + done.stderr
    assert _snapshot(run_dir) == before  # .hydra/config.yaml still says head_only
    assert "freeze=head_only" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert _pending(run_dir) == []  # the failed run removed its pending .hydra


@pytest.mark.slow
def test_a_killed_rerun_leaves_the_earlier_pair_and_the_next_run_tidies_up(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli_here(*DYING, "freeze=head_only", f"hydra.run.dir={run_dir}",
                         env=TESTS_ON_PATH)
    assert first.returncode == 0, first.stdout + first.stderr
    before = _snapshot(run_dir)
    killed = run_cli(*DYING, "freeze=full", "+model.target.die=true", f"hydra.run.dir={run_dir}",
                     env=TESTS_ON_PATH)
    assert killed.returncode == -9  # SIGKILL while building the model
    assert _snapshot(run_dir) == before
    assert len(_pending(run_dir)) == 1  # Hydra's config copies of the killed run, aside
    third = run_cli_here(*DYING, "freeze=full", f"hydra.run.dir={run_dir}", env=TESTS_ON_PATH)
    assert third.returncode == 0, third.stdout + third.stderr
    assert _pending(run_dir) == []
    assert "freeze=full" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert json.loads((run_dir / "param_groups.json").read_text())["counts"]["frozen"] == 0


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _plan_only(doc: dict) -> dict:
    """A plan without its provenance (which says where it came from, so differs on a rerun)."""
    return {k: v for k, v in doc.items() if k != "provenance"}


@pytest.mark.slow
def test_a_run_repeated_from_its_hydra_folder_gives_the_same_plan_with_packaged_settings(
        tmp_path):
    """`--config-dir outputs/X/.hydra --config-name config` in a project that ignores outputs/:
    the run's own values (not the packaged defaults), the packaged log name, lock, plain console
    and run folder pattern, and a summary that says the folder is not under version control."""
    project = tmp_path / "project"
    project.mkdir()
    (project / ".gitignore").write_text("outputs/\n")
    _git(project, "init", "-q")
    _git(project, "add", ".")
    _git(project, "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q",
         "-m", "ignore outputs")
    first = run_cli(FAST, "freeze=last_stage", "optim=sgd", "head.num_outputs=7", cwd=project)
    assert first.returncode == 0, first.stderr
    (run_dir,) = [p.parent for p in (project / "outputs").glob("*/*/param_groups.json")]
    again = run_cli("--config-dir", str(run_dir.relative_to(project) / ".hydra"),
                    "--config-name", "config", cwd=project)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = sorted(p.parent for p in (project / "outputs").glob("*/*/param_groups.json"))
    assert len(runs) == 2 and runs[0] == run_dir  # the packaged pattern: outputs/DATE/TIME
    rerun = runs[1]
    assert sorted(p.name for p in rerun.iterdir()) == [
        ".finetune_prep.lock", ".hydra", "finetune_prep.log", "param_groups.json",
        "trainability.txt"]  # the packaged job name and lock
    old, new = (json.loads((d / "param_groups.json").read_text()) for d in (run_dir, rerun))
    assert _plan_only(new) == _plan_only(old)  # the same plan: not the packaged defaults
    assert new["model"]["num_outputs"] == 7 and new["optimizer"]["_target_"] == "torch.optim.SGD"
    assert new["provenance"]["config_sha256"] == old["provenance"]["config_sha256"]
    assert new["provenance"]["overrides"] == []
    assert new["provenance"]["rerun"] == str((run_dir / ".hydra" / "config.yaml").resolve())
    hydra_entry = new["provenance"]["git"][1]
    assert hydra_entry["config_dir"] == str((run_dir / ".hydra").resolve())
    assert "commit" not in hydra_entry and hydra_entry["git"].startswith("ignored by git")
    summary = (rerun / "trainability.txt").read_text()
    assert f"{(run_dir / '.hydra').resolve()}: ignored by git" in summary
    assert "not under version control" in summary
    lines = again.stdout.splitlines()
    assert "Config folders (searched first to last):" in lines  # plain console lines,
    assert not any(line.startswith("[20") for line in lines)  # no Hydra timestamps
    assert "[INFO]" not in again.stdout and f"Wrote {rerun / 'param_groups.json'}" in lines[-1]


@pytest.mark.slow
def test_a_user_preset_named_like_a_packaged_one_is_one_error(tmp_path):
    (tmp_path / "conf" / "freeze").mkdir(parents=True)
    (tmp_path / "conf" / "freeze" / "head_only.yaml").write_text(
        "defaults:\n  - /finetune_prep/schema/freeze@_here_\n  - _self_\nrules: []\n")
    done = run_cli("--config-dir", str(tmp_path / "conf"), f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert done.stderr.startswith("[ERROR] ") and len(done.stderr.strip().splitlines()) == 1
    assert "freeze/head_only.yaml has the name of the packaged preset freeze=head_only" in \
        done.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- pipes and Ctrl-C

@pytest.mark.slow
@pytest.mark.parametrize("reader", ["head -3", "true"])  # true: the pipe is closed at once
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, reader):
    run_dir = tmp_path / "run"
    err = tmp_path / "stderr"
    script = (f"{sys.executable} -m finetune_prep {FAST} hydra.run.dir={run_dir} 2>{err}"
              f" | {reader}; exit ${{PIPESTATUS[0]}}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert err.read_text() == "" and done.stderr == ""
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == (3 if reader == "head -3" else 0)
    assert (run_dir / "param_groups.json").exists()  # the plan is written all the same


@pytest.mark.slow
def test_help_into_a_closed_pipe_ends_quietly(tmp_path):
    script = f"{sys.executable} -m finetune_prep --help | true; exit ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_no_new_file(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(FAST, f"hydra.run.dir={run_dir}").returncode == 0
    before = _snapshot(run_dir)
    done = run_cli(*DYING, "+model.target.die=true", "+model.target.sig=SIGINT",
                   f"hydra.run.dir={run_dir}", env=TESTS_ON_PATH)
    output = done.stdout + done.stderr
    assert done.returncode == 130, output
    assert "Traceback" not in output and output.count("[ERROR]") == 1
    assert f"[ERROR] interrupted: {run_dir} keeps its earlier files" in done.stdout
    assert _snapshot(run_dir) == before and _pending(run_dir) == []
    assert "interrupted" in (run_dir / "finetune_prep.log").read_text()


# --------------------------------------------------------------------------- the command line

FLAG_CASES = {
    "misspelt": (["freeze=head_only", "--cfgg"], "unknown option --cfgg. Did you mean: --cfg?"),
    "unknown": (["--flag"], "unknown option --flag."),
    "no_value": (["--config-name"], "option --config-name needs a value"),
    "no_value_short": (["freeze=full", "-cd"], "option --config-dir needs a value"),
    "bad_choice": (["freeze=head_only", "-m", "--cfg", "jobb"],
                   "argument --cfg/-c: invalid choice: 'jobb'"),
    "ambiguous": (["--conf", "x"], "ambiguous option: --conf could match"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_a_wrong_flag_is_a_message_naming_it(case):
    from finetune_prep.app.cli import checked_argv
    from finetune_prep.errors import FinetunePrepError

    argv, text = FLAG_CASES[case]
    with pytest.raises(FinetunePrepError) as err:
        checked_argv(argv)
    assert text in str(err.value) and "--help" in str(err.value)
    assert "\n" not in str(err.value)


def test_flags_may_follow_the_overrides():
    from finetune_prep.app.cli import checked_argv

    assert checked_argv(["freeze=full", "--cfg", "job", "model=vit_b_16", "-m"]) == [
        "--cfg=job", "--multirun", "freeze=full", "model=vit_b_16"]
    assert checked_argv(["--info", "defaults", "-cd", "my conf", "x=1"]) == [
        "--config-dir=my conf", "--info=defaults", "x=1"]  # in the parser's order
    assert checked_argv(["--info"]) == ["--info=all"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["misspelt", "no_value", "bad_choice"])
def test_a_wrong_flag_on_the_cli_is_one_error_line_exit_1(case, tmp_path):
    argv, text = FLAG_CASES[case]
    done = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *argv)
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith("[ERROR] ") and text in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_overrides_after_a_flag_run(tmp_path):
    done = run_cli("freeze=full", "--cfg", "job", "head.num_outputs=7")
    assert done.returncode == 0, done.stderr
    assert "num_outputs: 7" in done.stdout and "- unfreeze: '*'" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("override,text", [
    ("freeze=", "Could not find 'freeze/'"),
    ("model.arch==x", "Error parsing override 'model.arch==x'"),
    ("+foo", "Error parsing override '+foo'"),
    ("freeze=nope", "Could not find 'freeze/nope'"),
])
def test_a_bad_override_is_hydras_message_exit_1(override, text, tmp_path):
    done = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert text in done.stderr
    assert "Traceback" not in done.stderr and "usage:" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_config_dir_holding_a_runs_config_becomes_a_rerun_on_the_packaged_config(
        tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    import finetune_prep
    from finetune_prep.app import cli

    monkeypatch.setattr(cli, "_rerun", None)
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(finetune_prep.compose([])))
    argv = cli.with_user_configs(cli.checked_argv(
        ["-cd", str(hydra_dir), "head.num_outputs=3", "--config-name", "config"]))
    assert argv == [f"--config-dir={hydra_dir}", "head.num_outputs=3", "~model", "~freeze",
                    "~optim", "~adapter",
                    "+finetune_prep/rerun@_global_=config"]  # no --config-name
    assert cli._rerun == str((hydra_dir / "config.yaml").resolve())
    plain = ["--config-dir=" + str(tmp_path / "elsewhere"), "head.num_outputs=3"]
    assert cli.with_user_configs(plain) == plain  # no run config there: Hydra's own way
    (tmp_path / "mine" / "optim").mkdir(parents=True)
    (tmp_path / "mine" / "optim" / "adamw.yaml").write_text("lr: 0.1\n")
    with pytest.raises(cli.FinetunePrepError, match="packaged preset optim=adamw"):
        cli.with_user_configs([f"hydra.searchpath=[file://{tmp_path / 'mine'}]"])


@pytest.mark.slow
def test_presets_with_a_rules_file_plan_from_it_in_a_sweep(tmp_path):
    """A --config-dir preset holding only `rules_file:` (a path relative to the folder the CLI
    runs in) plans as the same rules inline; a sweep over two such presets; the plan records
    the file's path and sha256."""
    import torchvision

    import finetune_prep

    names = [n for n, _ in torchvision.models.resnet18(num_classes=1).named_parameters()]
    inline = {"a": [{"freeze": "*"}, *({"unfreeze": n} for n in names[::3]), {"freeze": "fc"}],
              "b": [{"freeze": "*"}, *({"unfreeze": f"re:{n}"} for n in names[-300:])]}
    (tmp_path / "conf" / "freeze").mkdir(parents=True)
    (tmp_path / "rules").mkdir()
    for name, rules in inline.items():
        (tmp_path / "rules" / f"{name}.yaml").write_text(
            "".join(f"- {k}: '{v}'\n" for r in rules for k, v in r.items()))
        (tmp_path / "conf" / "freeze" / f"file_{name}.yaml").write_text(
            f"# rules from a file\nrules_file: rules/{name}.yaml  # from the folder run in\n")
    done = run_cli("-m", "--config-dir", "conf", "freeze=file_a,file_b", "verify.backward=false",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for num, name in enumerate(inline):
        doc = json.loads(next((tmp_path / "sweep").glob(f"{num}_*/param_groups.json"))
                         .read_text())
        expected = finetune_prep.prepare({"freeze": {"rules": inline[name]}},
                                         materialize=False, verify=False)
        assert doc["groups"] == expected.param_groups and doc["frozen"] == \
            expected.document["frozen"]
        text = (tmp_path / "rules" / f"{name}.yaml").read_bytes()
        assert doc["provenance"]["rules_file"] == {
            "path": str(tmp_path / "rules" / f"{name}.yaml"),
            "sha256": hashlib.sha256(text).hexdigest(), "rules": len(inline[name])}
    assert len(list((tmp_path / "sweep").glob("*/param_groups.json"))) == 2
    assert (tmp_path / "sweep" / "sweep_summary.csv").exists()
    # beside the packaged preset's rules: one error, exit 1, nothing written
    done = run_cli_here("freeze.rules_file=rules/a.yaml", f"hydra.run.dir={tmp_path / 'both'}",
                        cwd=tmp_path)
    assert done.returncode == 1
    assert "freeze.rules_file=rules/a.yaml and freeze.rules (2 rules, set by the freeze " \
           "preset head_only) are both set" in done.stdout + done.stderr
    assert not (tmp_path / "both" / "param_groups.json").exists()
