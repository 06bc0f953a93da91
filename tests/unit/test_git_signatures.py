"""Signature checks and hostile input: every refusal has the right status and a precise reason."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from werkzeug.datastructures import Headers as WerkzeugHeaders

from fraisier.errors import WebhookError
from fraisier.git import get_provider, handle_webhook, sign_headers
from fraisier.git.base import Headers, load_json_object
from fraisier.git.signing import hmac_hex

SECRET = "s3cret-Δ"
SHA = "0123456789abcdef0123456789abcdef01234567"


def push_body(**overrides) -> bytes:
    """A minimal GitHub-style push body."""
    data = {
        "ref": "refs/heads/main",
        "before": "f" * 40,
        "after": SHA,
        "repository": {"full_name": "acme/api", "clone_url": "https://example.org/acme/api.git"},
        "pusher": {"name": "alice"},
        "head_commit": {"id": SHA, "message": "Fix the thing"},
    }
    data.update(overrides)
    return json.dumps(data).encode()


def refused(provider, body, headers, status, *, secret=SECRET, **opts) -> str:
    """Handle a delivery that must be refused; return the message."""
    with pytest.raises(WebhookError) as caught:
        get_provider(provider, webhook_secret=secret, **opts).handle(body, headers)
    assert caught.value.http_status == status, caught.value.message
    if isinstance(secret, str) and secret:
        assert secret not in caught.value.message
    return caught.value.message


def test_github_documented_self_check():
    body = b"Hello, World!"
    secret = "It's a Secret to Everybody"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert "sha256=" + hmac_hex(secret, body) == expected
    assert sign_headers("github", body, secret)["X-Hub-Signature-256"] == expected
    provider = get_provider("github", webhook_secret=secret)
    assert provider.verify_webhook_signature(body, {"X-Hub-Signature-256": expected})
    assert not provider.verify_webhook_signature(body + b" ", {"X-Hub-Signature-256": expected})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "X-Hub-Signature-256 header is missing"),
        ("", "X-Hub-Signature-256 header is empty"),
        ("   ", "X-Hub-Signature-256 header is empty"),
        ("TRUNCATE", "has 40 hex digits"),
        ("sha256=" + "zz" * 32, "is not hexadecimal"),
        ("sha256=" + "ab" * 40, "has 80 hex digits"),
        ("ab" * 32, "no 'sha256=' prefix"),
        ("sha1=" + "ab" * 20, "uses the 'sha1' algorithm"),
        ("sha512=" + "ab" * 64, "uses the 'sha512' algorithm"),
        ("<script>=" + "ab" * 32, "uses the another algorithm"),
        ("sha256=" + "0" * 64, "does not match"),
    ],
)
def test_github_malformed_signatures_refused_with_reason(value, reason):
    body = push_body()
    headers = sign_headers("github", body, SECRET)
    del headers["X-Hub-Signature"]
    if value is None:
        del headers["X-Hub-Signature-256"]
    elif value == "TRUNCATE":
        headers["X-Hub-Signature-256"] = headers["X-Hub-Signature-256"][:47]
    else:
        headers["X-Hub-Signature-256"] = value
    assert reason in refused("github", body, headers, 401)


def test_uppercase_hex_digest_is_accepted():
    body = push_body()
    headers = sign_headers("github", body, SECRET)
    headers["X-Hub-Signature-256"] = "sha256=" + hmac_hex(SECRET, body).upper()
    assert get_provider("github", webhook_secret=SECRET).handle(body, headers).commit == SHA


def test_github_sha1_only_refused_unless_allowed():
    body = push_body()
    headers = sign_headers("github", body, SECRET)
    del headers["X-Hub-Signature-256"]
    message = refused("github", body, headers, 401)
    assert "only the SHA-1 X-Hub-Signature" in message and "allow_sha1" in message
    event = get_provider("github", webhook_secret=SECRET, allow_sha1=True).handle(body, headers)
    assert event.commit == SHA
    headers["X-Hub-Signature"] = "sha1=" + "0" * 40
    assert "does not match" in refused("github", body, headers, 401, allow_sha1=True)


def test_github_bad_sha256_does_not_fall_back_to_valid_sha1():
    body = push_body()
    headers = sign_headers("github", body, SECRET)
    headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    refused("github", body, headers, 401, allow_sha1=True)


@pytest.mark.parametrize(
    "provider", ["github", "gitlab", "gitea", "forgejo", "bitbucket", "bitbucket-server"]
)
@pytest.mark.parametrize("secret", [None, "", [], [""]])
def test_no_secret_configured_refuses_everything(provider, secret):
    body = push_body()
    headers = sign_headers(provider, body, "anything")
    message = refused(provider, body, headers, 401, secret=secret)
    assert "no webhook secret is configured" in message


@pytest.mark.parametrize("provider", ["github", "gitlab", "gitea", "bitbucket"])
def test_secret_rotation_accepts_any_listed_secret(provider):
    body = push_body() if provider != "bitbucket" else b'{"push": {"changes": []}}'
    secrets = ["old-secret", "new-secret"]
    for secret in secrets:
        headers = sign_headers(provider, body, secret)
        assert get_provider(provider, webhook_secret=secrets).handle(body, headers)
    headers = sign_headers(provider, body, "retired-secret")
    refused(provider, body, headers, 401, secret=secrets)


def test_gitlab_token_compared_with_the_secret():
    body = push_body()
    headers = sign_headers("gitlab", body, SECRET)
    assert headers["X-Gitlab-Token"] == SECRET
    provider = get_provider("gitlab", {"webhook_secret": SECRET})
    assert provider.handle(body, headers).commit == SHA
    assert provider.verify_webhook_signature(body, headers)
    headers["X-Gitlab-Token"] = SECRET[:-1]
    assert "does not match" in refused("gitlab", body, headers, 401)
    headers["X-Gitlab-Token"] = ""
    assert "X-Gitlab-Token header is empty" in refused("gitlab", body, headers, 401)
    del headers["X-Gitlab-Token"]
    assert "X-Gitlab-Token header is missing" in refused("gitlab", body, headers, 401)


def test_gitea_signature_is_bare_hex():
    body = push_body()
    headers = sign_headers("gitea", body, SECRET)
    headers["X-Gitea-Signature"] = "sha256=" + headers["X-Gitea-Signature"]
    assert "bare hex" in refused("gitea", body, headers, 401)


def test_bitbucket_sha1_signature_refused():
    body = b'{"push": {"changes": []}}'
    headers = sign_headers("bitbucket", body, SECRET)
    headers["X-Hub-Signature"] = "sha1=" + hmac.new(SECRET.encode(), body, "sha1").hexdigest()
    assert "uses the 'sha1' algorithm" in refused("bitbucket", body, headers, 401)


def test_signature_is_checked_before_json():
    body = b"this is not json"
    bad = sign_headers("github", body, "wrong")
    refused("github", body, bad, 401)
    good = sign_headers("github", body, SECRET)
    assert "not valid JSON" in refused("github", body, good, 400)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "body is empty"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b'{"a": NaN}', "not valid JSON"),
        (b"[1, 2, 3]", "is a JSON array"),
        (b'"ref"', "is a JSON str"),
        (b"null", "is a JSON null"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"ref": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_hostile_bodies_are_400(body, reason):
    headers = sign_headers("github", body, SECRET)
    assert reason in refused("github", body, headers, 400)


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"ref": 123}, "field ref must be a string, got number"),
        ({"ref": None}, "missing the field ref"),
        ({"after": ["x"]}, "field after must be a string, got array"),
        ({"repository": "acme/api"}, "field repository must be an object, got str"),
        ({"repository": {"full_name": {"a": 1}}}, "field repository.full_name must be a string"),
        ({"head_commit": {"id": SHA, "message": 5}}, "field head_commit.message must be a string"),
        ({"deleted": "yes"}, "field deleted must be a boolean"),
        ({"commits": {"0": 1}}, "field commits must be an array"),
        ({"commits": [{"id": 7}]}, "field commits[0].id must be a string"),
    ],
)
def test_wrong_types_name_the_field(overrides, path):
    body = push_body(**overrides)
    headers = sign_headers("github", body, SECRET)
    assert path in refused("github", body, headers, 400)


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("refs/heads/-rf", "starts with '-'"),
        ("-refs/heads/x", "starts with '-'"),
        ("refs/heads/a..b", "contains '..'"),
        ("refs/heads/a b", "forbidden character ' '"),
        ("refs/heads/a\x00b", "forbidden character"),
        ("refs/heads/a\nb", "forbidden character"),
        ("refs/heads/a~1", "forbidden character '~'"),
        ("refs/heads/a:b", "forbidden character ':'"),
        ("refs/heads/a\\b", "forbidden character"),
        ("refs/heads/x.lock", "ends with '.lock'"),
        ("refs/heads/.hidden", "starts with '.'"),
        ("refs/heads/a@{1}", "contains '@{'"),
        ("refs/heads/a//b", "contains '//'"),
        ("refs/heads/a/", "ends with '/'"),
        ("refs/heads/a.", "ends with '.'"),
        ("refs/heads/", "ends with '/'"),
        ("refs/heads/" + "x" * 2000, "longer than"),
    ],
)
def test_hostile_ref_names_are_400(ref, problem):
    body = push_body(ref=ref)
    headers = sign_headers("github", body, SECRET)
    message = refused("github", body, headers, 400)
    assert "field ref is not a valid git ref name" in message
    assert problem in message


def test_branch_part_starting_with_dash_is_refused_after_prefix_removed():
    body = push_body(ref="refs/heads/--upload-pack=evil")
    headers = sign_headers("github", body, SECRET)
    assert "starts with '-'" in refused("github", body, headers, 400)


@pytest.mark.parametrize(
    "sha", ["abc", "g" * 40, "a" * 41, "a" * 63, " " + "a" * 40, "-" + "a" * 39]
)
def test_bad_commit_ids_are_400(sha):
    body = push_body(after=sha)
    headers = sign_headers("github", body, SECRET)
    assert "github payload field after is not a commit id" in refused("github", body, headers, 400)


def test_sha256_repositories_are_accepted():
    sha = "ab" * 32
    body = push_body(after=sha.upper(), head_commit={"id": sha, "message": "m"})
    headers = sign_headers("github", body, SECRET)
    event = get_provider("github", webhook_secret=SECRET).handle(body, headers)
    assert event.commit == sha and event.commit_message == "m"


@pytest.mark.parametrize("delivery", ["has space", "x" * 201, "tab\there"])
def test_hostile_delivery_ids_are_400(delivery):
    body = push_body()
    headers = sign_headers("github", body, SECRET, delivery_id=delivery)
    assert "X-GitHub-Delivery is not a delivery id" in refused("github", body, headers, 400)


def test_missing_event_header_is_400_and_unknown_events_deploy_nothing():
    body = push_body()
    headers = sign_headers("github", body, SECRET)
    del headers["X-GitHub-Event"]
    assert "X-GitHub-Event header is missing" in refused("github", body, headers, 400)
    headers = sign_headers("github", body, SECRET, event="issues")
    event = get_provider("github", webhook_secret=SECRET).handle(body, headers)
    assert event.event_type == "other" and "issues" in event.reason and not event.should_deploy


def test_unknown_provider_is_400():
    with pytest.raises(WebhookError) as caught:
        get_provider("sourcehut")
    assert caught.value.http_status == 400 and "github" in caught.value.message
    with pytest.raises(WebhookError) as caught:
        handle_webhook(push_body(), {"Content-Type": "application/json"}, webhook_secret=SECRET)
    assert caught.value.http_status == 400 and "not recognised" in caught.value.message


def test_headers_accept_werkzeug_headers_pairs_and_bytes():
    body = push_body()
    signed = sign_headers("github", body, SECRET)
    provider = get_provider("github", webhook_secret=SECRET)
    assert provider.handle(body, WerkzeugHeaders(list(signed.items()))).commit == SHA
    assert provider.handle(body, list(signed.items())).commit == SHA
    as_bytes = {k.encode(): v.encode() for k, v in signed.items()}
    assert provider.handle(bytearray(body), as_bytes).commit == SHA
    view = Headers(signed)
    assert view["x-github-event"] == view["X-GITHUB-EVENT"] == "push"
    assert "x-hub-signature-256" in view and "nope" not in view
    assert view.value("X-Nope") is None


def test_load_json_object_names_the_provider():
    with pytest.raises(WebhookError) as caught:
        load_json_object(b"[]", "gitea")
    assert caught.value.message.startswith("gitea webhook body")
    assert load_json_object(b'{"a": 1}', "gitea") == {"a": 1}


def test_signing_helper_matches_an_independent_hmac():
    body = b'{"x": 1}'
    expected = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert sign_headers("gitea", body, "k")["X-Gitea-Signature"] == expected
    assert sign_headers("forgejo", body, "k")["X-Forgejo-Signature"] == expected
    assert sign_headers("bitbucket", body, "k")["X-Hub-Signature"] == "sha256=" + expected
    assert sign_headers("bitbucket-server", body, "k")["X-Hub-Signature"] == "sha256=" + expected
    assert sign_headers("github", body.decode(), "k")["X-Hub-Signature-256"] == "sha256=" + expected


def test_headers_from_a_wsgi_environ_are_the_headers_werkzeug_sees():
    from werkzeug.datastructures import EnvironHeaders

    environ = {
        "REQUEST_METHOD": "POST",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "",
        "HTTP_CONTENT_TYPE": "text/plain",
        "HTTP_X_GITHUB_EVENT": " push ",
        "HTTP_X_HUB_SIGNATURE_256": "sha256=ab",
        "HTTP_X_EMPTY": "",
        "wsgi.input": object(),
    }
    for _ in range(2):  # the second time from the remembered names
        view = Headers.from_environ(environ)
        assert list(view.items()) == list(Headers(EnvironHeaders(environ)).items())
        assert view["x-github-event"] == "push" and view["Content-Type"] == "application/json"
        assert "Content-Length" not in view and view.get("X-Empty") == ""
        assert view.value("X-Empty") is None and view.get("X-Nope", "d") == "d"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_json_bodies_decode_in_every_encoding_json_accepts(encoding):
    assert load_json_object('{"ref": "é"}'.encode(encoding), "github") == {"ref": "é"}


JSON_BODIES = [
    b'{"ref": "refs/heads/main", "deleted": false, "commits": [{"id": "a", "n": -0.5}]}',
    b'{"a": 1, "a": 2}',
    # orjson refuses these; json takes them, and so must the receiver.
    b'{"a": "\\ud800"}',
    b'{"a": 1e400}',
    '{"ref": "é"}'.encode("utf-16"),
    b'\xef\xbb\xbf{"ref": "x"}',
]


@pytest.mark.parametrize("body", JSON_BODIES)
def test_json_bodies_decode_as_json_decodes_them(body):
    from fraisier.git import base

    assert base._fast_loads() is not None, "orjson is a dependency: the fast path must run"
    assert load_json_object(body, "github") == json.loads(body)


def test_json_bodies_decode_without_orjson(monkeypatch):
    from fraisier.git import base

    monkeypatch.setattr(base, "_fast_loads", lambda: None)
    for body in JSON_BODIES:
        assert load_json_object(body, "github") == json.loads(body)
    with pytest.raises(WebhookError, match="not valid JSON"):
        load_json_object(b'{"a": NaN}', "github")


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"commits": ["x"]}, "field commits[0] must be an object, got str"),
        ({"commits": [{"id": SHA, "message": 5}]}, "field commits[0].message must be a string"),
        ({"head_commit": [1]}, "field head_commit must be an object, got array"),
        ({"deleted": 1}, "field deleted must be a boolean, got number"),
    ],
)
def test_nested_wrong_types_name_the_field(overrides, path):
    body = push_body(**overrides)
    headers = sign_headers("github", body, SECRET)
    assert path in refused("github", body, headers, 400)


def test_payload_checks_the_exact_kind_of_every_value():
    from fraisier.git.base import Payload

    p = Payload({"n": True, "m": 3, "s": "x", "o": {"n": False}}, "custom")
    assert p.get("m", int) == 3 and p.get("m", (int, str)) == 3 and p.get("n", bool) is True
    assert p.get("o.n", bool) is False and p.get("missing", str) is None
    for path, kind, problem in [
        ("n", int, "field n must be int, got boolean"),
        ("o.n", int, "field o.n must be int, got boolean"),
        ("s", int, "field s must be int, got str"),
        ("s.x", str, "field s must be an object, got str"),
    ]:
        with pytest.raises(WebhookError) as caught:
            p.get(path, kind)
        assert problem in caught.value.message
