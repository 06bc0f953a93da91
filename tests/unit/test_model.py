"""The model engine under the configuration: conversions, errors, validators, frozen records."""

from __future__ import annotations

import datetime
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest

from fraisier.model import (
    Field,
    Model,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class Inner(Model):
    url: str
    from_: Literal["host", "controller"] = Field(default="host", alias="from")


class Sample(Model):
    text: str = ""
    count: int = Field(default=1, gt=0)
    flag: bool = False
    path: Path | None = None
    names: tuple[str, ...] = ()
    codes: tuple[int, ...] = ()
    env: dict[str, str] = {}
    anything: dict[str, Any] = {}
    either: int | str | None = None
    kind: Literal["api", "etl"] = "api"
    inner: Inner | None = None
    inners: dict[str, Inner] = {}
    at_least: int | None = Field(default=None, ge=1)


def errors_of(cls, data, context=None):
    with pytest.raises(ValidationError) as caught:
        cls.model_validate(data, context=context)
    return [(e["type"], e["loc"]) for e in caught.value.errors()]


@pytest.mark.parametrize(
    ("field", "given", "expected"),
    [
        ("text", "x", "x"),
        ("text", 5, "5"),
        ("text", 1.10, "1.1"),
        ("count", "5", 5),
        ("count", " 7 ", 7),
        ("count", "5.0", 5),
        ("count", "+5", 5),
        ("count", "5_000", 5000),
        ("count", 5.0, 5),
        ("count", True, 1),
        ("flag", "yes", True),
        ("flag", "Off", False),
        ("flag", 1, True),
        ("flag", 0, False),
        ("flag", "t", True),
        ("path", "rel/x", Path("rel/x")),
        ("names", ["a", 1], ("a", "1")),
        ("names", ("a",), ("a",)),
        ("codes", [200, "301", 302.0], (200, 301, 302)),
        ("env", {"A": 1}, {"A": "1"}),
        ("either", 3, 3),
        ("either", "30%", "30%"),
        ("either", True, 1),
        ("either", 2.5, "2.5"),
        ("kind", "etl", "etl"),
        ("at_least", 1, 1),
    ],
)
def test_conversions_a_yaml_user_expects(field, given, expected):
    value = getattr(Sample.model_validate({field: given}), field)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("field", "given", "kind"),
    [
        ("text", True, "string_type"),
        ("text", None, "string_type"),
        ("text", [1], "string_type"),
        ("count", 5.5, "int_from_float"),
        ("count", "5.5", "int_parsing"),
        ("count", "1e3", "int_parsing"),
        ("count", "", "int_parsing"),
        ("count", None, "int_type"),
        ("count", float("inf"), "finite_number"),
        ("count", 0, "greater_than"),
        ("at_least", 0, "greater_than_equal"),
        ("flag", "maybe", "bool_parsing"),
        ("flag", " true ", "bool_parsing"),
        ("flag", 2, "bool_parsing"),
        ("flag", 0.5, "bool_type"),
        ("flag", None, "bool_type"),
        ("path", 5, "path_type"),
        ("names", "ab", "tuple_type"),
        ("names", {"a": 1}, "tuple_type"),
        ("env", [], "dict_type"),
        ("kind", "website", "literal_error"),
        ("inner", "x", "model_type"),
    ],
)
def test_refusals_name_the_problem_and_the_key(field, given, kind):
    assert errors_of(Sample, {field: given}) == [(kind, (field,))]


def test_every_problem_is_reported_with_its_location():
    found = errors_of(
        Sample,
        {
            "names": ["ok", True],
            "env": {"A": None},
            "inners": {"one": {"from": "mars"}, "two": {"url": "u", "extra": 1}},
            "either": [1],
            "unknown": 1,
        },
    )
    assert found == [
        ("string_type", ("names", 1)),
        ("string_type", ("env", "A")),
        ("int_type", ("either", "int")),
        ("string_type", ("either", "str")),
        ("missing", ("inners", "one", "url")),
        ("literal_error", ("inners", "one", "from")),
        ("extra_forbidden", ("inners", "two", "extra")),
        ("extra_forbidden", ("unknown",)),
    ]


def test_error_details_carry_input_and_context():
    with pytest.raises(ValidationError) as caught:
        Sample.model_validate({"count": "0", "kind": "website"})
    by_type = {e["type"]: e for e in caught.value.errors()}
    assert by_type["greater_than"]["input"] == "0"
    assert by_type["greater_than"]["ctx"] == {"gt": 0}
    assert by_type["literal_error"]["ctx"] == {"expected": "'api' or 'etl'"}
    assert "count" in str(caught.value)


def test_alias_and_attribute_name_are_both_accepted():
    assert Inner.model_validate({"url": "u", "from": "controller"}).from_ == "controller"
    assert Inner.model_validate({"url": "u", "from_": "controller"}).from_ == "controller"


def test_defaults_are_not_shared_between_instances():
    first, second = Sample.model_validate({}), Sample.model_validate({})
    assert first.env == {} and first.env is not second.env


class Validated(Model):
    name: str
    tags: tuple[str, ...] = ()
    base: str = ""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("tags", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        if not value:
            raise ValueError("a name cannot be empty")
        return value.lower()

    @field_validator("base", mode="before")
    @classmethod
    def _from_context(cls, value: Any, info: ValidationInfo) -> Any:
        return f"{(info.context or {}).get('prefix', '')}{value}"


def test_validators_run_before_and_after_the_type_check():
    item = Validated.model_validate("NAME")
    assert item.name == "name"
    assert Validated.model_validate({"name": "x", "tags": "one"}).tags == ("one",)
    assert Validated.model_validate({"name": "x", "base": "b"}, context={"prefix": "/p/"}).base == (
        "/p/b"
    )


def test_a_validator_error_is_a_value_error_at_its_key():
    with pytest.raises(ValidationError) as caught:
        Validated.model_validate({"name": ""})
    (error,) = caught.value.errors()
    assert error["type"] == "value_error"
    assert error["loc"] == ("name",)
    assert str(error["ctx"]["error"]) == "a name cannot be empty"


def test_an_after_validator_does_not_run_on_a_refused_value():
    assert errors_of(Validated, {"name": ["x"]}) == [("string_type", ("name",))]


def test_records_are_frozen_comparable_hashable_and_picklable():
    one = Inner(url="u")
    assert one == Inner(url="u") and one != Inner(url="v")
    assert hash(one) == hash(Inner(url="u"))
    assert {one, Inner(url="u")} == {one}
    with pytest.raises(AttributeError, match="frozen"):
        one.url = "v"
    assert pickle.loads(pickle.dumps(one)) == one
    assert repr(one) == "Inner(url='u', from_='host')"
    with pytest.raises(ValidationError):
        Inner(url=["u"])


def test_dump_python_json_aliases_exclusions():
    item = Sample.model_validate(
        {
            "path": "p",
            "names": ["a"],
            "inner": {"url": "u"},
            "anything": {"when": datetime.date(2026, 1, 2), "list": ("x",)},
        }
    )
    python = item.model_dump()
    assert python["path"] == Path("p")
    assert python["names"] == ("a",)
    assert python["inner"] == {"url": "u", "from_": "host"}
    as_json = item.model_dump(mode="json", by_alias=True, exclude={"text"})
    assert "text" not in as_json
    assert as_json["path"] == "p"
    assert as_json["names"] == ["a"]
    assert as_json["inner"] == {"url": "u", "from": "host"}
    assert as_json["anything"] == {"when": "2026-01-02", "list": ["x"]}
    assert "either" not in item.model_dump(exclude_none=True)


def test_an_annotation_the_engine_cannot_check_is_refused():
    class Odd(Model):
        value: set[str]

    with pytest.raises(TypeError, match=r"Odd\.value"):
        Odd.model_validate({"value": ["a"]})


def test_loading_the_config_imports_only_click_yaml_and_the_standard_library():
    # Every command loads the config first: what it imports is paid by every command.
    config = Path(__file__).resolve().parents[2] / "examples" / "fraises.yaml"
    code = (
        "import sys, fraisier.cli, fraisier.config\n"
        f"fraisier.config.load_config({str(config)!r}, environ={{}})\n"
        "names = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)\n"
        "print(' '.join(sorted(n for n in names if not n.startswith('_'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # cython_runtime comes with PyYAML's C extension when it is built.
    assert set(out.stdout.split()) - {"cython_runtime"} == {"click", "fraisier", "yaml"}
