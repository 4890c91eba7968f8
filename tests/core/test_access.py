import pytest

from core import access
from core.errors import InputError


def test_record_scope_roundtrip(tmp_path):
    assert access.record(None) == {"scope": "public"} and access.record([]) == {"scope": "public"}
    assert access.record(["hr", "finance", "hr"], {"hr"}) == {"scope": ["finance", "hr"], "groups_seen": ["hr"]}
    assert access.scope(tmp_path) is None
    access.write(tmp_path, access.record(["hr"], ["hr"]))
    assert access.scope(tmp_path) == ["hr"]
    access.write(tmp_path, access.record([]))
    assert access.scope(tmp_path) == []


def test_check_refuses_missing_groups_and_unknown_scope(tmp_path):
    with pytest.raises(InputError, match="no hybrid_access.json"):
        access.check(tmp_path, ["hr"], "--adapter x")
    access.write(tmp_path, access.record(["hr", "finance"]))
    with pytest.raises(InputError, match=r"--adapter x: .* lacks finance, hr"):
        access.check(tmp_path, None, "--adapter x")
    with pytest.raises(InputError, match="lacks finance$|lacks finance "):
        access.check(tmp_path, ["hr"], "--adapter x")
    access.check(tmp_path, ["finance", "hr", "ops"], "--adapter x")  # holds every scope group: allowed


@pytest.mark.parametrize("content", ['{"scope": "hr"}', '{"scope": []}', '{"scope": [1]}', '{}', "[]", "not json",
                                     '{"scope": null}'])
def test_damaged_access_record_is_refused(tmp_path, content):
    (tmp_path / access.ACCESS_FILE).write_text(content)
    with pytest.raises(InputError, match="'scope' must be"):
        access.check(tmp_path, ["hr", "h", "r"], "--adapter x")


def test_a_lone_group_string_is_one_group_not_its_letters():
    assert access.caller_groups("hr") == frozenset({"hr"})
    assert access.training_groups("hr") == ["hr"]
    assert access.caller_groups(None) == frozenset() and access.caller_groups(("a", "b")) == {"a", "b"}
    for bad in (5, [1], b"hr", {"hr": 1}):
        with pytest.raises(InputError, match="groups must be"):
            access.caller_groups(bad)


def test_the_groups_option_is_a_fresh_list_per_config_behind_the_group_flag():
    from dataclasses import dataclass, fields

    @dataclass
    class Config:
        groups: list[str] = access.option()

    a, b = Config(), Config()
    a.groups.append("hr")
    assert b.groups == [] and access.group_problems(b.groups) == []
    (f,) = fields(Config)
    assert f.metadata == {"flag": "--group", "help": access.CALLER_HELP}
