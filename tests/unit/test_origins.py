"""The Origin rule's pieces (streamgate/cors.py) and the browser settings."""

from __future__ import annotations

import pytest

from streamgate import cors
from streamgate.config import load_settings
from streamgate.errors import ConfigError

SETTINGS = load_settings({})


@pytest.mark.parametrize(("origin", "origins", "own", "allowed"), [
    (None, (), None, True),
    ("", (), None, True),
    ("https://a.example", (), None, False),
    ("https://a.example", ("https://a.example",), None, True),
    ("https://a.example", ("https://b.example",), None, False),
    ("https://a.example", ("*",), None, True),
    ("https://own.example", (), "https://own.example", True),
    ("http://own.example", (), "https://own.example", False),
    ("https://own.example", (), "", False),
])
def test_the_origin_rule(origin: str | None, origins: tuple[str, ...], own: str | None,
                         allowed: bool) -> None:
    assert cors.origin_allowed(origins, origin, own) is allowed


@pytest.mark.parametrize(("host", "own"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("localhost:8080", "http://localhost:8080"),
    ("LOCALHOST:8080", "http://localhost:8080"),
    ("app.localhost:8080", "http://app.localhost:8080"),
    ("[::1]:8080", "http://[::1]:8080"),
    ("192.168.1.5", "http://192.168.1.5"),
    ("rebind.example:8080", None),   # a DNS name could be rebound to us
    ("", None),
    (None, None),
    ("[::1", None),
])
def test_the_dev_servers_own_origin_comes_only_from_hosts_no_one_can_rebind(
        host: str | None, own: str | None) -> None:
    assert cors.local_origin(host) == own


def test_settings_for_browsers() -> None:
    assert SETTINGS.cors_origins == () and SETTINGS.playground is False
    settings = load_settings({"STREAMGATE_CORS_ALLOW_ORIGINS": "http://localhost:3000, https://a.b",
                              "STREAMGATE_PLAYGROUND": "true"})
    assert settings.cors_origins == ("http://localhost:3000", "https://a.b")
    assert settings.playground is True


@pytest.mark.parametrize("bad", ["http://localhost:3000/", "localhost:3000", "null",
                                 "https://a.example/app"])
def test_an_allowed_origin_must_be_an_origin(bad: str) -> None:
    with pytest.raises(ConfigError, match="is not an origin"):
        load_settings({"STREAMGATE_CORS_ALLOW_ORIGINS": bad})
