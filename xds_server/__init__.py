"""L7FP control plane: ADS server, snapshot cache, config sources, admin API, CLI."""
