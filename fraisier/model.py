"""Frozen models validated from plain data, for the configuration.

A model is a class whose annotated fields say what each key of a mapping must hold. Validation
converts as YAML users expect (a number where a string is wanted becomes its text, "5" is the
integer 5, "yes" is true) and refuses the rest; it reports every problem at once, each with its
location, so that config.py can name the key path and line. Field validators run before or
after the type check of their field, model validators before any field is looked at.

Every command reads the configuration before it does anything else, so this module imports
only what the interpreter has already loaded: validation costs a few milliseconds, not the
quarter of a second a general-purpose validation library takes to import.
"""

from __future__ import annotations

import datetime
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Any, ClassVar

__all__ = [
    "Field",
    "Model",
    "ValidationError",
    "ValidationInfo",
    "field_validator",
    "model_validator",
]

Loc = tuple[str | int, ...]
_MISSING: Any = object()
_FAIL: Any = object()
_INT_TEXT_RE = re.compile(r"\s*([+-]?\d+(?:_\d+)*)(?:\.0*)?\s*")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


class ValidationError(ValueError):
    """Data that does not fit a model; `errors()` lists every problem with its location."""

    def __init__(self, title: str, errors: list[dict[str, Any]]) -> None:
        self.title = title
        self._errors = errors
        shown = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or '(root)'}: {e['msg']}" for e in errors
        )
        super().__init__(f"{len(errors)} problem(s) in {title}: {shown}")

    def errors(self, include_url: bool = False) -> list[dict[str, Any]]:
        """Each problem as a dict: type, loc, msg, input and ctx."""
        return [dict(e) for e in self._errors]


class ValidationInfo:
    """What a validator may ask about the validation under way: its context."""

    __slots__ = ("context",)

    def __init__(self, context: Any) -> None:
        self.context = context


class _FieldInfo(typing.NamedTuple):
    default: Any
    default_factory: Callable[[], Any] | None
    alias: str | None
    gt: int | None
    ge: int | None
    min_length: int | None


def Field(
    default: Any = _MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    alias: str | None = None,
    gt: int | None = None,
    ge: int | None = None,
    min_length: int | None = None,
) -> Any:
    """A field's default, the key it is read from, and bounds for its value."""
    return _FieldInfo(default, default_factory, alias, gt, ge, min_length)


def field_validator(*names: str, mode: str = "after") -> Callable[[Any], Any]:
    """Mark a classmethod as a validator of the named fields, run before or after their check."""
    if mode not in ("before", "after"):
        raise ValueError(f"field_validator mode must be 'before' or 'after', not {mode!r}")

    def mark(method: Any) -> Any:
        getattr(method, "__func__", method).__fraisier_validator__ = ("field", names, mode)
        return method

    return mark


def model_validator(*, mode: str) -> Callable[[Any], Any]:
    """Mark a classmethod as a validator of the whole input, run before the fields are read."""
    if mode != "before":
        raise ValueError("model_validator supports mode='before' only")

    def mark(method: Any) -> Any:
        getattr(method, "__func__", method).__fraisier_validator__ = ("model", (), mode)
        return method

    return mark


# --------------------------------------------------------------------------- errors


def _describe_type(kind: str) -> str:
    return {
        "string_type": "Input should be a valid string",
        "int_type": "Input should be a valid integer",
        "int_parsing": "Input should be a valid integer, unable to parse string as an integer",
        "int_from_float": "Input should be a valid integer, got a number with a fractional part",
        "finite_number": "Input should be a finite number",
        "bool_type": "Input should be a valid boolean",
        "bool_parsing": "Input should be a valid boolean, unable to interpret input",
        "path_type": "Input is not a valid path",
        "tuple_type": "Input should be a valid tuple",
        "dict_type": "Input should be a valid dictionary",
        "model_type": "Input should be a valid dictionary or instance of the model",
        "missing": "Field required",
        "extra_forbidden": "Extra inputs are not permitted",
        "too_short": "Input should have at least the required number of items",
    }.get(kind, kind)


def _error(errors: list, kind: str, loc: Loc, value: Any, msg: str | None = None, **ctx) -> Any:
    entry: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg or _describe_type(kind)}
    if value is not _MISSING:
        entry["input"] = value
    if ctx:
        entry["ctx"] = ctx
    errors.append(entry)
    return _FAIL


# --------------------------------------------------------------------------- types


class _Check:
    """Checks one value against one type, appending problems to `errors`."""

    def __call__(self, value: Any, loc: Loc, errors: list, info: ValidationInfo) -> Any:
        raise NotImplementedError

    def dump(self, value: Any, json: bool, alias: bool) -> Any:
        return value


class _Any(_Check):
    def __call__(self, value, loc, errors, info):
        return value

    def dump(self, value, json, alias):
        return _json_value(value) if json else value


class _Str(_Check):
    def __call__(self, value, loc, errors, info):
        if isinstance(value, str):
            return value
        # YAML reads `version: 1.10` as a number; where text is wanted, its text is meant.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return _error(errors, "string_type", loc, value)


class _Int(_Check):
    def __call__(self, value, loc, errors, info):
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                return _error(errors, "finite_number", loc, value)
            if not value.is_integer():
                return _error(errors, "int_from_float", loc, value)
            return int(value)
        if isinstance(value, str):
            match = _INT_TEXT_RE.fullmatch(value)
            if match:
                return int(match.group(1))
            return _error(errors, "int_parsing", loc, value)
        return _error(errors, "int_type", loc, value)


class _Bool(_Check):
    def __call__(self, value, loc, errors, info):
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            if value in (0, 1):
                return bool(value)
            kind = "bool_parsing" if isinstance(value, int) else "bool_type"
            return _error(errors, kind, loc, value)
        if isinstance(value, str):
            text = value.lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            return _error(errors, "bool_parsing", loc, value)
        return _error(errors, "bool_type", loc, value)


class _Path(_Check):
    def __call__(self, value, loc, errors, info):
        if isinstance(value, PurePath):
            return Path(value)
        if isinstance(value, str):
            return Path(value)
        return _error(errors, "path_type", loc, value)

    def dump(self, value, json, alias):
        return str(value) if json else value


class _Literal(_Check):
    def __init__(self, values: tuple) -> None:
        self.values = values
        shown = [repr(v) for v in values]
        self.expected = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"

    def __call__(self, value, loc, errors, info):
        for allowed in self.values:
            if value == allowed and type(value) is type(allowed):
                return allowed
        msg = f"Input should be {self.expected}"
        return _error(errors, "literal_error", loc, value, msg, expected=self.expected)


class _Optional(_Check):
    def __init__(self, inner: _Check) -> None:
        self.inner = inner

    def __call__(self, value, loc, errors, info):
        return None if value is None else self.inner(value, loc, errors, info)

    def dump(self, value, json, alias):
        return None if value is None else self.inner.dump(value, json, alias)


class _Union(_Check):
    """The first member the value already is, else the first that accepts it."""

    def __init__(self, members: list[tuple[str, type, _Check]]) -> None:
        self.members = members

    def __call__(self, value, loc, errors, info):
        for _name, exact, check in self.members:
            if type(value) is exact:
                return check(value, loc, errors, info)
        tried: list = []
        for name, _exact, check in self.members:
            attempt: list = []
            result = check(value, (*loc, name), attempt, info)
            if result is not _FAIL:
                return result
            tried += attempt
        errors += tried
        return _FAIL

    def dump(self, value, json, alias):
        return _json_value(value) if json else value


class _Tuple(_Check):
    def __init__(self, item: _Check) -> None:
        self.item = item

    def __call__(self, value, loc, errors, info):
        if not isinstance(value, list | tuple | set | frozenset):
            return _error(errors, "tuple_type", loc, value)
        before = len(errors)
        items = tuple(self.item(v, (*loc, i), errors, info) for i, v in enumerate(value))
        return _FAIL if len(errors) > before else items

    def dump(self, value, json, alias):
        items = [self.item.dump(v, json, alias) for v in value]
        return items if json else tuple(items)


class _Dict(_Check):
    def __init__(self, value_check: _Check) -> None:
        self.key = _Str()
        self.value = value_check

    def __call__(self, value, loc, errors, info):
        if not isinstance(value, Mapping):
            return _error(errors, "dict_type", loc, value)
        before = len(errors)
        out = {}
        for key, item in value.items():
            good_key = self.key(key, (*loc, key, "[key]"), errors, info)
            out[good_key] = self.value(item, (*loc, key), errors, info)
        return _FAIL if len(errors) > before else out

    def dump(self, value, json, alias):
        return {key: self.value.dump(item, json, alias) for key, item in value.items()}


class _Nested(_Check):
    def __init__(self, model: type[Model]) -> None:
        self.model = model

    def __call__(self, value, loc, errors, info):
        if isinstance(value, self.model):
            return value
        return self.model._validate(value, loc, errors, info)

    def dump(self, value, json, alias):
        return value._dump(json, alias)


def _json_value(value: Any) -> Any:
    """Plain data as JSON holds it: tuples and sets as lists, dates and paths as text."""
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_value(v) for v in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Model):
        return value._dump(True, True)
    return value


_SIMPLE: dict[Any, type[_Check]] = {str: _Str, int: _Int, bool: _Bool, Path: _Path, Any: _Any}


def _check_for(tp: Any, where: str) -> _Check:
    """The check of a type annotation; only the shapes the configuration uses."""
    if tp in _SIMPLE:
        return _SIMPLE[tp]()
    if isinstance(tp, type) and issubclass(tp, Model):
        return _Nested(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return _Literal(args)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            inner = _check_for(members[0], where)
        else:
            inner = _Union([(m.__name__, m, _check_for(m, where)) for m in members])
        return _Optional(inner) if len(members) < len(args) else inner
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _Tuple(_check_for(args[0], where))
    if origin is dict and args and args[0] is str:
        return _Dict(_check_for(args[1], where))
    raise TypeError(f"{where}: the model engine has no check for the annotation {tp!r}")


# --------------------------------------------------------------------------- models


class _ModelField:
    __slots__ = ("alias", "annotation", "check", "info", "key", "name")

    def __init__(self, name: str, annotation: Any, check: _Check, info: _FieldInfo) -> None:
        self.name = name
        self.annotation = annotation
        self.check = check
        self.info = info
        self.alias = info.alias
        self.key = info.alias or name

    def default(self) -> Any:
        if self.info.default_factory is not None:
            return self.info.default_factory()
        default = self.info.default
        # Mutable defaults are shared by nobody: each instance gets its own copy.
        if isinstance(default, dict | list | set):
            return type(default)(default)
        return default

    @property
    def required(self) -> bool:
        return self.info.default is _MISSING and self.info.default_factory is None

    def bounds(self, value: Any, given: Any, loc: Loc, errors: list) -> Any:
        """_FAIL when the checked value is out of bounds; the error shows what was given."""
        info = self.info
        if info.gt is not None and isinstance(value, int) and not value > info.gt:
            msg = f"Input should be greater than {info.gt}"
            return _error(errors, "greater_than", loc, given, msg, gt=info.gt)
        if info.ge is not None and isinstance(value, int) and not value >= info.ge:
            msg = f"Input should be greater than or equal to {info.ge}"
            return _error(errors, "greater_than_equal", loc, given, msg, ge=info.ge)
        if info.min_length is not None and value is not None and len(value) < info.min_length:
            return _error(errors, "too_short", loc, given, min_length=info.min_length)
        return value


def _call(method: Callable, value: Any, info: ValidationInfo, wants_info: bool) -> Any:
    return method(value, info) if wants_info else method(value)


def _wants_info(method: Any) -> bool:
    func = getattr(method, "__func__", method)
    return func.__code__.co_argcount >= 3


class Model:
    """A frozen record validated from a mapping: annotate fields, give defaults with Field()."""

    __fraisier_fields__: ClassVar[dict[str, _ModelField] | None] = None
    __fraisier_validators__: ClassVar[tuple]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Annotations are resolved on first use, when every model they name exists.
        cls.__fraisier_fields__ = None

    # -- schema ---------------------------------------------------------------
    @classmethod
    def _schema(cls) -> dict[str, _ModelField]:
        fields = cls.__dict__.get("__fraisier_fields__")
        if fields is not None:
            return fields
        hints = typing.get_type_hints(cls)
        fields = {}
        for name, tp in hints.items():
            if name.startswith("_") or typing.get_origin(tp) is ClassVar:
                continue
            given = getattr(cls, name, _MISSING)
            info = given if isinstance(given, _FieldInfo) else Field(given)
            fields[name] = _ModelField(name, tp, _check_for(tp, f"{cls.__name__}.{name}"), info)
        model_before, before, after = [], {}, {}
        for klass in reversed(cls.__mro__):
            for attr, raw in vars(klass).items():
                mark = getattr(getattr(raw, "__func__", raw), "__fraisier_validator__", None)
                if mark is None:
                    continue
                method = getattr(cls, attr)
                entry = (method, _wants_info(method))
                kind, names, mode = mark
                if kind == "model":
                    model_before.append(entry)
                    continue
                for field_name in names:
                    if field_name not in fields:
                        raise TypeError(f"{cls.__name__}.{attr} validates unknown {field_name!r}")
                    (before if mode == "before" else after).setdefault(field_name, []).append(entry)
        cls.__fraisier_validators__ = (model_before, before, after)
        cls.__fraisier_fields__ = fields
        return fields

    @classmethod
    def schema_fields(cls) -> dict[str, _ModelField]:
        """The fields by attribute name, each with its key (alias) and annotation."""
        return dict(cls._schema())

    # -- validation -----------------------------------------------------------
    @classmethod
    def model_validate(cls, data: Any, *, context: Any = None) -> Model:
        """An instance from a mapping; ValidationError listing every problem otherwise."""
        errors: list = []
        result = cls._validate(data, (), errors, ValidationInfo(context))
        if errors or result is _FAIL:
            raise ValidationError(cls.__name__, errors)
        return result

    @classmethod
    def _validate(cls, data: Any, loc: Loc, errors: list, info: ValidationInfo) -> Any:
        fields = cls._schema()
        model_before, before, after = cls.__fraisier_validators__
        for method, wants_info in model_before:
            try:
                data = _call(method, data, info, wants_info)
            except (ValueError, AssertionError) as exc:
                return _error(errors, "value_error", loc, data, f"Value error, {exc}", error=exc)
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            return _error(errors, "model_type", loc, data)
        start = len(errors)
        values: dict[str, Any] = {}
        for name, fld in fields.items():
            key = fld.key
            if key in data:
                value = data[key]
            elif fld.alias and name in data:
                value = data[name]
            elif fld.required:
                _error(errors, "missing", (*loc, key), data)
                continue
            else:
                values[name] = fld.default()
                continue
            values[name] = cls._field(fld, value, (*loc, key), errors, info, before, after)
        known = {fld.key for fld in fields.values()} | {
            name for name, fld in fields.items() if fld.alias
        }
        for key, value in data.items():
            if key not in known:
                _error(errors, "extra_forbidden", (*loc, key), value)
        if len(errors) > start:
            return _FAIL
        instance = object.__new__(cls)
        object.__setattr__(instance, "__dict__", values)
        return instance

    @staticmethod
    def _field(fld, value, loc, errors, info, before, after) -> Any:
        try:
            for method, wants_info in before.get(fld.name, ()):
                value = _call(method, value, info, wants_info)
        except (ValueError, AssertionError) as exc:
            return _error(errors, "value_error", loc, value, f"Value error, {exc}", error=exc)
        given = value
        value = fld.check(value, loc, errors, info)
        if value is _FAIL or fld.bounds(value, given, loc, errors) is _FAIL:
            return _FAIL
        try:
            for method, wants_info in after.get(fld.name, ()):
                value = _call(method, value, info, wants_info)
        except (ValueError, AssertionError) as exc:
            return _error(errors, "value_error", loc, value, f"Value error, {exc}", error=exc)
        return value

    def __init__(self, **data: Any) -> None:
        errors: list = []
        result = type(self)._validate(data, (), errors, ValidationInfo(None))
        if errors or result is _FAIL:
            raise ValidationError(type(self).__name__, errors)
        object.__setattr__(self, "__dict__", result.__dict__)

    # -- frozen record ----------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name} cannot be set")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name} cannot be deleted")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.__dict__.values())))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({shown})"

    def __copy__(self) -> Model:
        return self

    def __deepcopy__(self, memo: dict) -> Model:
        return self

    def __reduce__(self) -> tuple:
        return (_rebuild, (type(self), self.__dict__))

    # -- dumping ----------------------------------------------------------------
    def _dump(self, json: bool, alias: bool) -> dict[str, Any]:
        return {
            fld.key if alias else name: fld.check.dump(self.__dict__[name], json, alias)
            for name, fld in self._schema().items()
        }

    def model_dump(
        self,
        *,
        mode: str = "python",
        by_alias: bool = False,
        exclude: set[str] | frozenset[str] = frozenset(),
        exclude_none: bool = False,
    ) -> dict[str, Any]:
        """The fields as plain data; mode "json" gives lists and text where JSON needs them."""
        data = {}
        for name, fld in self._schema().items():
            if name in exclude:
                continue
            value = fld.check.dump(self.__dict__[name], mode == "json", by_alias)
            data[fld.key if by_alias else name] = value
        return _drop_none(data) if exclude_none else data


def _rebuild(cls: type[Model], values: dict[str, Any]) -> Model:
    instance = object.__new__(cls)
    object.__setattr__(instance, "__dict__", dict(values))
    return instance


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_drop_none(v) for v in data]
    if isinstance(data, tuple):
        return tuple(_drop_none(v) for v in data)
    return data
