"""Entry point: Hydra composes the config, the runner does the work, the exit code says how it went.

Exit codes: 0 success; 1 a user error, reported as one clear message; 2 an internal error.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from finetune_prep import naming, presets
from finetune_prep.config import CONF_DIR, register_configs
from finetune_prep.errors import FinetunePrepError
from finetune_prep.logs import log_file_failure

log = logging.getLogger("finetune_prep")
_internal_error = False


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> None:
    """One job: plan and write the files; failures are logged into the job's own log."""
    from finetune_prep.runner import run  # torch loads here, so --help and --cfg stay fast

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run(cfg, Path(hc.runtime.output_dir), overrides=list(hc.overrides.task),
            config_dirs=_config_dirs(hc))
    except FinetunePrepError as err:
        log.error("%s", err)
        if multirun or _full_error():
            raise
        sys.exit(1)
    except Exception:
        global _internal_error
        _internal_error = True
        log.exception("internal error (please report it with this log)")
        if multirun or _full_error():
            raise
        sys.exit(2)


def _config_dirs(hc) -> list[str]:
    return [s.path for s in hc.runtime.config_sources
            if s.provider in ("main", "command-line") and s.schema == "file"]


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _user_config_dirs(argv: list[str]) -> list[Path]:
    """The --config-dir/-cd folders on the command line (for --help's preset listing)."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            found.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            found.append(Path(arg.split("=", 1)[1]))
    return found


def version_text() -> str:
    """finetune_prep's version and those of the libraries that shape a plan (no torch import)."""
    from finetune_prep.provenance import versions

    found = versions()
    others = ", ".join(f"{k} {v}" for k, v in found.items() if k != "finetune_prep")
    return f"finetune_prep {found.get('finetune_prep', '?')} ({others})"


def main() -> None:
    """Run the app and exit without the slow interpreter teardown of torch."""
    if "--version" in sys.argv[1:]:
        print(version_text())
        return
    register_configs()
    naming.register_resolvers()
    OmegaConf.register_new_resolver(
        "finetune_prep_presets",
        lambda: presets.listing([CONF_DIR, *_user_config_dirs(sys.argv[1:])]), replace=True,
    )
    code = 0
    try:
        task()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    if code == 1 and _internal_error:
        code = 2
    failed_log = log_file_failure()
    if failed_log and code == 0:  # otherwise the error already said what went wrong
        print(f"[ERROR] {failed_log}", file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if "joblib" in sys.modules:  # a normal exit shuts joblib's loky workers down; skipping it
        sys.exit(code)  # leaves them holding our stdout (a pipe stays open for minutes)
    os._exit(code)


if __name__ == "__main__":
    main()
