"""Hydra composes each config once per command, not twice.

`hydra.main` composes the whole config to learn the run mode, then composes it again to run;
the basic sweeper composes every job's config to check the batch, then the basic launcher
composes each again to run it. Each compose is about 80 ms, most of a run's own cost. Inside
`compose_once`, the first compose is kept and handed to the call that would repeat it, so
the config a job sees is the one Hydra composed, not a copy or a rebuild. Only the
hydra-core 1.3 internals named here are touched, and only while the command runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import import_module
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.hydra import Hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

_CORE = "hydra._internal.core_plugins"
MAX_KEPT_JOBS = 256  # a kept job config is about 0.4 MB; later jobs of a batch compose twice

_runs: dict[tuple, DictConfig] = {}  # (config name, overrides, run mode) -> composed config
_jobs: dict[tuple, DictConfig] = {}  # (id of the sweep's config, job overrides) -> config


@contextmanager
def compose_once(multirun: bool) -> Iterator[None]:
    """Within: Hydra's run-mode probe composes in the mode the command asked for (`multirun`:
    -m was given) and keeps that config for the run; the basic sweeper keeps the job configs
    it checks for the basic launcher. Everything is put back on exit."""
    Plugins.instance()  # its first scan runs the plugin modules again: their classes are new
    sweeper = import_module(f"{_CORE}.basic_sweeper").BasicSweeper
    patches = [
        (Hydra, "get_mode", _get_mode(Hydra.get_mode, multirun)),
        (ConfigLoaderImpl, "load_configuration", _take_run(ConfigLoaderImpl.load_configuration)),
        (ConfigLoaderImpl, "load_sweep_config", _take_job(ConfigLoaderImpl.load_sweep_config)),
        (sweeper, "validate_batch_is_legal", _keep_jobs(sweeper.validate_batch_is_legal)),
    ]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    for owner, name, patched in patches:
        setattr(owner, name, patched)
    try:
        yield
    finally:
        _runs.clear()
        _jobs.clear()
        for owner, name, before in saved:
            if before is None:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


def _get_mode(original: Any, multirun: bool) -> Any:
    """Hydra.get_mode that composes as the run will (its mode, sweep overrides checked) and
    keeps the config when the run will take it. On any error it is Hydra's own probe."""
    run_mode = RunMode.MULTIRUN if multirun else RunMode.RUN

    def get_mode(self: Hydra, config_name: str | None, overrides: list[str]) -> Any:
        try:
            cfg = self.config_loader.load_configuration(
                config_name=config_name, overrides=overrides, run_mode=run_mode)
        except Exception:
            return original(self, config_name, overrides)
        mode = cfg.hydra.mode
        if mode is None:  # Hydra's _run_app then adds this override and composes again
            line = f"hydra.mode={run_mode.name}"
            _apply_hydra_override(cfg, line)
            _runs[(config_name, (*overrides, line), run_mode)] = cfg
        elif mode == run_mode:
            _runs[(config_name, tuple(overrides), run_mode)] = cfg
        return mode

    return get_mode


def _apply_hydra_override(cfg: DictConfig, line: str) -> None:
    """What Hydra's compose does with a `hydra.*` override given last on the command line."""
    ConfigLoaderImpl._apply_overrides_to_config(OverridesParser.create().parse_overrides([line]),
                                                cfg)
    cfg.hydra.overrides.hydra.append(line)


def _take_run(original: Any) -> Any:
    def load_configuration(self: ConfigLoaderImpl, config_name: str | None,
                           overrides: list[str], run_mode: RunMode, from_shell: bool = True,
                           validate_sweep_overrides: bool = True) -> DictConfig:
        if from_shell and validate_sweep_overrides:
            kept = _runs.pop((config_name, tuple(overrides), run_mode), None)
            if kept is not None:
                return kept
        return original(self, config_name, overrides, run_mode, from_shell,
                        validate_sweep_overrides)

    return load_configuration


def _keep_jobs(original: Any) -> Any:
    """The basic sweeper's batch check, keeping the first MAX_KEPT_JOBS configs when the basic
    launcher (this process) runs the jobs; other launchers compose in their own processes."""

    def validate_batch_is_legal(self: Any, batch: Sequence[Sequence[str]]) -> None:
        if not isinstance(self.launcher, import_module(f"{_CORE}.basic_launcher").BasicLauncher):
            return original(self, batch)
        loader = self.hydra_context.config_loader
        for index, overrides in enumerate(batch):
            cfg = loader.load_sweep_config(master_config=self.config,
                                           sweep_overrides=list(overrides))
            if index < MAX_KEPT_JOBS:
                _jobs[(id(self.config), tuple(overrides))] = cfg
        return None

    return validate_batch_is_legal


def _take_job(original: Any) -> Any:
    def load_sweep_config(self: ConfigLoaderImpl, master_config: DictConfig,
                          sweep_overrides: list[str]) -> DictConfig:
        kept = _jobs.pop((id(master_config), tuple(sweep_overrides)), None)
        if kept is None:
            return original(self, master_config, sweep_overrides)
        OmegaConf.copy_cache(from_config=master_config, to_config=kept)  # as at launch time
        return kept

    return load_sweep_config
