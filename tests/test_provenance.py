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
from conftest import REPO, run_cli

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
    done = run_cli("--config-dir", str(conf), "freeze=my_preset", f"hydra.run.dir={out}",
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
                                   "dirty": False}
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
