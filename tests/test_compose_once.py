"""compose_once: Hydra composes each config once, and what a run writes is what it wrote when
Hydra composed twice (the CLI run in-process with and without it, files and output compared)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra.core.plugins import Plugins

from finetune_prep.app import cli, compose_once
from tests.conftest import run_cli_here

FAST = ("verify.backward=false", "verify.max_params=0")


@pytest.fixture
def composes(monkeypatch) -> list[int]:
    """Counts Hydra's full composes (one entry per compose)."""
    count: list[int] = []
    original = ConfigLoaderImpl._load_configuration_impl

    def counted(self, *args, **kwargs):
        count.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "_load_configuration_impl", counted)
    return count


def _run(folder: Path, args: tuple[str, ...], once: bool, monkeypatch):
    """The CLI in `folder`, with compose_once or with Hydra left as it is."""
    folder.mkdir()
    with monkeypatch.context() as patch:
        if not once:
            patch.setattr(cli, "compose_once", lambda multirun: contextlib.nullcontext())
        return run_cli_here(*args, "hydra.run.dir=out", "hydra.sweep.dir=out", cwd=folder)


def _hydra_files(folder: Path) -> dict[str, str]:
    """Every file Hydra wrote from the composed config (.hydra/*.yaml, multirun.yaml), with the
    folder's own path taken out."""
    return {str(p.relative_to(folder)): p.read_text().replace(str(folder), "FOLDER")
            for p in sorted(folder.rglob("*.yaml"))}


@pytest.mark.parametrize(("args", "once", "twice"), [
    ((), 1, 2),
    (("freeze=last_stage", "optim.lr=0.01", "head.num_outputs=3"), 1, 2),
    (("hydra.mode=RUN",), 1, 2),  # the mode set by the user: no override added by Hydra
    (("-m", "optim.lr=0.1,0.2"), 3, 6),  # the sweep, then each job: checked, then run
    (("+sweep=freeze_presets",), 6, 10),  # hydra.mode MULTIRUN in a file: probed, then 4 jobs
])
def test_each_config_is_composed_once_and_hydra_writes_the_same_files(
        tmp_path, monkeypatch, composes, args, once, twice):
    first = _run(tmp_path / "once", (*args, *FAST), True, monkeypatch)
    composed_once = len(composes)
    composes.clear()
    second = _run(tmp_path / "twice", (*args, *FAST), False, monkeypatch)
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    assert (composed_once, len(composes)) == (once, twice)
    files = _hydra_files(tmp_path / "once")
    assert any(name.endswith("config.yaml") for name in files)
    assert files == {k: v.replace("twice", "once")
                     for k, v in _hydra_files(tmp_path / "twice").items()}


@pytest.mark.parametrize("args", [
    ("freeze=no_such_preset",),
    ("optim.lr=0.1,0.2",),  # a sweep without -m
    ("optim.lr=fast",),
    ("-m", "optim.lr=0.1,fast"),  # the batch check fails before any job runs
])
def test_a_config_error_reads_as_it_did(tmp_path, monkeypatch, args):
    first = _run(tmp_path / "once", args, True, monkeypatch)
    second = _run(tmp_path / "twice", args, False, monkeypatch)
    assert first.returncode == second.returncode != 0
    assert first.stderr.replace("once", "X") == second.stderr.replace("twice", "X")
    assert first.stderr.strip()
    assert not list((tmp_path / "once").rglob("param_groups.json"))


def test_jobs_beyond_the_kept_ones_are_composed_again(tmp_path, monkeypatch, composes):
    monkeypatch.setattr(compose_once, "MAX_KEPT_JOBS", 1)
    done = _run(tmp_path / "once", ("-m", "optim.lr=0.1,0.2", *FAST), True, monkeypatch)
    assert done.returncode == 0, done.stderr
    assert len(composes) == 1 + 2 + 1
    assert len(list((tmp_path / "once").rglob("param_groups.json"))) == 2


def test_hydra_is_put_back_even_when_the_command_fails():
    Plugins.instance()
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    before = [Hydra.get_mode, ConfigLoaderImpl.load_configuration,
              ConfigLoaderImpl.load_sweep_config, BasicSweeper.validate_batch_is_legal]
    with pytest.raises(RuntimeError), compose_once.compose_once(multirun=False):
        assert Hydra.get_mode is not before[0]
        raise RuntimeError
    after = [Hydra.get_mode, ConfigLoaderImpl.load_configuration,
             ConfigLoaderImpl.load_sweep_config, BasicSweeper.validate_batch_is_legal]
    assert after == before
    assert "validate_batch_is_legal" not in BasicSweeper.__dict__  # inherited again


def test_a_config_file_is_parsed_once_and_again_once_edited(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    primary = tmp_path / "config.yaml"
    primary.write_text("a: 1\n")
    parsed: list[str] = []
    load = OmegaConf.load

    def counted(file_):
        parsed.append(str(getattr(file_, "name", file_)))
        return load(file_)

    monkeypatch.setattr(OmegaConf, "load", counted)
    with compose_once.compose_once(multirun=False), \
            initialize_config_dir(str(tmp_path), version_base="1.3"):
        first = [compose("config") for _ in range(3)]
        assert parsed.count(str(primary)) == 2  # the second load keeps a copy for the third
        first[2].a = 5  # a config handed out is the caller's own
        assert compose("config").a == 1
        primary.write_text("a: 22\n")
        assert compose("config").a == 22
        assert parsed.count(str(primary)) == 3
    assert [c.a for c in first] == [1, 1, 5]


def test_a_hydra_without_these_internals_runs_as_it_is(monkeypatch):
    monkeypatch.setattr(compose_once, "_CORE", "hydra._internal.no_such_plugins")
    before = Hydra.get_mode
    with compose_once.compose_once(multirun=False):
        assert Hydra.get_mode is before
