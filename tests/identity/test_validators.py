"""Token validators: username parsing, local tokens, and TokenReview against kmock."""

from __future__ import annotations

from typing import Any

import pytest
from identity_testkit import DOMAIN, Env

from identity.errors import TokenInvalid, TokenNotAuthenticated, TokenReviewFailed
from identity.validators import (
    DEFAULT_AUDIENCE,
    KubernetesTokenValidator,
    identity_from_username,
    service_account_username,
)
from pki.names import Identity
from pki.tokens import TokenAudienceMismatch


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
