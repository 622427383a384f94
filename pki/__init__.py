"""The chain of trust as a library: identity names, keys (ECDSA P-256 and ML-DSA-65), CSRs,
anchors, issuers and workload certificates, multi-anchor trust bundles, chain verification at an
explicit time, the pure renewal policy, credential stores with atomic versioned writes,
inspection, and hybrid X25519 + ML-KEM-768 sealing. pki imports no other TrustMesh package and is
the only one that imports ``cryptography.hazmat``."""
