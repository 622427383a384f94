"""Token validators: username parsing, local tokens, and TokenReview against kmock."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from identity_testkit import DOMAIN, Env

from identity.errors import TokenInvalid, TokenNotAuthenticated, TokenReviewFailed
from identity.validators import (
    DEFAULT_AUDIENCE,
    KubernetesTokenValidator,
    LocalTokenValidator,
    identity_from_username,
    service_account_username,
)
from pki.keys import PrivateKey
from pki.names import Identity
from pki.tokens import (
    TokenAudienceMismatch,
    TokenExpired,
    TokenNotYetValid,
    TokenSignatureInvalid,
)


def test_username_parsing() -> None:
    got = identity_from_username(service_account_username("emojivoto", "web"), DOMAIN)
    assert got == Identity("web", "emojivoto", "trustmesh", "cluster.local")
    for bad in (
        "web",
        "system:serviceaccount:emojivoto",
        "admin:serviceaccount:ns:web",
        "system:serviceaccount:Bad_NS:web",
        "system:serviceaccount:ns:web:extra",
        "system:node:ns:web",
    ):
        with pytest.raises(TokenInvalid):
            identity_from_username(bad, DOMAIN)


async def test_local_validator(env: Env) -> None:
    v = env.validator()
    assert await v.validate(env.token("api", "shop")) == Identity("api", "shop")
    with pytest.raises(TokenAudienceMismatch):
        await v.validate(env.token(audience="other"))


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_cached_token_still_honours_its_window(env: Env) -> None:
    clock = Clock(env.now)
    v = env.validator(clock)
    token = env.token("web", "default", issued=env.now, ttl=timedelta(minutes=10))
    assert v.check(token) == Identity("web", "default")
    assert v.check(token) == Identity("web", "default")
    assert (v.cache.hits, v.cache.misses, len(v.cache)) == (1, 1, 1)
    clock.now = env.now.replace(microsecond=0) + timedelta(minutes=10)  # exp is exclusive
    with pytest.raises(TokenExpired):
        v.check(token)
    clock.now = env.now - timedelta(minutes=1)
    with pytest.raises(TokenNotYetValid):
        v.check(token)
    assert v.cache.hits == 3  # both refusals came from the cached entry's window


def test_local_tokens_get_the_clock_skew_allowance(env: Env, tmp_path: Path) -> None:
    # Kubernetes accepts ServiceAccount tokens up to a minute outside their window (go-jose's
    # default leeway); the embedded counterpart allows the service's --clock-skew, and no more,
    # whether the token is verified or comes from the cache.
    t0 = env.now.replace(microsecond=0)
    clock = Clock(t0)
    skew = timedelta(seconds=20)
    v = LocalTokenValidator(env.token_key, DOMAIN, clock=clock, leeway=skew)
    token = env.token(issued=t0, ttl=timedelta(minutes=10))
    for at, ok in [
        (t0 - timedelta(seconds=19), True),  # a minter's clock 19 s ahead of ours
        (t0 - timedelta(seconds=21), False),
        (t0 + timedelta(minutes=10, seconds=19), True),  # 19 s past exp
        (t0 + timedelta(minutes=10, seconds=20), False),
    ]:
        for _ in range(2):  # verified, then from the cache
            clock.now = at
            if ok:
                assert v.check(token) == Identity("web", "default")
            else:
                with pytest.raises((TokenExpired, TokenNotYetValid)):
                    v.check(token)
    assert v.cache.hits >= 4
    # `identity serve` wires its --clock-skew into the validator.
    from identity.runner import ServeOptions, build

    server = build(ServeOptions(store=env.store.root, clock_skew=timedelta(seconds=7)))
    assert server.certifier.validator.leeway == timedelta(seconds=7)  # type: ignore[attr-defined]


def test_cache_never_mixes_service_accounts(env: Env) -> None:
    v = env.validator()
    web, api = env.token("web", "default"), env.token("api", "shop")
    for _ in range(3):
        assert v.check(web) == Identity("web", "default")
        assert v.check(api) == Identity("api", "shop")
    # One changed byte is another token: verified afresh, and this one is forged.
    forged = web[:-2] + (b"A" if web[-2:-1] != b"A" else b"B") + web[-1:]
    with pytest.raises(TokenSignatureInvalid):
        v.check(forged)
    with pytest.raises(TokenSignatureInvalid):  # failures are not cached
        v.check(forged)
    foreign = env.token("web", "default", key=PrivateKey.generate())
    with pytest.raises(TokenSignatureInvalid):
        v.check(foreign)
    assert len(v.cache) == 2


def test_cache_is_bounded_lru(env: Env) -> None:
    v = LocalTokenValidator(env.token_key, DOMAIN, clock=lambda: env.now, cache_size=2)
    a, b, c = (env.token(sa) for sa in ("a", "b", "c"))
    v.check(a)
    v.check(b)
    v.check(a)  # a is now the most recently used
    v.check(c)  # evicts b
    assert len(v.cache) == 2
    hits = v.cache.hits
    v.check(a)
    assert v.cache.hits == hits + 1
    v.check(b)
    assert v.cache.hits == hits + 1  # b was evicted: verified again
    off = LocalTokenValidator(env.token_key, DOMAIN, clock=lambda: env.now, cache_size=0)
    off.check(a)
    off.check(a)
    assert (len(off.cache), off.cache.hits) == (0, 0)


USERS = {
    b"projected-web": ("system:serviceaccount:default:web", DEFAULT_AUDIENCE),
    b"legacy-api": ("system:serviceaccount:shop:api", None),  # API-server audience only
    b"node-token": ("system:node:ip-10-0-0-1", DEFAULT_AUDIENCE),
}


def review_reaction(seen: list[Any]) -> Any:
    """Answer TokenReviews like an API server: unknown tokens are not authenticated; a token
    reviewed for an audience it lacks gets the 'token audiences' error Linkerd retries on."""

    def review(request: Any) -> dict[str, Any]:
        spec = request.data["spec"]
        seen.append(spec.get("audiences"))
        user = USERS.get(spec["token"].encode())
        status: dict[str, Any]
        if user is None:
            status = {"authenticated": False, "error": ""}
        elif spec.get("audiences") and user[1] not in spec["audiences"]:
            status = {"authenticated": False, "error": "[invalid bearer token, token audiences [\"https://kubernetes.default.svc\"] is invalid for the target audiences]"}  # fmt: skip
        else:
            status = {"authenticated": True, "user": {"username": user[0]}}
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec, "status": status}  # fmt: skip

    return review


async def test_kubernetes_token_review(k8s: tuple[Any, Any]) -> None:
    emulator, api = k8s
    seen: list[Any] = []
    emulator["post /apis/authentication.k8s.io/v1/tokenreviews"] << review_reaction(seen)
    v = KubernetesTokenValidator(api, DOMAIN)
    assert await v.validate(b"projected-web") == Identity("web", "default")
    assert seen == [[DEFAULT_AUDIENCE]]
    # A legacy token: the audience error triggers Linkerd's retry without audience.
    seen.clear()
    assert await v.validate(b"legacy-api") == Identity("api", "shop")
    assert seen == [[DEFAULT_AUDIENCE], None]
    with pytest.raises(TokenNotAuthenticated, match="could not be authenticated"):
        await v.validate(b"forged")
    with pytest.raises(TokenInvalid, match="system:<type>"):
        await v.validate(b"node-token")
    with pytest.raises(TokenInvalid, match="not ASCII"):
        await v.validate("jwt-ü".encode())


async def test_kubernetes_api_failure_is_internal(k8s: tuple[Any, Any]) -> None:
    from kubernetes import client

    api = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))  # nothing listens
    api.configuration.retries = 0
    try:
        with pytest.raises(TokenReviewFailed, match="Kubernetes API failed"):
            await KubernetesTokenValidator(api, DOMAIN).validate(b"projected-web")
    finally:
        api.close()
