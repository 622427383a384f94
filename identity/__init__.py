"""The identity service: the mesh's certificate authority. It serves Linkerd's
``io.linkerd.proxy.identity.Identity/Certify`` over gRPC, validates workload tokens, loads and
hot-reloads the issuer, and ships the client proxies use to obtain and renew their certificates."""
