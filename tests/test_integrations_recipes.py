"""The recipes of docs/recipes.md, run exactly as written (read from that file) on a
real plan: after training, frozen parameters and frozen BatchNorm statistics are unchanged and
every trainable parameter moved. Multi-process recipes run under torchrun with 2 gloo ranks."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

import finetune_prep

pytestmark = pytest.mark.slow

PROLOGUE = '''\
import os, sys, torch, finetune_prep
PLAN, OUT = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = finetune_prep.build_model(PLAN)
_rank = int(os.environ.get("RANK", 0))
_gen = torch.Generator().manual_seed(1 + _rank)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
    torch.randn(4, 3, 32, 32, generator=_gen), torch.randint(0, 10, (4,), generator=_gen)),
    batch_size=2)
'''

EPILOGUE = '''
from finetune_prep.train import wrappers
_tensors = {**wrappers.named_parameters(model), **wrappers.named_buffers(model)}
_state = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
          for n, t in _tensors.items()}
if _rank == 0:
    torch.save(_state, OUT)
'''


def recipe(name: str) -> str:
    """The python block after `<!-- recipe: NAME -->` in docs/recipes.md."""
    text = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", text, re.DOTALL)
    assert found, f"docs/recipes.md has no recipe {name!r}"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def plan(resnet18_plan) -> Path:
    """resnet18, 10 classes, last stage + head trainable, head at 10x lr (optim=sgd)."""
    return resnet18_plan


def run_script(code: str, plan: Path, tmp_path: Path, ranks: int = 0, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` as a script (under torchrun with `ranks` processes if > 0), cwd tmp_path."""
    script = tmp_path / "train.py"
    script.write_text(code)
    out = tmp_path / "state.pt"
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                 f"--master_port={free_port()}"] if ranks else [sys.executable])
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run([*launcher, str(script), str(plan), str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def assert_plan_held(plan: Path, final: dict[str, torch.Tensor]) -> None:
    """Frozen parameters and frozen BN stats unchanged, every trainable parameter moved, and
    the trainable BN layers' stats did move (so the comparison can see a change)."""
    torch.manual_seed(0)
    initial = finetune_prep.build_model(plan)  # the recipe's model before training
    start = {**dict(initial.named_parameters()), **dict(initial.named_buffers())}
    doc = json.loads(plan.read_text())
    trainable = [n for g in doc["groups"] for n in g["params"]]
    changed = {n for n, t in start.items() if not torch.equal(t, final[n])}
    assert not changed & set(doc["frozen"]), sorted(changed & set(doc["frozen"]))
    assert set(trainable) <= changed, sorted(set(trainable) - changed)
    frozen_stats = {n for n in start if n.rpartition(".")[0] in doc["eval_modules"]}
    assert frozen_stats and not changed & frozen_stats, sorted(changed & frozen_stats)
    assert "layer4.1.bn2.running_mean" in changed  # trainable BN layers train their stats


def cosine_variant(code: str) -> str:
    """The torch_schedulers recipe with its `# or:` line (CosineAnnealingLR) instead of
    OneCycleLR."""
    one_cycle = re.search(r"scheduler = torch.optim.lr_scheduler.OneCycleLR\(.*?\)\n", code,
                          re.DOTALL)
    assert one_cycle and "# or: scheduler = " in code
    return code.replace(one_cycle.group(0), "").replace("# or: scheduler = ", "scheduler = ")


# torch.compile as the recipe writes it: Dynamo captures the graphs and AOTAutograd the backward,
# as by default; only Inductor's code generation gives way to AOTAutograd's eager run (Inductor
# compiles C++ for 20 s on 2 cores with a cold cache, and sees no names, flags or modes).
COMPILE_ENV = {"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"}


def run_recipe(name: str, plan: Path, tmp_path: Path, ranks: int = 0) -> None:
    code = cosine_variant(recipe("torch_schedulers")) if name == "cosine" else recipe(name)
    env = COMPILE_ENV if name == "compile" else None
    run_script(PROLOGUE + code + EPILOGUE, plan, tmp_path, ranks, env=env)
    assert_plan_held(plan, torch.load(tmp_path / "state.pt", weights_only=True))


SINGLE_PROCESS = ["torch_schedulers", "cosine", "timm_scheduler", "compile", "lightning",
                  "lightning_onecycle"]

# Runs each recipe script of recipes.json (name -> code) in this one process, each in a fresh
# namespace with its own argv (PLAN, its own OUT), as `python script.py PLAN OUT` would; a
# recipe that raises is recorded in failed.json and the next one runs.
RUN_EACH = """
import json, os, sys, traceback
folder = os.path.dirname(sys.argv[2])
with open(os.path.join(folder, "recipes.json")) as f:
    scripts = json.load(f)
failed = {}
for name, code in scripts.items():
    sys.argv = [name, sys.argv[1], os.path.join(folder, name + ".pt")]
    try:
        exec(compile(code, name + ".py", "exec"), {"__name__": "__main__"})
    except BaseException:
        failed[name] = traceback.format_exc()
with open(os.path.join(folder, "failed.json"), "w") as f:
    json.dump(failed, f)
"""


def test_single_process_recipes_hold_the_plan(plan, tmp_path):
    """Every single-process recipe, as written, in one interpreter (each recipe's start-up
    would otherwise cost 3 s of imports): one test, so a worker runs them all at once."""
    scripts = {name: PROLOGUE + (cosine_variant(recipe("torch_schedulers")) if name == "cosine"
                                 else recipe(name)) + EPILOGUE for name in SINGLE_PROCESS}
    (tmp_path / "recipes.json").write_text(json.dumps(scripts))
    run_script(RUN_EACH, plan, tmp_path, env=COMPILE_ENV)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert not failed, "\n".join(f"recipe {k}:\n{v}" for k, v in failed.items())
    for name in SINGLE_PROCESS:
        try:
            assert_plan_held(plan, torch.load(tmp_path / f"{name}.pt", weights_only=True))
        except AssertionError as err:
            raise AssertionError(f"recipe {name}: {err}") from err


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_two_rank_recipe_holds_the_plan(name, plan, tmp_path):
    run_recipe(name, plan, tmp_path, ranks=2)


WRONG_ORDERS = PROLOGUE + '''
import copy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

torch.distributed.init_process_group("gloo")
bare = copy.deepcopy(model)
cpu = torch.device("cpu")
for name, case in [
    ("ddp", lambda: finetune_prep.load_param_groups(DDP(copy.deepcopy(bare)), PLAN)),
    ("fsdp1", lambda: finetune_prep.load_param_groups(
        FSDP(copy.deepcopy(bare), use_orig_params=True, device_id=cpu), PLAN)),
]:
    try:
        case()
        print(name, "NO ERROR")
    except finetune_prep.FinetunePrepError as err:
        print(name, "ERROR", err)

# FSDP2: groups taken before sharding, optimizer built on them after: stale, caught by check
stale = copy.deepcopy(bare)
groups = finetune_prep.load_param_groups(stale, PLAN)
fully_shard(stale)
try:
    finetune_prep.check(stale, torch.optim.SGD(groups, lr=0.1), PLAN)
    print("fsdp2 NO ERROR")
except finetune_prep.FinetunePrepError as err:
    print("fsdp2 ERROR", err)

# FSDP1 in the right order: names map through _fsdp_wrapped_module., check passes, it trains
finetune_prep.load_param_groups(model, PLAN)
model = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
optimizer = finetune_prep.build_optimizer(model, PLAN)
finetune_prep.train_mode(model, PLAN)
finetune_prep.check(model, optimizer, PLAN)
for images, labels in loader:
    finetune_prep.train_mode(model, PLAN)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
'''


def test_wrong_orders_get_the_clear_error_and_fsdp1_trains(plan, tmp_path):
    result = run_script(WRONG_ORDERS + '''
with FSDP.summon_full_params(model):
''' + "\n".join("    " + line for line in EPILOGUE.strip().splitlines()), plan, tmp_path, 2)
    out = result.stdout
    for wrapper in ("DistributedDataParallel", "FullyShardedDataParallel"):
        assert (f"the model is wrapped in {wrapper}, which fixed the trainable parameters when "
                "it was built") in out, out[-3000:]
        assert f"then `{wrapper}(model)`" in out
    assert "fsdp2 ERROR" in out
    assert "- 17 optimizer parameter(s) are not parameters of the model" in out  # layer4 + fc
    assert "- 17 trainable in the plan but in no optimizer group: layer4.0.conv1.weight" in out
    assert "NO ERROR" not in out
    assert_plan_held(plan, torch.load(tmp_path / "state.pt", weights_only=True))


def test_without_the_callback_lightning_moves_frozen_batchnorm_stats(plan, tmp_path):
    """The failure the callback prevents, seen by the same comparison (so it can fail)."""
    code = recipe("lightning").replace(
        "return None  #", "return finetune_prep.build_optimizer(self.model, PLAN)  #"
    ).replace("callbacks=[FinetunePrepCallback(PLAN)]", "")
    run_script(PROLOGUE + code + EPILOGUE, plan, tmp_path)
    with pytest.raises(AssertionError, match="bn1.running_mean"):
        assert_plan_held(plan, torch.load(tmp_path / "state.pt", weights_only=True))
