"""Entry point: Hydra composes the config, the runner does the work, the exit code says how it went.

Exit codes: 0 success; 1 a user error, reported as one clear message; 2 an internal error;
130 interrupted (Ctrl-C). `diff OLD.json NEW.json` (app.diff) runs before Hydra parses argv:
0 same plans, 1 they differ or a file is not a plan, 2 an internal error. Hydra's flags may
come before or after the overrides; a wrong flag is one `[ERROR]` line, not argparse's usage
text and exit 2.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from finetune_prep.app import naming, presets, rundir
from finetune_prep.app.compose_once import compose_once
from finetune_prep.app.logs import FileHandler, log_file_failure, silence
from finetune_prep.config import (
    CONF_DIR,
    PRIMARY,
    check_user_dirs,
    is_rerun_override,
    register_configs,
    rerun_overrides,
    searchpath_dirs,
)
from finetune_prep.errors import FinetunePrepError, did_you_mean

log = logging.getLogger("finetune_prep")
_internal_error = False
_interrupt_reported = False
_rerun: str | None = None  # the run's config file a rerun composes again (with_user_configs)
_freeze_imports = False  # main(): this process is the command's own, see _freeze
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def task(cfg: DictConfig) -> None:
    """One job: plan and write the files; failures are logged into the job's own log."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    output_dir = Path(hc.runtime.output_dir)
    staged = rundir.staged_hydra(output_dir, hc.output_subdir)  # Hydra's pending .hydra
    try:
        _check_job_folder(output_dir, multirun)
        from finetune_prep.app.pipeline import run

        if not multirun:  # a sweep's job configs exist by now: see main()
            _freeze()
        overrides = [o for o in hc.overrides.task if not is_rerun_override(o)]
        run(cfg, output_dir, overrides=overrides, config_dirs=_config_dirs(hc), dirs=staged,
            rerun=_rerun)
    except FinetunePrepError as err:
        log.error("%s", err)
        if multirun or _full_error():
            raise
        sys.exit(1)
    except KeyboardInterrupt:
        global _interrupt_reported
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the tidy-up
        log.error("interrupted: %s keeps its earlier files", output_dir)
        _interrupt_reported = True
        raise
    except Exception:
        global _internal_error
        _internal_error = True
        log.exception("internal error (please report it with this log)")
        if multirun or _full_error():
            raise
        sys.exit(2)
    finally:
        rundir.discard(staged)  # moved into .hydra by a run that wrote its plan; else removed


def _freeze() -> None:
    """Once per process started by main(): move everything alive (torch and the other
    imports, most of it) out of the garbage collector's view. A full collection walks every
    tracked object: about 150 ms with transformers imported, several times a run otherwise.
    Frozen objects are never freed, so this runs before anything that dies young exists."""
    global _freeze_imports
    if _freeze_imports:
        gc.freeze()
        _freeze_imports = False


def _check_job_folder(output_dir: Path, multirun: bool) -> None:
    """Before any work: the log file was not refused (a planted link), and a multirun job's
    folder (checked by no callback before Hydra wrote into it) has no planted links either.
    Pending folders of killed runs are swept."""
    if FileHandler.refused:
        raise FinetunePrepError(FileHandler.refused)
    if multirun:
        rundir.check_entries(output_dir)
    rundir.sweep_pending(output_dir)


def _config_dirs(hc) -> list[str]:
    """The config folders Hydra searched, in its order: the packaged conf/, --config-dir,
    hydra.searchpath entries (Hydra's own and the schema store are left out)."""
    return [str(Path(s.path).resolve()) for s in hc.runtime.config_sources
            if s.schema == "file" and (s.provider in ("main", "command-line")
                                       or s.provider.startswith("hydra.searchpath"))]


def with_user_configs(argv: list[str]) -> list[str]:
    """Check the user's config folders (a preset named like a packaged one is refused: Hydra
    would silently take the packaged one) and turn `--config-dir RUN/.hydra --config-name
    config` into a rerun of that config on top of the packaged one (see rerun_overrides)."""
    global _rerun
    check_user_dirs([*_user_config_dirs(argv), *searchpath_dirs(argv)])
    dirs = _user_config_dirs(argv)
    if not dirs:
        return argv
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--config-name=")]
    name = names[-1] if names else PRIMARY
    overrides = [a for a in argv if not a.startswith("-")]
    extra = rerun_overrides(dirs[-1], name, overrides)
    if not extra:
        return argv
    _rerun = str(Path(dirs[-1], f"{name}.yaml").resolve())
    return [a for a in argv if not a.startswith("--config-name=")] + extra


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


def checked_argv(argv: list[str]) -> list[str]:
    """`argv` with Hydra's flags first and the overrides after them, as Hydra's own parser
    needs (`freeze=full --cfg job model=vit_b_16` then works too). A flag that is unknown,
    misspelt or missing its value is a FinetunePrepError naming it."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        raise FinetunePrepError(_flag_error(parser, message))

    parser.error = error  # type: ignore[method-assign] - argparse's hook for every usage error
    args = parser.parse_intermixed_args(argv)
    flags = []
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.option_strings and value not in (None, False, action.default):
            name = max(action.option_strings, key=len)
            flags.append(name if value is True else f"{name}={value}")
    return flags + list(args.overrides)


def _flag_error(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's complaint as one line that names the flag and says what to do."""
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    fix = "Run `python -m finetune_prep --help` for the options."
    if message.startswith("unrecognized arguments: "):
        flag = message.split(": ", 1)[1].split()[0]
        return (f"unknown option {flag}.{did_you_mean(flag, options, n=3)} Config values are "
                f"set as key=value (e.g. freeze=head_only), without dashes. {fix}")
    if message.endswith("expected one argument"):
        flag = message.split()[1].split("/")[0]
        return f"option {flag} needs a value: {flag} VALUE (or {flag}=VALUE). {fix}"
    return f"command line: {message}. {fix}"


def version_text() -> str:
    """finetune_prep's version and those of the libraries that shape a plan (no torch import)."""
    from finetune_prep.app.provenance import versions

    found = versions()
    others = ", ".join(f"{k} {v}" for k, v in found.items() if k != "finetune_prep")
    return f"finetune_prep {found.get('finetune_prep', '?')} ({others})"


def _finish_sweep(error: BaseException | None) -> None:
    """A launcher that raised (a job's process died) skips on_multirun_end: the sweep module
    still lists every job in the summary. Only if this process started a sweep."""
    sweep = sys.modules.get("finetune_prep.app.sweep")
    if sweep is not None:
        sweep.finish_interrupted(error)


def run_diff(argv: list[str]) -> int:
    """`finetune-prep diff OLD.json NEW.json`: a subcommand Hydra never sees (imported here,
    not at the top, so `--help` stays fast: reading a plan imports torch)."""
    from finetune_prep.app.diff import main as diff_main

    try:
        return diff_main(argv)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        silence(sys.stdout)
        return 0


def main() -> None:
    """Run the app and exit without the slow interpreter teardown of torch."""
    global _freeze_imports
    if "-m" in sys.argv or "--multirun" in sys.argv:
        # a sweep's job configs are composed (and kept: compose_once) before its first job
        # imports torch: import it now, so that it is frozen with the other imports
        import finetune_prep.app.pipeline  # noqa: F401
    gc.freeze()  # see _freeze
    _freeze_imports = True
    code = run(sys.argv[1:])
    logging.shutdown()
    _flush(sys.stdout)
    _flush(sys.stderr)
    if "joblib" in sys.modules:  # a normal exit shuts joblib's loky workers down; skipping it
        sys.exit(code)  # leaves them holding our stdout (a pipe stays open for minutes)
    os._exit(code)


def run(argv: list[str]) -> int:
    """The command for `argv` (the arguments after the program name): its output, its files
    and its exit code, as `main` gives them, without ending the process (tests run it
    in-process; Hydra reads sys.argv, which is set here)."""
    _reset()
    if argv[:1] == ["diff"]:
        return run_diff(argv[1:])
    if "--version" in argv:
        print(version_text())
        return 0
    try:
        sys.argv[1:] = with_user_configs(checked_argv(argv))
    except FinetunePrepError as err:
        print(f"[ERROR] {err}", file=sys.stderr)
        return 1
    if any(a.startswith("--info") for a in sys.argv[1:]):
        logging.raiseExceptions = False  # --info logs through a plain handler of Hydra's own:
        # into `| head`, a traceback per line otherwise (our own handlers go quiet by themselves)
    register_configs()
    naming.register_resolvers()
    rundir.register_resolvers()
    OmegaConf.register_new_resolver(
        "finetune_prep_presets",
        lambda: presets.listing([CONF_DIR, *_user_config_dirs(sys.argv[1:])]), replace=True,
    )
    try:
        with compose_once(multirun="--multirun" in sys.argv[1:]):
            code = _run_task()
    finally:
        rundir.release()
    if code == 1 and _internal_error:
        code = 2
    failed_log = log_file_failure()
    if failed_log and code == 0:  # otherwise the error already said what went wrong
        print(f"[ERROR] {failed_log}", file=sys.stderr)
        code = 1
    return code


def _run_task() -> int:
    """Hydra's app on sys.argv; its exit code (Hydra ends with SystemExit on errors)."""
    try:
        task()
    except SystemExit as done:
        _finish_sweep(done.__context__)  # Hydra exits inside its `except` for the error
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except KeyboardInterrupt as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _finish_sweep(err)
        if not _interrupt_reported:  # stopped before the job's logging was set up
            print("[ERROR] interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # --help or --cfg into `| head`: the reader has what it wanted
        silence(sys.stdout)
    except Exception as err:  # HYDRA_FULL_ERROR=1: Hydra re-raises instead
        _finish_sweep(err)
        raise
    return 0


def _reset() -> None:
    """Forget what an earlier command in this process noted (errors, a rerun, a log file)."""
    global _internal_error, _interrupt_reported, _rerun
    _internal_error = _interrupt_reported = False
    _rerun = None
    FileHandler.failure = FileHandler.refused = None


def _flush(stream) -> None:
    """Flush; a reader that has gone (`| head`) is not an error worth a traceback."""
    try:
        stream.flush()
    except BrokenPipeError:
        silence(stream)
    except (OSError, ValueError):
        pass


