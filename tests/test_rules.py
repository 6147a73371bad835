"""The pattern language and the ordered freeze/unfreeze evaluation, on real models' names."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_prep.errors import FinetunePrepError
from finetune_prep.plan.rules import Rule, evaluate, match, parse_rules, select


def rules(*pairs: tuple[str, str]) -> list[Rule]:
    return parse_rules([{action: pattern} for action, pattern in pairs])


def trainable(plan) -> list[str]:
    return [n for n, t in plan.trainable.items() if t]


def test_bare_module_name_covers_its_subtree_at_a_dot_boundary(resnet18_table):
    names = match("layer4", resnet18_table)
    assert names and all(n.startswith("layer4.") for n in names)
    assert len(names) == sum(n.startswith("layer4.") for n in resnet18_table.names)
    assert match("layer", resnet18_table) == []  # no bare substring matching
    assert match("layer4.0.conv1", resnet18_table) == ["layer4.0.conv1.weight"]


def test_glob_matches_full_names_and_enclosing_modules(resnet18_table):
    bn1 = match("*.bn1", resnet18_table)
    assert "layer1.0.bn1.weight" in bn1 and "bn1.weight" not in bn1
    assert match("*", resnet18_table) == list(resnet18_table.names)
    assert match("layer[12]", resnet18_table) == [
        n for n in resnet18_table.names if n.split(".")[0] in ("layer1", "layer2")
    ]
    assert match("*.weight", resnet18_table) == [
        n for n in resnet18_table.names if n.endswith(".weight")
    ]


def test_regex_is_a_fullmatch_on_parameter_names(resnet18_table):
    assert match(r"re:layer4\.\d\.bn\d\.bias", resnet18_table) == [
        "layer4.0.bn1.bias", "layer4.0.bn2.bias", "layer4.1.bn1.bias", "layer4.1.bn2.bias",
    ]
    assert match("re:layer4", resnet18_table) == []  # fullmatch, not search


def test_aliases_on_resnet18(resnet18_table):
    t = resnet18_table
    assert match("@head", t) == ["fc.weight", "fc.bias"]
    assert match("@stage[0]", t) == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert match("@stage[-1]", t) == [n for n in t.names if n.startswith("layer4.")]
    assert match("@stages[-2:]", t) == [n for n in t.names if n[:6] in ("layer3", "layer4")]
    assert match("@stages[:1]", t) == match("@stage[0]", t)
    assert match("@bias", t) == [n for n in t.names if n.endswith(".bias")]
    norm = match("@norm", t)
    assert norm and all(".bn" in n or n.startswith("bn1") or ".downsample.1." in n for n in norm)
    assert sum(t.numel(n) for n in norm) == 9600  # DESIGN.md: resnet18's BN affine parameters
    assert match("@ndim<=1", t) == [n for n in t.names if len(t.shapes[n]) <= 1]
    assert match("@all", t) == list(t.names)


def test_stage_index_out_of_range_lists_the_stages(resnet18_table):
    with pytest.raises(FinetunePrepError) as err:
        match("@stage[9]", resnet18_table)
    text = str(err.value)
    assert "5 stages" in text and "-5..4" in text and "layer4" in text


def test_unknown_alias_lists_the_aliases(resnet18_table):
    with pytest.raises(FinetunePrepError, match=r"not an alias.*@head.*Did you mean: @head"):
        match("@haed", resnet18_table)


def test_a_pattern_matching_nothing_is_an_error_with_close_names(resnet18_table):
    with pytest.raises(FinetunePrepError) as err:
        select("layr4", resnet18_table, "freeze.rules[1]")
    text = str(err.value)
    assert "freeze.rules[1]" in text and "'layr4' matches no parameter" in text
    assert "Did you mean: layer4" in text and "Top-level modules: conv1, bn1" in text


def test_malformed_regex_is_named(resnet18_table):
    with pytest.raises(FinetunePrepError, match="not a valid regular expression"):
        match("re:layer4.(", resnet18_table)


@pytest.mark.parametrize("pattern", [r"re:(layer4)\.\1", r"re:(?=layer4).*", r"re:(?<!x)fc\..*"])
def test_regex_features_re2_lacks_are_named_with_a_way_out(pattern, resnet18_table):
    with pytest.raises(FinetunePrepError) as err:
        select(pattern, resnet18_table, "freeze.rules[0]")
    text = str(err.value)
    assert text.startswith(f"freeze.rules[0]: {pattern!r} is not supported by RE2")
    assert "no backreferences or lookaround" in text and "Use a glob" in text


def test_regex_keeps_fullmatch_semantics_with_re2(resnet18_table):
    assert match(r"re:fc\.(weight|bias)", resnet18_table) == ["fc.weight", "fc.bias"]
    assert match(r"re:(?i)FC\.BIAS", resnet18_table) == ["fc.bias"]
    assert match(r"re:fc\.weigh", resnet18_table) == []  # fullmatch, not match


_CATASTROPHIC = textwrap.dedent("""
    import time
    from finetune_prep.plan.table import ParamTable
    from finetune_prep.plan.rules import match
    names = tuple("a" * n + "b" for n in (30, 50, 200, 5000)) + ("a" * 60,)
    table = ParamTable(names, {n: (1,) for n in names}, {n: "" for n in names}, {"": "M"},
                       frozenset(), frozenset(), (), ())
    start = time.perf_counter()
    assert match("re:(a+)+$", table) == ["a" * 60], match("re:(a+)+$", table)
    assert match("re:(a|aa)*c", table) == []
    print(time.perf_counter() - start)
""")


@pytest.mark.slow
def test_catastrophic_regex_returns_at_once():
    """Python's re backtracks for ever on `(a+)+$` against 'aaa...ab'; RE2 is linear."""
    done = subprocess.run([sys.executable, "-c", _CATASTROPHIC], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 1.0


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({}, r"freeze.rules\[0\] is empty"),
        ({"freeze": "*", "unfreeze": "fc"}, "exactly one key, freeze or unfreeze"),
        ({"frezee": "*"}, "exactly one key"),
        ("layer4", "a rule is a mapping"),
    ],
)
def test_malformed_rules(item, message):
    with pytest.raises(FinetunePrepError, match=message):
        parse_rules([item])


def test_empty_pattern_is_an_error(resnet18_table):
    with pytest.raises(FinetunePrepError, match="the pattern is empty"):
        evaluate(rules(("freeze", "")), resnet18_table)


def test_seed_recipe_freeze_all_then_unfreeze_head(resnet18_table):
    plan = evaluate(rules(("freeze", "*"), ("unfreeze", "@head")), resnet18_table)
    assert trainable(plan) == ["fc.weight", "fc.bias"]
    assert plan.decided_by["fc.bias"] == "freeze.rules[1] {unfreeze: @head}"
    assert plan.decided_by["conv1.weight"] == "freeze.rules[0] {freeze: *}"


def test_later_rules_win_and_no_rules_train_everything(resnet18_table):
    t = resnet18_table
    assert trainable(evaluate([], t)) == list(t.names)
    plan = evaluate(rules(("unfreeze", "*"), ("freeze", "layer4"), ("unfreeze", "layer4.1")), t)
    assert [n for n in t.names if not plan.trainable[n]] == [
        n for n in t.names if n.startswith("layer4.0.")
    ]


def test_fully_shadowed_rule_is_reported(resnet18_table):
    plan = evaluate(rules(("freeze", "layer4"), ("unfreeze", "*")), resnet18_table)
    assert plan.shadowed == ("freeze.rules[0] {freeze: layer4}",)
    plan = evaluate(rules(("freeze", "*"), ("unfreeze", "layer4")), resnet18_table)
    assert plan.shadowed == ()


def reference(rule_list, names):
    """A straightforward evaluation, written independently of rules.py."""
    state = dict.fromkeys(names, True)
    for action, pattern in rule_list:
        for n in names:
            parts = n.split(".")
            scopes = [".".join(parts[: i + 1]) for i in range(len(parts))]
            if pattern.startswith("re:"):
                hit = re.fullmatch(pattern[3:], n) is not None
            else:
                hit = any(fnmatch.fnmatchcase(s, pattern) for s in scopes)
            if hit:
                state[n] = action == "unfreeze"
    return state


def _patterns(table):
    modules = sorted({".".join(n.split(".")[:k]) for n in table.names
                      for k in range(1, len(n.split(".")) + 1)})
    return st.one_of(
        st.sampled_from(modules),
        st.sampled_from(["*", "*.weight", "*.bias", "layer*", "*.bn?", "*downsample*"]),
        st.sampled_from(modules).map(lambda m: "re:" + re.escape(m) + r"\..*"),
    )


@pytest.mark.parametrize("fixture", ["resnet18_table", "vit_table"])
def test_rules_agree_with_a_reference_evaluation(fixture, request):
    table = request.getfixturevalue(fixture)
    rule = st.tuples(st.sampled_from(["freeze", "unfreeze"]), _patterns(table))

    @settings(max_examples=60, deadline=None)
    @given(st.lists(rule, max_size=6))
    def check(rule_list):
        expected = reference(rule_list, table.names)
        try:
            plan = evaluate(rules(*rule_list), table)
        except FinetunePrepError:  # only a pattern that matches nothing may fail
            assert any(all(reference([("freeze", p)], table.names).values())
                       for _, p in rule_list)
            return
        assert dict(plan.trainable) == expected
        again = evaluate(rules(*rule_list, *rule_list), table)
        assert dict(again.trainable) == expected  # applying the rules twice changes nothing

    check()


def test_no_weight_decay_alias_follows_the_model(resnet18_table):
    from conftest import meta_model

    swin = meta_model("swin_t").table
    tables = match("@no_weight_decay", swin)
    assert tables and all(n.endswith("attn.relative_position_bias_table") for n in tables)
    assert match("@no_weight_decay", resnet18_table) == []  # a CNN excludes nothing itself
    pytest.importorskip("timm")
    vit = meta_model("vit_tiny_patch16_224", source="timm").table
    assert match("@no_weight_decay", vit) == ["cls_token", "pos_embed"]  # no reg/dist tokens


# --- batched matching (select_all / match_all): the same answers as one pattern at a time ---

def _patterns_of(table) -> list[str]:
    """Names, enclosing modules, globs, regexes and aliases built from the model's own names."""
    found = ["*", "**", "?*", "@norm", "@head", "@bias", "@stage[0]", "@stages[1:]", "@all",
             "layer[1-2]", "*.bn[!1]", "re:.*weight", "re:(?:layer\\d)\\..*", "x.y", "*.nothing"]
    for name in table.names[::3]:
        parts = name.split(".")
        found += [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
        found += ["*" + parts[-1], "*." + parts[-1], parts[0] + "*", "?" + name[1:],
                  "re:" + re.escape(name)]
    return found


@pytest.mark.parametrize("fixture", ["resnet18_table", "vit_table"])
def test_batched_matching_equals_matching_one_pattern_at_a_time(fixture, request):
    from finetune_prep.plan import rules

    table = request.getfixturevalue(fixture)
    patterns = _patterns_of(table)
    assert rules.match_all(patterns, table) == [match(p, table) for p in patterns]
    saved = rules.SET_CHUNK
    try:  # many RE2 sets (chunks) give the same answers as one
        rules.SET_CHUNK = 7
        assert rules.match_all(patterns, table) == [match(p, table) for p in patterns]
    finally:
        rules.SET_CHUNK = saved


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="lay1234.*?bnconvfcweight", min_size=1, max_size=12),
                min_size=1, max_size=8))
def test_batched_globs_agree_with_fnmatch(resnet18_table, patterns):
    from finetune_prep.plan.rules import match_all

    assert match_all(patterns, resnet18_table) == [match(p, resnet18_table) for p in patterns]


def test_batched_select_raises_the_first_error_in_rule_order(resnet18_table):
    from finetune_prep.plan.rules import select_all

    wheres = [f"r[{i}]" for i in range(4)]
    with pytest.raises(FinetunePrepError, match=r"r\[1\]: 'layer9' matches no parameter"):
        select_all(["layer1", "layer9", "re:(", "fc"], resnet18_table, wheres)
    with pytest.raises(FinetunePrepError, match=r"r\[1\]: 're:\(' is not a valid regular"):
        select_all(["layer1", "re:(", "layer9", "fc"], resnet18_table, wheres)
    with pytest.raises(FinetunePrepError, match=r"r\[2\]: .*not an alias"):
        select_all(["layer1", "fc", "@nrom", "layer9"], resnet18_table, wheres)
    with pytest.raises(FinetunePrepError, match=r"r\[0\]: the pattern is empty"):
        select_all(["", "fc", "@nrom", "layer9"], resnet18_table, wheres)


def test_ten_thousand_rules_keep_typo_shadow_and_empty_reports(resnet18_table):
    """At scale the same reports fire: a typo among 10,000 rules is an error naming it and a
    close name; shadowed rules are listed; it stays fast (one batch, not 10,000 passes)."""
    import time

    names = list(resnet18_table.names)
    items = [{"freeze" if i % 2 else "unfreeze": names[i % len(names)]} for i in range(10_000)]
    start = time.perf_counter()
    plan = evaluate(parse_rules(items), resnet18_table)
    assert time.perf_counter() - start < 10  # ~0.3 s; 20 s before batching, under load
    assert len(plan.shadowed) == 10_000 - len(names)
    assert plan.shadowed[0] == "freeze.rules[0] {unfreeze: conv1.weight}"
    last = items[-1]
    assert plan.decided_by[names[(10_000 - 1) % len(names)]] == \
        f"freeze.rules[9999] {{freeze: {last['freeze']}}}"
    typo = [*items[:5000], {"freeze": "layer4.1.bn3"}, *items[5000:]]
    with pytest.raises(FinetunePrepError,
                       match=r"freeze.rules\[5000\] \{freeze: layer4.1.bn3\}: 'layer4.1.bn3' "
                             r"matches no parameter\. Did you mean: layer4\.1\.bn2, "
                             r"layer4\.1\.bn1"):
        evaluate(parse_rules(typo), resnet18_table)
