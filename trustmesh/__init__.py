"""TrustMesh's command line and what ties the packages together: configuration, the embedded
mesh supervisor (``trustmesh up`` / ``demo``) and the health checks (``trustmesh check``)."""
