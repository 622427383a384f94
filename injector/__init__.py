"""The proxy injector: a mutating admission webhook and ``trustmesh inject`` that add the proxy
and its iptables init step to pods, and the install/upgrade manifests of the control plane."""
