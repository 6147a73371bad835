"""Provenance of a plan made with a user --config-dir, and the installed wheel."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, run_cli_here
from omegaconf import OmegaConf

from finetune_prep.app import provenance

PRESET = """defaults:
  - /finetune_prep/schema/freeze@_here_
  - _self_
rules:
  - freeze: "*"
  - unfreeze: layer4
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _plan(conf: Path, out: Path, *overrides: str, cwd: Path | None = None) -> dict:
    done = run_cli_here("--config-dir", str(conf), "freeze=my_preset", f"hydra.run.dir={out}",
                        "verify.backward=false", *overrides, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "param_groups.json").read_text())["provenance"]


def _entry(prov: dict, folder: Path) -> dict:
    found = [g for g in prov["git"] if Path(g["config_dir"]).resolve() == folder.resolve()]
    assert len(found) == 1, prov["git"]
    return found[0]


@pytest.mark.slow
def test_user_config_dir_git_state_and_hash(tmp_path):
    repo = tmp_path / "project"
    conf = repo / "my_conf"
    (conf / "freeze").mkdir(parents=True)
    (conf / "freeze" / "my_preset.yaml").write_text(PRESET)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "configs")
    commit = _git(repo, "rev-parse", "HEAD")

    # relative --config-dir from the user's project, a user preset beside the packaged ones
    clean = _plan(Path("./my_conf"), tmp_path / "run1", cwd=repo)
    assert _entry(clean, conf) == {"config_dir": str(conf.resolve()), "commit": commit,
                                   "branch": _git(repo, "rev-parse", "--abbrev-ref", "HEAD"),
                                   "dirty": False, "modified": 0, "untracked": 0, "ignored": 0}
    assert "freeze=my_preset" in clean["overrides"]

    (conf / "notes.txt").write_text("not a config, but the folder is now dirty\n")
    dirty = _plan(conf, tmp_path / "run2")
    assert _entry(dirty, conf)["dirty"] is True and _entry(dirty, conf)["commit"] == commit
    assert dirty["config_sha256"] == clean["config_sha256"]  # same composed config

    outside = tmp_path / "loose_conf"
    shutil.copytree(conf, outside)
    other = _plan(outside, tmp_path / "run3", "head.num_outputs=3")
    assert "not in a git work tree" in _entry(other, outside)["git"]
    assert other["config_sha256"] != clean["config_sha256"]


def _repo(root: Path) -> Path:
    """A git repository with a committed config folder and an ignored outputs/ folder."""
    conf = root / "conf"
    (conf / "freeze").mkdir(parents=True)
    (conf / "freeze" / "mine.yaml").write_text(PRESET)
    (root / ".gitignore").write_text("outputs/\n*.local.yaml\n")
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "t@example.com")
    _git(root, "config", "user.name", "t")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "configs")
    return conf


def test_git_state_of_a_config_folder_clean_dirty_untracked_ignored(tmp_path):
    conf = _repo(tmp_path)
    commit = _git(tmp_path, "rev-parse", "HEAD")
    clean = provenance.git_state(conf)
    assert (clean["commit"], clean["dirty"]) == (commit, False)
    assert provenance.describe_git(clean).endswith(", clean")

    (conf / "freeze" / "mine.yaml").write_text(PRESET + "bn_stats: train\n")  # modified
    (conf / "freeze" / "new.yaml").write_text(PRESET)  # untracked
    (conf / "freeze" / "x.local.yaml").write_text(PRESET)  # ignored, yet Hydra would read it
    dirty = provenance.git_state(conf)
    assert (dirty["commit"], dirty["dirty"]) == (commit, True)
    assert (dirty["modified"], dirty["untracked"], dirty["ignored"]) == (1, 1, 1)
    assert "dirty (1 modified, 1 untracked, 1 ignored)" in provenance.describe_git(dirty)

    run = tmp_path / "outputs" / "2026-01-01" / "10-00-00" / ".hydra"  # an earlier run's
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("head:\n  num_outputs: 3\n")
    ignored = provenance.git_state(run)
    assert "commit" not in ignored  # not "clean at the current commit"
    assert ignored["git"].startswith("ignored by git") and "not under version control" in \
        ignored["git"]

    loose = tmp_path / "drafts"  # in the work tree, nothing of it added
    loose.mkdir()
    (loose / "config.yaml").write_text("a: 1\n")
    assert "no file of it is tracked" in provenance.git_state(loose)["git"]


def test_git_states_soon_are_the_git_states_in_order(tmp_path):
    conf = _repo(tmp_path)
    folders = [conf, tmp_path / "missing", tmp_path / "outputs"]
    (tmp_path / "outputs").mkdir()
    soon = provenance.git_states_soon(folders)
    states = soon()
    assert [s["config_dir"] for s in states] == [str(f) for f in folders]
    assert states[1:] == [provenance.git_state(f) for f in folders[1:]]
    assert (states[0]["commit"], states[0]["dirty"]) == (_git(tmp_path, "rev-parse", "HEAD"),
                                                         False)


def test_git_state_before_the_first_commit(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.yaml").write_text("a: 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    assert "no commit yet" in provenance.git_state(tmp_path / "conf")["git"]


def test_summary_lists_each_config_folder_with_its_state(tmp_path):
    from finetune_prep.config import CONF_DIR

    conf = _repo(tmp_path)
    run = tmp_path / "outputs" / "r" / ".hydra"
    run.mkdir(parents=True)
    states = [provenance.git_state(d) for d in (CONF_DIR, conf, run)]
    prov = provenance.record("a: 1\n", ["freeze=mine"], states, rerun=str(run / "config.yaml"))
    lines = provenance.summary_lines(prov, CONF_DIR)
    assert lines[0] == "Config folders (searched first to last):"
    assert lines[1].startswith(f"  {CONF_DIR} (packaged): ")
    assert lines[2] == f"  {conf}: commit {_git(tmp_path, 'rev-parse', 'HEAD')[:12]} on " \
        f"{_git(tmp_path, 'rev-parse', '--abbrev-ref', 'HEAD')}, clean"
    assert lines[3].startswith(f"  {run}: ignored by git")
    assert lines[4] == f"Rerun of: {run / 'config.yaml'} (with the packaged settings)"
    assert lines[5] == "Overrides: freeze=mine"
    assert provenance.summary_lines(None, CONF_DIR) == []


def test_prepare_records_what_compose_was_given(tmp_path):
    import finetune_prep
    from finetune_prep.config import CONF_DIR

    conf = _repo(tmp_path)
    cfg = finetune_prep.compose(["freeze=mine", "head.num_outputs=3"], config_dir=conf)
    prepared = finetune_prep.prepare(cfg, materialize=False, verify=False)
    prov = prepared.document["provenance"]
    assert prov["overrides"] == ["freeze=mine", "head.num_outputs=3"]
    assert [g["config_dir"] for g in prov["git"]] == [str(CONF_DIR), str(conf.resolve())]
    assert prov["git"][1]["commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert f"  {conf.resolve()}: commit " in prepared.summary
    bare = finetune_prep.prepare(OmegaConf.create({"head": {"num_outputs": 3}}),
                                 materialize=False, verify=False)
    assert bare.document["provenance"]["overrides"] == [] == bare.document["provenance"]["git"]


@pytest.mark.slow
@pytest.mark.parametrize("given", ["config_dir", "searchpath"])
def test_cli_and_compose_prepare_save_record_the_same_provenance(tmp_path, given):
    import finetune_prep

    conf = _repo(tmp_path / "project")
    overrides = ["freeze=mine", "head.num_outputs=3", "verify.backward=false"]
    if given == "config_dir":
        cli_args, api_args = ["--config-dir", str(conf)], {"config_dir": conf}
    else:
        cli_args, api_args = [f"hydra.searchpath=[file://{conf}]"], {}
    done = run_cli_here(*cli_args, *overrides, f"hydra.run.dir={tmp_path / 'cli'}")
    assert done.returncode == 0, done.stderr
    api_overrides = overrides + ([] if api_args else cli_args)
    prepared = finetune_prep.prepare(finetune_prep.compose(api_overrides, **api_args),
                                     materialize=False)
    prepared.save(tmp_path / "api")
    cli, api = (json.loads((tmp_path / d / "param_groups.json").read_text())
                for d in ("cli", "api"))
    assert api["provenance"] == cli["provenance"]  # hash, overrides, versions, git: no time
    assert cli["provenance"]["overrides"] == overrides
    assert [g["config_dir"] for g in cli["provenance"]["git"]][1:] == [str(conf.resolve())]
    assert cli["provenance"]["git"][1]["commit"] == _git(conf, "rev-parse", "HEAD")
    assert (tmp_path / "api" / "trainability.txt").read_text() == \
        (tmp_path / "cli" / "trainability.txt").read_text()


def test_git_state_never_raises_and_the_hash_follows_the_config(tmp_path):
    assert "folder not found" in provenance.git_state(tmp_path / "missing")["git"]
    assert "not in a git work tree" in provenance.git_state(tmp_path)["git"]
    assert provenance.config_sha256("a: 1\n") != provenance.config_sha256("a: 2\n")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    offline = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline,
                    "-q", "-w", str(out), str(REPO)], check=True, capture_output=True,
                   timeout=120)
    return next(out.glob("finetune_prep-*.whl"))


@pytest.mark.slow
def test_wheel_ships_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {"finetune_prep/" + p.relative_to(REPO).as_posix()
               for p in (REPO / "conf").rglob("*.yaml")}  # conf/ at the top -> in the package
    assert "finetune_prep/conf/config.yaml" in shipped
    assert "finetune_prep/conf/sweep/freeze_presets.yaml" in shipped
    assert shipped <= names
    assert "finetune_prep/paramfile/param_groups.schema.json" in names  # the format's schema


def _site_dirs() -> list[str]:
    """The folders this interpreter imports installed packages from (a venv's or the system's)."""
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"],
            sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _venv_seeing_these_packages(venv: Path) -> Path:
    """A new venv that imports this interpreter's packages (torch, hydra, ...) through a .pth
    file: `--system-site-packages` would give the base interpreter's, not this venv's.
    The paths are plain lines, so the current environment's own .pth files (an editable
    finetune_prep among them) are not run: the wheel is the only finetune_prep the venv sees."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "outer_site_packages.pth").write_text("\n".join(_site_dirs()) + "\n")
    return python


@pytest.mark.slow
def test_installed_wheel_runs_from_another_folder(wheel, tmp_path):
    python = _venv_seeing_these_packages(tmp_path / "venv")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(python), "-c", "import finetune_prep, sys; print(finetune_prep.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert str(tmp_path / "venv") in done.stdout  # the wheel, not the checkout
    done = subprocess.run([str(python), "-m", "finetune_prep", "hydra.run.dir=out",
                           "verify.backward=false"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads((elsewhere / "out" / "param_groups.json").read_text())
    assert doc["counts"]["trainable"] == 513
    assert "site-packages" in doc["provenance"]["git"][0]["config_dir"]
    compose = ("import finetune_prep, hydra; "
               "cfg = finetune_prep.compose(['freeze=last_stage', 'model=vit_b_16']); "
               "print(cfg.model.arch, len(cfg.freeze.rules)); "
               "ctx = hydra.initialize_config_dir(str(finetune_prep.CONF_DIR), "
               "version_base='1.3'); "
               "ctx.__enter__(); print(hydra.compose('config', ['optim=sgd']).optim.lr)")
    done = subprocess.run([str(python), "-c", compose + "; print(finetune_prep.CONF_DIR)"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[:3] == ["vit_b_16", "3", "0.01"], done.stderr
    assert done.stdout.split()[3].endswith("site-packages/finetune_prep/conf")  # the wheel's
