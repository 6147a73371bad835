"""The README and docs/ stay true: links resolve, every documented command names config groups,
presets and keys that exist (it composes), the preset tables are the files of conf/, the example
configs shown are the files in examples/my_conf, the quick-start lines are the ones .ci/run
runs, the training-API blocks run on a real plan, and the README stays under 400 lines."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
from itertools import product
from pathlib import Path

import pytest
import torch
from conftest import REPO

import finetune_prep
from finetune_prep.config import validate

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
GROUPS = ("model", "freeze", "optim")


def blocks(page: Path, *langs: str) -> list[str]:
    """The fenced code blocks of `page` whose language is one of `langs` (any if none)."""
    return [body for lang, body in FENCE.findall(page.read_text(encoding="utf-8"))
            if not langs or lang in langs]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a Markdown page's headings (outside code blocks)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_the_readme_is_under_400_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) < 400


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert relative_links(page), f"{page.name} links nowhere"
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[a](missing.md) [b](#title) [c](#nope) [d](https://x.org)\n")
    assert relative_links(page) == ["missing.md", "#title", "#nope"]
    assert anchors(page) == {"title"}


def commands(page: Path) -> list[list[str]]:
    """Each `python -m finetune_prep ...` line of the page's fenced blocks, as arguments
    (continuation lines joined, comments dropped, a leading `$ ` allowed)."""
    found = []
    for body in blocks(page):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ").strip()
            if "python -m finetune_prep" in line:
                line = line.split("python -m finetune_prep", 1)[1]
                found.append(shlex.split(line, comments=True))
    return found


def compositions(args: list[str]) -> tuple[str | None, list[list[str]]]:
    """(--config-dir, the override lists one command composes: one per multirun job). Hydra's
    own settings (hydra.*, hydra/launcher=...) are left to Hydra."""
    config_dir, overrides, it = None, [], iter(args)
    for arg in it:
        if arg == "--config-dir":
            config_dir = next(it)
        elif arg in ("-m", "--multirun"):
            continue
        elif not arg.startswith(("hydra.", "hydra/")):
            overrides.append(arg)
    choices = [[f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")]
               if "=" in o and "[" not in o and "," in o else [o] for o in overrides]
    return config_dir, [list(job) for job in product(*choices)]


def compose_checked(config_dir: str | None, overrides: list[str]) -> None:
    """Compose as the CLI would (unknown presets and keys fail) and check against the schema;
    a command the pages repeat is composed once."""
    key = (config_dir, tuple(overrides))
    if key not in COMPOSED:
        folder = REPO / config_dir if config_dir else None
        validate(finetune_prep.compose(overrides, config_dir=folder))
        COMPOSED.add(key)


COMPOSED: set[tuple[str | None, tuple[str, ...]]] = set()


def test_readme_has_commands_to_check():
    cmds = commands(README)
    assert len(cmds) >= 8
    assert ["freeze=head_only"] in cmds  # the quick start


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_command_composes(page):
    for args in commands(page):
        if "--help" in args or "--version" in args or args[:1] == ["diff"]:
            continue  # not a composition (diff reads two plans)
        config_dir, jobs = compositions(args)
        if config_dir and ".hydra" in Path(config_dir).parts:
            continue  # a rerun of a run folder, made at run time (test_cli tests reruns)
        for overrides in jobs:
            try:
                compose_checked(config_dir, overrides)
            except finetune_prep.FinetunePrepError as err:
                pytest.fail(f"{page.name}: python -m finetune_prep {shlex.join(args)}: {err}")


def test_a_command_with_a_missing_preset_is_caught():
    _, jobs = compositions(["-m", "freeze=head_only,no_such_preset", "hydra.launcher.n_jobs=2"])
    assert jobs == [["freeze=head_only"], ["freeze=no_such_preset"]]
    with pytest.raises(finetune_prep.FinetunePrepError, match="no_such_preset"):
        compose_checked(None, jobs[1])
    with pytest.raises(finetune_prep.FinetunePrepError, match="num_output"):
        compose_checked(None, ["+head.num_output=3"])


def test_documented_launchers_are_installed():
    text = "\n".join(b for p in PAGES for b in blocks(p))
    for launcher in set(re.findall(r"hydra/launcher=(\w+)", text)):
        name = "submitit" if launcher.startswith("submitit") else launcher
        assert importlib.util.find_spec(f"hydra_plugins.hydra_{name}_launcher"), launcher


def preset_table(text: str, group: str) -> dict[str, str]:
    """The README's table of `group` presets: name -> description."""
    rows = re.findall(r"^\| `([\w-]+)` \| (.+) \|$",
                      text.split(f"| `{group}` preset |", 1)[1].split("\n\n", 1)[0],
                      re.MULTILINE)
    return dict(rows)


@pytest.mark.parametrize("group", GROUPS)
def test_preset_tables_are_the_files_of_conf(group):
    files = {p.stem: p.read_text(encoding="utf-8").splitlines()[0].removeprefix("# ")
             for p in (REPO / "conf" / group).glob("*.yaml")}
    assert preset_table(README.read_text(encoding="utf-8"), group) == files


def test_example_configs_shown_are_the_files():
    shown = blocks(README, "yaml")
    folder = REPO / "examples" / "my_conf"
    files = sorted(folder.rglob("*.yaml"))
    assert len(files) == 3
    for path in files:
        assert path.read_text(encoding="utf-8") in shown, path.relative_to(REPO)
        assert f"`{path.relative_to(folder)}`" in README.read_text(encoding="utf-8")


def test_the_experiment_sets_what_it_says():
    cfg = validate(finetune_prep.compose(["+experiment=pets_sgd"],
                                         config_dir=REPO / "examples" / "my_conf"))
    assert (cfg.model.arch, cfg.head.num_outputs, cfg.optim.lr) == ("resnet50", 37, 0.02)
    assert cfg.optim.optimizer["_target_"] == "torch.optim.SGD"
    assert cfg.freeze.rules[1] == {"unfreeze": "@stages[-2:]"}


def ci_pattern(name: str) -> str:
    """The sed pattern .ci/run greps the README with for one quick-start line."""
    text = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    found = re.search(rf"{name}=\$\(readme_command (['\"])(.+?)\1", text)
    assert found, name
    return found.group(2)


@pytest.mark.parametrize("name", ["run_command", "test_command"])
def test_quick_start_lines_are_the_ones_ci_runs(name):
    """Each .ci/run pattern finds exactly one `$ ` line, with sed itself (as CI does)."""
    pattern = ci_pattern(name)
    out = subprocess.run(["sed", "-n", f"s/^\\$ \\({pattern}.*\\)$/\\1/p", str(README)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 1, (pattern, out)
    assert out[0].startswith("pip install -e ")


def test_quick_start_commands():
    lines = [ln for ln in README.read_text(encoding="utf-8").splitlines()
             if ln.startswith("$ ")]
    assert lines == ["$ pip install -e . && python -m finetune_prep freeze=head_only",
                     "$ pip install -e '.[test]' && python -m pytest"]


def loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 32, 32, generator=gen), torch.zeros(2, dtype=torch.long))]


def api_block(start: str) -> str:
    found = [b for b in blocks(README, "python") if b.startswith(start)]
    assert len(found) == 1, start
    return found[0]


def test_the_training_api_block_runs_on_a_real_plan(tmp_path):
    from finetune_prep.app.pipeline import run

    run(finetune_prep.compose(["freeze=head_only", "verify.backward=false"]), tmp_path)
    code = api_block("import torch, torchvision, finetune_prep")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {"loader": loader()}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    model = namespace["model"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert not model.bn1.training and model.training


def test_the_schedule_block_runs_on_a_real_plan(gradual_plan):
    namespace: dict = {"finetune_prep": finetune_prep, "epochs": 3, "loader": loader(),
                       "plan": finetune_prep.load_plan(gradual_plan)}
    namespace["model"] = finetune_prep.build_model(namespace["plan"])
    exec(compile(api_block("optimizer = finetune_prep.build_optimizer(model, plan)"),
                 "README.md", "exec"), namespace)
    assert namespace["schedule"].phase == 2
    assert namespace["model"].layer4[0].conv1.weight.requires_grad
    assert not namespace["model"].layer2[0].conv1.weight.requires_grad
