"""freeze.rules_file (app/rulesfile.py): rules read from their own YAML file plan exactly as the
same rules inline; relative paths, provenance, and one clear error per bad file."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import torchvision

import finetune_prep
from finetune_prep.app import rulesfile
from finetune_prep.errors import FinetunePrepError

NAMES = [n for n, _ in torchvision.models.resnet18(num_classes=1).named_parameters()]


def generated_rules(n: int) -> list[dict[str, str]]:
    """n rules over resnet18's names (names, modules, regexes in turn), as bench_scale writes."""
    rules = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        pattern = [name, name.rpartition(".")[0] or name, "re:" + name.replace(".", r"\.")][i % 3]
        rules.append({"freeze" if i % 2 else "unfreeze": pattern})
    return rules


def write_rules(path, rules) -> None:
    path.write_text("".join(f"- {k}: '{v}'\n" for r in rules for k, v in r.items()))


def plan(cfg) -> finetune_prep.Prepared:
    return finetune_prep.prepare(cfg, materialize=False, verify=False)


def trainable(prepared) -> list[str]:
    return [n for n, p in prepared.model.named_parameters() if p.requires_grad]


def test_rules_from_a_file_plan_exactly_as_the_same_rules_inline(tmp_path):
    rules = [{"freeze": "*"}, *generated_rules(300), {"unfreeze": "@head"}]
    write_rules(tmp_path / "r.yaml", rules)
    inline = plan({"freeze": {"rules": rules}})
    from_file = plan({"freeze": {"rules_file": str(tmp_path / "r.yaml")}})
    assert trainable(from_file) == trainable(inline)
    assert 0 < len(trainable(inline)) < len(NAMES)
    assert from_file.param_groups == inline.param_groups
    assert from_file.document["frozen"] == inline.document["frozen"]
    # each parameter's deciding rule names the file and the index, as freeze.rules[i] did
    assert inline.document["rules"]["fc.bias"] == "freeze.rules[301] {unfreeze: @head}"
    label = f"{tmp_path / 'r.yaml'}[301] {{unfreeze: @head}}"
    assert from_file.document["rules"]["fc.bias"] == label


def test_compose_and_prepare_read_a_relative_path_from_the_folder_run_in(tmp_path, monkeypatch):
    (tmp_path / "rules").mkdir()
    text = "- freeze: '*'\n- unfreeze: layer4\n"
    (tmp_path / "rules" / "r.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    cfg = finetune_prep.compose(["freeze.rules=[]", "freeze.rules_file=rules/r.yaml"])
    prepared = plan(cfg)
    assert trainable(prepared) == [n for n in NAMES if n.startswith("layer4.")]
    assert prepared.document["provenance"]["rules_file"] == {
        "path": str(tmp_path / "rules" / "r.yaml"),
        "sha256": hashlib.sha256(text.encode()).hexdigest(), "rules": 2}
    assert f"Rules file: {tmp_path / 'rules' / 'r.yaml'} (2 rules, sha256 " in prepared.summary
    assert cfg.freeze.rules_file == "rules/r.yaml"  # the config keeps the path as given


def test_a_changed_rules_file_changes_the_recorded_hash_not_the_config_hash(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- freeze: '*'\n")
    first = plan({"freeze": {"rules_file": str(path)}}).document["provenance"]
    path.write_text("- freeze: '*'\n- unfreeze: fc\n")
    second = plan({"freeze": {"rules_file": str(path)}}).document["provenance"]
    assert first["rules_file"]["sha256"] != second["rules_file"]["sha256"]
    assert first["config_sha256"] == second["config_sha256"]  # the config names the file only
    assert "rules_file" not in plan({"freeze": {"rules": []}}).document["provenance"]


def test_a_typo_in_a_files_pattern_names_the_file_and_suggests(tmp_path):
    write_rules(tmp_path / "r.yaml", [{"freeze": "*"}, {"unfreeze": "layr4"}])
    with pytest.raises(FinetunePrepError, match=r"r\.yaml\[1\] \{unfreeze: layr4\}: 'layr4' "
                                                r"matches no parameter\. Did you mean: layer4"):
        plan({"freeze": {"rules_file": str(tmp_path / "r.yaml")}})


@pytest.mark.parametrize(("text", "message"), [
    ("- freeze: '*'\n- unfreeze: [layer4\n", r"freeze\.rules_file=\S+ is not valid YAML: .*line 2"),
    ("rules:\n  - freeze: '*'\n", r"holds a mapping with a rules key .* drop the `rules:` line"),
    ("layer4\n", r"holds the text 'layer4', not a list of rules: - freeze: \"PATTERN\""),
    ("", r"freeze\.rules_file=\S+ is empty: .*write \[\] for none"),
    ("- freeze: '\x00'\n", r"not valid YAML: control characters are not allowed \(0x00 at "
                         r"byte 11\)"),
    (b"- freeze: '\xff'\n", r"not valid YAML: .*\(0xff at byte 11\)"),
    ("- freeze: '*'\n- {freeze: a, unfreeze: b}\n",
     r"r\.yaml\[1\] has keys freeze, unfreeze; a rule has exactly one key"),
    ("- freeze\n", r"r\.yaml\[0\] is 'freeze'; a rule is a mapping"),
    ("- freeze: [a, b]\n", r"r\.yaml\[0\]\.freeze=\['a', 'b'\]: a pattern is one string"),
])
def test_a_bad_rules_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(FinetunePrepError, match=message):
        rulesfile.read(str(tmp_path / "r.yaml"))


def test_a_missing_file_names_the_key_and_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FinetunePrepError, match=rf"freeze\.rules_file=nope\.yaml does not exist "
                                                rf"\(looked for {tmp_path}/nope\.yaml"):
        plan({"freeze": {"rules_file": "nope.yaml"}})


def test_a_fifo_or_a_folder_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    done = []
    reader = threading.Thread(target=lambda: done.append(_error(str(fifo))), daemon=True)
    reader.start()
    reader.join(10)
    assert done and "freeze.rules_file=" in done[0]
    assert "is not a regular file but a named pipe (FIFO)" in done[0]
    assert "give the file itself" in done[0]
    assert "is not a regular file but a directory" in _error(str(tmp_path))


def test_a_file_above_the_size_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(rulesfile, "MAX_BYTES", 10)
    (tmp_path / "r.yaml").write_text("- freeze: '*'\n- unfreeze: fc\n")
    assert "freeze.rules_file=" in _error(str(tmp_path / "r.yaml"))
    assert "more than the 10" in _error(str(tmp_path / "r.yaml"))


def test_numbers_become_text_as_inline_rules_do(tmp_path):
    (tmp_path / "r.yaml").write_text("- freeze: 1\n")
    rules, read = rulesfile.read(str(tmp_path / "r.yaml"))
    assert [(r.action, r.pattern) for r in rules] == [("freeze", "1")]
    assert read.rules == 1


def _error(path: str) -> str:
    try:
        rulesfile.read(path)
    except FinetunePrepError as err:
        return str(err)
    raise AssertionError(f"{path} was read")
