"""The openai backend takes its proxy from the environment once per session
(``env_proxy``), as the SDK (httpx) did per client: HTTPS_PROXY / HTTP_PROXY by the
URL's scheme, NO_PROXY honoured."""

from __future__ import annotations

import pytest

from unsafechain.backends.openai_backend import env_proxy


@pytest.fixture
def no_proxies(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def test_the_proxy_follows_the_scheme_and_no_proxy(no_proxies):
    assert env_proxy("https://api.openai.com/v1/models") is None
    no_proxies.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    no_proxies.setenv("HTTP_PROXY", "http://plain.internal:3128")
    assert env_proxy("https://api.openai.com/v1/models") == "http://proxy.internal:3128"
    assert env_proxy("http://vllm:8000/v1/models") == "http://plain.internal:3128"
    no_proxies.setenv("NO_PROXY", "vllm,.cluster.local")
    assert env_proxy("http://vllm:8000/v1/models") is None
    assert env_proxy("http://guard.ns.svc.cluster.local:8000/v1/models") is None
    assert env_proxy("https://api.openai.com/v1/models") == "http://proxy.internal:3128"
