"""The demo application that ``trustmesh demo`` meshes: small standard-library services."""
