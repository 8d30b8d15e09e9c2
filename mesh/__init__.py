"""Local mesh runner: pods as network namespaces + cgroups, Envoy sidecars, interception."""
