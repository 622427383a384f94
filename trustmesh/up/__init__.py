"""The embedded mesh on one machine: ``trustmesh proxy run`` (one sidecar fed by the control
plane), ``trustmesh up`` (local PKI, identity and destination with TLS, and one application and
one proxy per workload of a mesh file, as supervised child processes) and ``trustmesh demo``
(``up`` on a built-in mesh, with traffic, a live table and a summary)."""
