"""Hydra composes each config once per command, not twice.

`hydra.main` composes the whole config to learn the run mode, then composes it again to run;
the basic sweeper composes every job's config to check the batch, then the basic launcher
composes each again to run it. Each compose is about 80 ms, most of a run's own cost. Inside
`compose_once`, the first compose is kept and handed to the call that would repeat it, so
the config a job sees is the one Hydra composed, not a copy or a rebuild. A sweep still
composes once per job: there a config file read twice (same path, size, mtime and inode) is
parsed once and copied after. Only the hydra-core 1.3 internals named here are touched, and
only while the command runs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
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
MAX_KEPT_JOBS = 1000  # a kept job config is about 0.4 MB; later jobs of a batch compose twice

_runs: dict[tuple, DictConfig] = {}  # (config name, overrides, run mode) -> composed config
_jobs: dict[tuple, DictConfig] = {}  # (id of the sweep's config, job overrides) -> config
_seen: set[tuple] = set()  # config files loaded once (source, file, stamp)
_loaded: dict[tuple, Any] = {}  # config files loaded twice: a pristine ConfigResult to copy


@contextmanager
def compose_once(multirun: bool) -> Iterator[None]:
    """Within: Hydra's run-mode probe composes in the mode the command asked for (`multirun`:
    -m was given) and keeps that config for the run; the basic sweeper keeps the job configs
    it checks for the basic launcher. Everything is put back on exit. A Hydra without these
    internals runs as it is (composing twice)."""
    try:
        patches = _patches(multirun)
    except (ImportError, AttributeError):
        yield
        return
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    for owner, name, patched in patches:
        setattr(owner, name, patched)
    try:
        yield
    finally:
        for kept in (_runs, _jobs, _seen, _loaded):
            kept.clear()
        for owner, name, before in saved:
            if before is None:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


def _patches(multirun: bool) -> list[tuple[type, str, Any]]:
    """(class, attribute, replacement) for each Hydra internal compose_once replaces."""
    Plugins.instance()  # its first scan runs the plugin modules again: their classes are new
    sweeper = import_module(f"{_CORE}.basic_sweeper").BasicSweeper
    launcher = import_module(f"{_CORE}.basic_launcher").BasicLauncher
    files = import_module(f"{_CORE}.file_config_source").FileConfigSource
    packaged = import_module(f"{_CORE}.importlib_resources_config_source")
    packaged = packaged.ImportlibResourcesConfigSource
    used = ((ConfigLoaderImpl, "_apply_overrides_to_config"), (files, "_normalize_file_name"))
    missing = [name for owner, name in used if not hasattr(owner, name)]
    if missing:  # the replacements call them
        raise AttributeError(", ".join(missing))
    return [
        (Hydra, "get_mode", _get_mode(Hydra.get_mode, multirun)),
        (ConfigLoaderImpl, "load_configuration", _take_run(ConfigLoaderImpl.load_configuration)),
        (ConfigLoaderImpl, "load_sweep_config", _take_job(ConfigLoaderImpl.load_sweep_config)),
        (sweeper, "validate_batch_is_legal",
         _keep_jobs(sweeper.validate_batch_is_legal, launcher)),
        (files, "load_config", _parse_once(files.load_config, _file_stamp)),
        (packaged, "load_config", _parse_once(packaged.load_config, lambda *_: ())),
    ]


def _get_mode(original: Any, multirun: bool) -> Any:
    """Hydra.get_mode that composes as the run will (its mode, sweep overrides checked) and
    keeps the config when the run will take it. On any error it is Hydra's own probe."""
    run_mode = RunMode.MULTIRUN if multirun else RunMode.RUN

    def get_mode(self: Hydra, config_name: str | None, overrides: list[str]) -> Any:
        try:
            cfg = self.config_loader.load_configuration(
                config_name=config_name, overrides=overrides, run_mode=run_mode)
            mode = cfg.hydra.mode  # an interpolation there may fail too
        except Exception:
            return original(self, config_name, overrides)
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


def _keep_jobs(original: Any, basic_launcher: type) -> Any:
    """The basic sweeper's batch check, keeping the first MAX_KEPT_JOBS configs when the basic
    launcher (this process) runs the jobs; other launchers compose in their own processes."""

    def validate_batch_is_legal(self: Any, batch: Sequence[Sequence[str]]) -> None:
        if not isinstance(self.launcher, basic_launcher):
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


def _parse_once(original: Any, stamp: Callable[[Any, str], tuple | None]) -> Any:
    """A config source's load_config that parses a file once: the second load keeps a copy
    of what it parsed, later loads get a copy of that. `stamp` tells a file's versions apart
    (None: do not keep it); an installed package's files do not change while a command runs."""

    def load_config(self: Any, config_path: str) -> Any:
        version = stamp(self, config_path)
        if version is None:
            return original(self, config_path)
        key = (type(self).__name__, self.provider, self.path, config_path, version)
        if key in _loaded:
            return copy.deepcopy(_loaded[key])
        result = original(self, config_path)
        if key in _seen:
            _loaded[key] = copy.deepcopy(result)  # the caller may change `result`
        _seen.add(key)
        return result

    return load_config


def _file_stamp(source: Any, config_path: str) -> tuple | None:
    """The file FileConfigSource reads for `config_path`, as (path, mtime, size, inode)."""
    path = os.path.realpath(os.path.join(source.path, source._normalize_file_name(config_path)))
    try:
        found = os.stat(path)
    except OSError:
        return None  # Hydra's own load gives the error
    return path, found.st_mtime_ns, found.st_size, found.st_ino
