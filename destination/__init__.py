"""The destination service: service discovery and policy for proxies, from a mesh file (the
embedded default) or from Kubernetes, streamed over Linkerd's ``Destination/Get`` and TrustMesh's
policy and trust-bundle streams; plus the client proxies use to consume them."""
