"""The provider interface: `GitProvider`, the normalised `WebhookEvent`, and shared checks.

A provider turns raw request bytes and headers into a `WebhookEvent`. The signature is
checked on the raw bytes before any JSON is parsed, and every string that later reaches
git (ref names, commit ids) is validated here so that nothing from outside can become a
git option.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import hmac
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar
from urllib.parse import parse_qs

from fraisier.errors import ConfigError, WebhookError

EVENT_TYPES = ("push", "tag_push", "branch_delete", "ping", "other")
ZERO_SHA = "0" * 40

_SHA_RE = re.compile(r"[0-9a-fA-F]{40}(?:[0-9a-fA-F]{24})?")
_HEX_RE = re.compile(r"[0-9a-fA-F]*")
# Characters git refuses in ref names (git-check-ref-format rules 3-5 and 10).
_REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_DELIVERY_RE = re.compile(r"[\x21-\x7e]{1,200}")
_MAX_REF_LENGTH = 1024


# ---------------------------------------------------------------------------
# Headers


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive view of request headers from any mapping or pair list."""

    __slots__ = ("_items",)

    def __init__(self, headers: Mapping[str, Any] | Iterable[tuple[Any, Any]] | None = None):
        if isinstance(headers, Headers):
            self._items: dict[str, tuple[str, str]] = headers._items
            return
        pairs = headers.items() if hasattr(headers, "items") else (headers or ())
        items: dict[str, tuple[str, str]] = {}
        for raw_key, raw_value in pairs:
            key = _header_text(raw_key, "name")
            value = _header_text(raw_value, key)
            items[key.lower()] = (key, value.strip())
        self._items = items

    @classmethod
    def from_environ(cls, environ: Mapping[str, Any]) -> Headers:
        """The request headers of a WSGI environ, named as werkzeug names them."""
        items: dict[str, tuple[str, str]] = {}
        for raw_key, raw_value in environ.items():
            names = _ENVIRON_NAMES.get(raw_key)
            if names is None:
                names = _environ_names(raw_key)
            if not names or (raw_key in _ENVIRON_BODY_KEYS and not raw_value):
                continue
            key, lower = names
            value = raw_value if isinstance(raw_value, str) else _header_text(raw_value, key)
            items[lower] = (key, value.strip())
        view = cls.__new__(cls)
        view._items = items
        return view

    def __getitem__(self, key: str) -> str:
        if not isinstance(key, str):
            raise KeyError(key)
        return self._items[key.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (original for original, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items

    def get(self, key: str, default: Any = None) -> Any:
        """The header's value (possibly empty), or `default` when it is absent."""
        found = self._items.get(key.lower()) if isinstance(key, str) else None
        return default if found is None else found[1]

    def value(self, name: str) -> str | None:
        """Return the header's value, or None when it is absent or empty."""
        found = self._items.get(name.lower())
        return found[1] if found and found[1] else None

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


# The body's headers have keys of their own in a WSGI environ (PEP 3333); werkzeug ignores
# HTTP_ copies of them, and so does Headers.from_environ.
_ENVIRON_BODY_KEYS = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})
_ENVIRON_HTTP_BODY_KEYS = frozenset({"HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"})
# Environ key -> (header name, its lower case), or () for keys that are not headers: the
# same few keys come with every request. Header names come from outside: bounded.
_ENVIRON_NAMES: dict[str, tuple[str, str] | tuple[()]] = {}
_ENVIRON_NAMES_MAX = 512


def _environ_names(raw_key: str) -> tuple[str, str] | tuple[()]:
    """The header an environ key holds, named as werkzeug names it; () when none."""
    names: tuple[str, str] | tuple[()] = ()
    if raw_key.startswith("HTTP_") and raw_key not in _ENVIRON_HTTP_BODY_KEYS:
        key = raw_key[5:].replace("_", "-").title()
        names = (key, key.lower())
    elif raw_key in _ENVIRON_BODY_KEYS:
        key = raw_key.replace("_", "-").title()
        names = (key, key.lower())
    if len(_ENVIRON_NAMES) < _ENVIRON_NAMES_MAX:
        _ENVIRON_NAMES[raw_key] = names
    return names


def _header_text(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, str):
        return value
    raise WebhookError(f"header {what} is not text ({type(value).__name__})", 400)


# ---------------------------------------------------------------------------
# Validation of strings that come from outside


def _shown(value: str, limit: int = 60) -> str:
    """Short repr of an outside value for an error message."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def validate_sha(value: Any, where: str) -> str:
    """Return a lowercase 40- or 64-hex commit id, or raise WebhookError(400) naming `where`."""
    if not isinstance(value, str):
        raise WebhookError(f"{where} must be a commit id string, got {_type_name(value)}", 400)
    if not _SHA_RE.fullmatch(value):
        raise WebhookError(
            f"{where} is not a commit id (40 or 64 hexadecimal digits): {_shown(value)}", 400
        )
    return value.lower()


# Pushes name the same few branches over and over; each delivery checks its ref several
# times (the payload's ref, its branch, the event's fields).
@functools.lru_cache(maxsize=1024)
def ref_name_problem(name: str) -> str | None:
    """Say why `name` is not an acceptable git ref name, or None when it is."""
    if not name:
        return "it is empty"
    if len(name) > _MAX_REF_LENGTH:
        return f"it is longer than {_MAX_REF_LENGTH} characters"
    if name.startswith("-"):
        return "it starts with '-'"
    bad = _REF_FORBIDDEN_RE.search(name)
    if bad:
        return f"it contains the forbidden character {bad.group()!r}"
    if name == "@":
        return "it is '@'"
    for needle in ("..", "@{", "//"):
        if needle in name:
            return f"it contains {needle!r}"
    if name.startswith("/") or name.endswith("/"):
        return "it starts or ends with '/'"
    if name.endswith("."):
        return "it ends with '.'"
    for part in name.split("/"):
        if part.startswith("."):
            return "a component starts with '.'"
        if part.endswith(".lock"):
            return "a component ends with '.lock'"
    return None


def validate_ref_name(value: Any, where: str) -> str:
    """Return `value` if it is a safe git ref or branch name, else raise WebhookError(400)."""
    if not isinstance(value, str):
        raise WebhookError(f"{where} must be a string, got {_type_name(value)}", 400)
    problem = ref_name_problem(value)
    if problem:
        raise WebhookError(f"{where} is not a valid git ref name ({problem}): {_shown(value)}", 400)
    return value


def validate_delivery_id(value: str, where: str) -> str:
    """Return a delivery id made of 1-200 printable ASCII characters, else raise 400."""
    if not _DELIVERY_RE.fullmatch(value):
        raise WebhookError(
            f"{where} is not a delivery id (1-200 printable ASCII characters): {_shown(value)}",
            400,
        )
    return value


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


# ---------------------------------------------------------------------------
# JSON


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every body: json.loads builds a new one per call when given options.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@functools.cache
def _fast_loads() -> Callable[[bytes | bytearray | str], Any] | None:
    """orjson.loads, imported on the first body rather than by every command; None without it."""
    try:
        import orjson
    except ImportError:
        return None
    return orjson.loads


def _decode_json(body: bytes | bytearray | str) -> Any:
    # orjson parses a push payload in about a third of the time. It refuses a little more than
    # json does (lone surrogates, a byte order mark, numbers beyond a double, UTF-16 and -32,
    # very deep nesting): those bodies go to json, which gives what it always gave, the same
    # value or the same error. Its one other difference: an integer beyond 64 bits becomes a
    # float, and no field read from a payload is a number.
    fast = _fast_loads()
    if fast is not None:
        try:
            return fast(body)
        except ValueError:
            pass
    if isinstance(body, bytes | bytearray):
        # What json.loads does with bytes: UTF-8, -16 or -32, told apart by the first bytes.
        return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    return json.loads(body, parse_constant=_reject_constant)


FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


def is_form(headers: Headers) -> bool:
    """Whether the delivery says its body is form-encoded rather than JSON."""
    content_type = headers.value("Content-Type") or ""
    return content_type.partition(";")[0].strip().lower() == FORM_CONTENT_TYPE


def form_payload(body: bytes, provider: str) -> bytes:
    """The JSON in the `payload` field of a form-encoded body; WebhookError(400) otherwise."""
    try:
        fields = parse_qs(
            body.decode("ascii"), strict_parsing=True, errors="strict", max_num_fields=4
        )
    except (UnicodeDecodeError, ValueError):
        raise WebhookError(
            f"{provider} webhook body is not a valid form ({FORM_CONTENT_TYPE}); choose the "
            "content type application/json in the webhook's settings",
            400,
        ) from None
    values = fields.get("payload", [])
    if len(values) != 1 or len(fields) != 1:
        raise WebhookError(
            f"{provider} webhook form body must hold exactly one field, payload, with the "
            f"JSON; got fields {', '.join(sorted(fields)) or 'none'}",
            400,
        )
    return values[0].encode("utf-8")


def load_json_object(body: bytes, provider: str) -> dict[str, Any]:
    """Decode a webhook body that must be a JSON object; raise WebhookError(400) otherwise."""
    if not body:
        raise WebhookError(f"{provider} webhook body is empty; a JSON object is expected", 400)
    try:
        data = _decode_json(body)
    except RecursionError:
        raise WebhookError(
            f"{provider} webhook body is nested too deeply to be a push payload", 400
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        # The decoder's message gives a position, never the body itself.
        raise WebhookError(f"{provider} webhook body is not valid JSON: {exc}", 400) from None
    if not isinstance(data, dict):
        raise WebhookError(
            f"{provider} webhook body is a JSON {_type_name(data)}; a JSON object is expected", 400
        )
    return data


_PATH_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@functools.lru_cache(maxsize=512)
def _path_steps(path: str) -> tuple[tuple[str | None, int], ...]:
    """("a.b[0]") -> (("a", 0), ("b", 0), (None, 0)): keys, or None and a list index."""
    return tuple(
        (m.group(1), 0) if m.group(1) is not None else (None, int(m.group(2)))
        for m in _PATH_RE.finditer(path)
    )


class Payload:
    """Typed access to a decoded payload: every failure names the field path and answers 400."""

    __slots__ = ("data", "provider")

    def __init__(self, data: Mapping[str, Any], provider: str):
        self.data = data
        self.provider = provider

    def get(self, path: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
        """Value at a dotted `path` ("a.b[0].c") checked against `kind`; None if absent/null."""
        node: Any = self.data
        # The usual path, keys through plain dicts, walked without a check that cannot fail;
        # anything else is walked again by _walk, which names what is wrong.
        for key, _ in _path_steps(path):
            if key is None or type(node) is not dict:
                return self._walk(path, kind, required)
            node = node.get(key)
            if node is None:
                break
        # The usual value, of exactly the type asked for, needs no more checks either.
        return node if type(node) is kind else self._checked(node, path, kind, required)

    def _walk(self, path: str, kind: type | tuple[type, ...], required: bool) -> Any:
        """get() through lists and whatever else the payload holds."""
        steps = _path_steps(path)
        node: Any = self.data
        for done, (key, position) in enumerate(steps):
            if node is None:
                break
            if key is not None:
                if not isinstance(node, dict):
                    raise self.error(
                        f"field {_walked(steps[:done])} must be an object, got {_type_name(node)}"
                    )
                node = node.get(key)
            else:
                if not isinstance(node, list):
                    raise self.error(
                        f"field {_walked(steps[:done])} must be an array, got {_type_name(node)}"
                    )
                node = node[position] if position < len(node) else None
        return node if type(node) is kind else self._checked(node, path, kind, required)

    def _checked(self, node: Any, path: str, kind: type | tuple[type, ...], required: bool) -> Any:
        """The value found at `path`, checked against `kind`."""
        if node is None:
            if required:
                raise self.error(f"is missing the field {path}")
            return None
        # bool is an int subclass; a boolean where a number is expected is still wrong.
        if not isinstance(node, kind) or (isinstance(node, bool) and bool not in _kinds(kind)):
            raise self.error(
                f"field {path} must be {_kind_name(kind)}, got {_type_name(node)}",
            )
        return node

    def text(self, path: str, *, required: bool = False) -> str | None:
        """String at `path`."""
        return self.get(path, str, required=required)

    def sha(self, path: str, *, required: bool = False) -> str | None:
        """Commit id at `path`, validated."""
        value = self.text(path, required=required)
        return None if value is None else validate_sha(value, self.where(path))

    def ref(self, path: str, *, required: bool = False) -> str | None:
        """Git ref or branch name at `path`, validated."""
        value = self.text(path, required=required)
        return None if value is None else validate_ref_name(value, self.where(path))

    def listed_message(self, path: str, commit: str) -> str | None:
        """Message of the last entry of the commit list at `path` whose id is `commit`."""
        message = None
        for index, entry in enumerate(self.get(path, list) or ()):
            # A push lists up to 20 commits: the usual entry, an object whose id is a
            # string, is read directly; anything else goes through text(), which names
            # what is wrong.
            entry_id = entry.get("id") if type(entry) is dict else None
            if type(entry_id) is not str:
                entry_id = self.text(f"{path}[{index}].id")
            if entry_id is not None and entry_id.lower() == commit:
                message = self.text(f"{path}[{index}].message")
        return message

    def where(self, path: str) -> str:
        """How an error names a field of this payload."""
        return f"{self.provider} payload field {path}"

    def error(self, problem: str) -> WebhookError:
        """A 400 error about this payload."""
        return WebhookError(f"{self.provider} payload {problem}", 400)


def _walked(steps: Iterable[tuple[str | None, int]]) -> str:
    """The path of `steps` as Payload.get names it in errors: "a.b[0]"."""
    walked = ""
    for key, position in steps:
        if key is not None:
            walked = f"{walked}.{key}" if walked else key
        else:
            walked = f"{walked}[{position}]"
    return walked


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", dict: "an object", list: "an array", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in _kinds(kind))


# ---------------------------------------------------------------------------
# The event


@dataclass(frozen=True)
class WebhookEvent:
    """Normalised webhook delivery from any Git provider.

    `commit` is the commit the push carried (never a branch head looked up later);
    `reason` says why the delivery deploys nothing, when it deploys nothing.
    `commit_sha` and `sender` are the earlier names of `commit` and `pusher` and stay in
    sync with them, so providers written against either name keep working.
    """

    event_type: str = "other"
    provider: str = "unknown"
    branch: str | None = None
    commit_sha: str | None = None
    sender: str | None = None
    repository: str | None = None
    raw_payload: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    is_push: bool = False
    is_tag: bool = False
    is_merge_request: bool = False
    is_ping: bool = False
    delivery_id: str | None = None
    ref: str | None = None
    tag: str | None = None
    commit: str | None = None
    before: str | None = None
    clone_url: str | None = None
    pusher: str | None = None
    commit_message: str | None = None
    is_deletion: bool = False
    reason: str | None = None

    def __post_init__(self) -> None:
        # Every delivery builds one: fields are read once into locals and set with the
        # C-level setter (the dataclass is frozen).
        put = object.__setattr__
        event_type = self.event_type
        if not isinstance(event_type, str) or not event_type:
            raise WebhookError("WebhookEvent.event_type must be a non-empty string", 400)
        commit = _merge_alias(self.commit, self.commit_sha, "commit", "commit_sha")
        pusher = _merge_alias(self.pusher, self.sender, "pusher", "sender")
        put(self, "pusher", pusher)
        put(self, "sender", pusher)

        if commit is not None:
            commit = validate_sha(commit, "WebhookEvent.commit")
        put(self, "commit", commit)
        put(self, "commit_sha", commit)
        if self.before is not None:
            put(self, "before", validate_sha(self.before, "WebhookEvent.before"))
        ref, branch, tag = self.ref, self.branch, self.tag
        if ref is not None:
            validate_ref_name(ref, "WebhookEvent.ref")
        if branch is not None:
            validate_ref_name(branch, "WebhookEvent.branch")
        if tag is not None:
            validate_ref_name(tag, "WebhookEvent.tag")
        if ref is not None and branch is None and tag is None:
            if ref.startswith("refs/heads/"):
                branch = ref[len("refs/heads/") :]
                put(self, "branch", branch)
            elif ref.startswith("refs/tags/"):
                tag = ref[len("refs/tags/") :]
                put(self, "tag", tag)
        if ref is None:
            if tag is not None:
                put(self, "ref", f"refs/tags/{tag}")
            elif branch is not None:
                put(self, "ref", f"refs/heads/{branch}")
        if self.delivery_id is not None:
            validate_delivery_id(self.delivery_id, "WebhookEvent.delivery_id")

        put(self, "is_push", bool(self.is_push or event_type in ("push", "tag_push")))
        put(self, "is_tag", bool(self.is_tag or tag is not None))
        put(self, "is_ping", bool(self.is_ping or event_type == "ping"))
        put(
            self,
            "is_merge_request",
            bool(self.is_merge_request or event_type in ("merge_request", "pull_request")),
        )
        put(self, "is_deletion", bool(self.is_deletion or event_type == "branch_delete"))
        if self.reason is None:
            put(self, "reason", self._why_not_deployable())

    def _why_not_deployable(self) -> str | None:
        if self.event_type not in ("push", "tag_push"):
            return f"{self.event_type} events do not deploy"
        if self.is_deletion:
            return f"{self.ref or 'the ref'} was deleted; nothing to deploy"
        if self.commit is None:
            return "the push names no commit id; nothing to deploy"
        if self.commit.strip("0") == "":
            return "the pushed commit id is all zeros; nothing to deploy"
        return None

    @property
    def is_pull_request(self) -> bool:
        """Alias of is_merge_request."""
        return self.is_merge_request

    @property
    def should_deploy(self) -> bool:
        """True when this delivery asks for a deployment of `commit`."""
        return self.reason is None and self._why_not_deployable() is None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form, without the raw payload and the legacy aliases."""
        data = asdict(replace(self, raw_payload=None))
        for legacy in ("raw_payload", "commit_sha", "sender"):
            data.pop(legacy)
        return data


def _merge_alias(new: Any, old: Any, new_name: str, old_name: str) -> Any:
    if new is not None and old is not None and new != old:
        raise WebhookError(
            f"WebhookEvent got {new_name}={new!r} and {old_name}={old!r}; they name the same "
            f"thing, give one",
            400,
        )
    return new if new is not None else old


# ---------------------------------------------------------------------------
# Providers


def _secret_list(value: Any, provider: str) -> tuple[bytes, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        value = [value]
    wrong = ConfigError(
        f"webhook_secret of git provider {provider} must be a string or a list of strings "
        f"(several while rotating secrets)"
    )
    if not isinstance(value, list | tuple):
        raise wrong
    secrets = []
    for item in value:
        if isinstance(item, str):
            item = item.encode("utf-8")
        if not isinstance(item, bytes):
            raise wrong
        if item:
            secrets.append(item)
    return tuple(secrets)


class GitProvider(ABC):
    """A Git hosting platform's webhook dialect.

    Subclass it, set `name`, implement `verify_webhook_signature` and `parse_webhook_event`,
    and pass the class to `register_provider`. Set `event_header` (or override `detect`)
    to make deliveries from it recognisable by their headers.
    """

    name: ClassVar[str] = ""
    signature_header: ClassVar[str | None] = None
    event_header: ClassVar[str | None] = None
    delivery_header: ClassVar[str | None] = None
    default_base_url: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, Any] | None = None, **options: Any):
        merged = dict(config or {})
        merged.update(options)
        self.config = merged
        secret = merged.get("webhook_secret")
        if secret is None:
            secret = merged.get("secret")
        self.webhook_secret = secret
        self.secrets = _secret_list(secret, self.name)
        allow_sha1 = merged.get("allow_sha1", False)
        if not isinstance(allow_sha1, bool):
            # A string such as "false" must not silently switch the weaker check on.
            raise ConfigError(f"allow_sha1 of git provider {self.name} must be true or false")
        self.allow_sha1 = allow_sha1

    # -- what a subclass provides ------------------------------------------

    @abstractmethod
    def verify_webhook_signature(self, payload: bytes, headers: Mapping[str, str]) -> bool:
        """True when the raw body `payload` carries a valid signature for our secret(s)."""

    @abstractmethod
    def parse_webhook_event(self, headers: Mapping[str, str], payload: dict) -> WebhookEvent:
        """Normalise a decoded JSON object into a WebhookEvent."""

    @classmethod
    def detect(cls, headers: Mapping[str, str]) -> bool:
        """True when `headers` look like a delivery from this provider."""
        return cls.event_header is not None and Headers(headers).value(cls.event_header) is not None

    @classmethod
    def sign(
        cls,
        body: bytes,
        secret: str,
        *,
        delivery_id: str | None = None,
        event: str | None = None,
    ) -> dict[str, str]:
        """Headers this provider would send with `body` signed by `secret`."""
        raise NotImplementedError(f"provider {cls.name!r} does not define how it signs a delivery")

    # -- the pipeline ---------------------------------------------------------

    def check_signature(self, payload: bytes, headers: Mapping[str, str]) -> None:
        """Raise WebhookError(401) unless the raw body is signed with a configured secret."""
        self.require_secret()
        if not self.verify_webhook_signature(payload, headers):
            header = self.signature_header or "signature"
            raise WebhookError(
                f"{self.name} webhook {header} does not verify against the configured secret; "
                f"check the secret on both sides",
                401,
            )

    def parse_webhook_events(self, headers: Mapping[str, str], payload: dict) -> list[WebhookEvent]:
        """Every event in one delivery (one per ref for providers that batch ref changes)."""
        return [self.parse_webhook_event(headers, payload)]

    def delivery_id(self, headers: Mapping[str, str], body: bytes) -> str:
        """The provider's delivery id, or a hash of the body when it sends none."""
        if self.delivery_header:
            value = Headers(headers).value(self.delivery_header)
            if value is not None:
                return validate_delivery_id(value, f"{self.name} webhook {self.delivery_header}")
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def handle_all(self, body: bytes, headers: Mapping[str, Any]) -> list[WebhookEvent]:
        """Verify then parse a delivery: raw bytes and headers in, events out."""
        body = _as_bytes(body)
        view = Headers(headers)
        self.check_signature(body, view)
        payload = self.load_payload(body, view)
        events = self.parse_webhook_events(view, payload)
        if not events:
            raise WebhookError(f"{self.name} webhook delivery yielded no event", 400)
        delivery = self.delivery_id(view, body)
        result = []
        for event in events:
            if not isinstance(event, WebhookEvent):
                raise TypeError(
                    f"{type(self).__name__}.parse_webhook_event must return a WebhookEvent"
                )
            if event.delivery_id is None or event.raw_payload is None:
                # delivery_id() validated the id and the payload needs no check: a copy
                # with the two fields set spares replace()'s second run of every check.
                event = _shallow_copy(event)
                if event.delivery_id is None:
                    object.__setattr__(event, "delivery_id", delivery)
                if event.raw_payload is None:
                    object.__setattr__(event, "raw_payload", payload)
            result.append(event)
        return result

    def handle(self, body: bytes, headers: Mapping[str, Any]) -> WebhookEvent:
        """Verify then parse a delivery into one event (the first that deploys, if any)."""
        events = self.handle_all(body, headers)
        return next((e for e in events if e.should_deploy), events[0])

    def load_payload(self, body: bytes, headers: Headers) -> dict[str, Any]:
        """Decode the (already verified) body."""
        return load_json_object(body, self.name)

    # -- signature helpers for subclasses ----------------------------------

    def require_secret(self) -> None:
        """Raise WebhookError(401) when no secret is configured: unsigned pushes never pass."""
        if not self.secrets:
            raise WebhookError(
                f"no webhook secret is configured for provider {self.name}; set webhook_secret "
                f"for it (deliveries are never accepted unsigned)",
                401,
            )

    def check_hmac(
        self,
        body: bytes,
        headers: Mapping[str, str],
        header: str,
        *,
        algorithm: str = "sha256",
        prefix: str | None = "sha256=",
    ) -> None:
        """Check a hex HMAC of `body` in `header` (with `prefix`, or bare hex when None)."""
        self.require_secret()
        raw = Headers(headers).get(header)
        if raw is None:
            raise WebhookError(f"{self.name} webhook {header} header is missing", 401)
        if not raw:
            raise WebhookError(f"{self.name} webhook {header} header is empty", 401)
        digest = raw
        if prefix is not None:
            if "=" not in raw:
                raise WebhookError(
                    f"{self.name} webhook {header} must look like '{prefix}<hex>'; it has no "
                    f"'{prefix}' prefix",
                    401,
                )
            label, digest = raw.split("=", 1)
            if f"{label.lower()}=" != prefix:
                shown = repr(label) if re.fullmatch(r"[A-Za-z0-9-]{1,12}", label) else "another"
                raise WebhookError(
                    f"{self.name} webhook {header} uses the {shown} algorithm; '{prefix}' is "
                    f"required",
                    401,
                )
        elif "=" in raw:
            raise WebhookError(
                f"{self.name} webhook {header} must be bare hex without an 'algorithm=' prefix",
                401,
            )
        size = _hex_size(algorithm)
        if not _HEX_RE.fullmatch(digest):
            raise WebhookError(f"{self.name} webhook {header} is not hexadecimal", 401)
        if len(digest) != size:
            raise WebhookError(
                f"{self.name} webhook {header} has {len(digest)} hex digits; an HMAC-"
                f"{algorithm.upper()} has {size} (truncated or wrong algorithm)",
                401,
            )
        if not self.hmac_matches(body, digest, algorithm):
            raise WebhookError(
                f"{self.name} webhook {header} does not match the body signed with the "
                f"configured secret; check the secret on both sides",
                401,
            )

    def hmac_matches(self, body: bytes, hex_digest: str, algorithm: str) -> bool:
        """Constant-time comparison of `hex_digest` against the HMAC under every secret."""
        given = hex_digest.lower().encode("ascii")
        matched = False
        for secret in self.secrets:
            # hmac.digest is the one-shot C function: no HMAC object per delivery.
            expected = hmac.digest(secret, body, algorithm).hex().encode("ascii")
            # No early exit: every secret is tried, so timing does not tell which one matched.
            matched |= hmac.compare_digest(expected, given)
        return matched

    def token_matches(self, token: str) -> bool:
        """Constant-time comparison of a shared token against every secret."""
        given = token.encode("utf-8")
        matched = False
        for secret in self.secrets:
            matched |= hmac.compare_digest(secret, given)
        return matched

    # -- names and URLs (kept from the first provider interface) ------------

    def get_signature_header_name(self) -> str | None:
        """Header that carries the signature."""
        return self.signature_header

    def get_event_header_name(self) -> str | None:
        """Header that carries the event type."""
        return self.event_header

    def get_default_base_url(self) -> str:
        """Base URL of the hosted service."""
        return self.default_base_url

    def get_clone_url(self, repository: str) -> str:
        """Clone URL for `owner/repo` on the configured (or default) base URL."""
        base_url = self.config.get("base_url") or self.get_default_base_url()
        return f"{base_url.rstrip('/')}/{repository}.git"


def _shallow_copy(event: WebhookEvent) -> WebhookEvent:
    """copy.copy(event), without copy's generic protocol for the plain WebhookEvent."""
    if type(event) is not WebhookEvent:
        return copy.copy(event)
    clone = object.__new__(WebhookEvent)
    clone.__dict__.update(event.__dict__)
    return clone


def _as_bytes(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    raise TypeError(f"webhook body must be bytes, got {type(body).__name__}")


@functools.lru_cache(maxsize=16)
def _hex_size(algorithm: str) -> int:
    """Hex digits of a digest of `algorithm`."""
    return hashlib.new(algorithm).digest_size * 2


def hmac_hex(secret: str | bytes, body: bytes, algorithm: str = "sha256") -> str:
    """Hex HMAC of `body` under `secret`."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(key, _as_bytes(body), algorithm).hexdigest()


# ---------------------------------------------------------------------------
# Shared parsing for the GitHub-style push payload (GitHub, Gitea, Forgejo)


def split_ref(ref: str) -> tuple[str | None, str | None]:
    """(branch, tag) named by a full ref; both None for other refs."""
    if ref.startswith("refs/heads/"):
        return ref[len("refs/heads/") :], None
    if ref.startswith("refs/tags/"):
        return None, ref[len("refs/tags/") :]
    return None, None


def check_short_ref(value: str | None, where: str) -> None:
    """Validate the branch or tag part of a full ref."""
    if value is not None:
        validate_ref_name(value, where)


class BuiltinProvider(GitProvider):
    """A provider shipped with Fraisier: it overrides check_signature, which says why a
    signature fails, and answers the custom-provider API's yes/no question from it."""

    def verify_webhook_signature(self, payload: bytes, headers: Mapping[str, str]) -> bool:
        """True when the delivery's signature verifies."""
        try:
            self.check_signature(payload, headers)
        except WebhookError:
            return False
        return True
