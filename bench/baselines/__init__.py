"""The baselines `launch` is measured against; each runs under torchrun and reads the same recipe YAML."""
