"""Everything decided before any process starts, in seconds and without torch: the checks of model, paths
and data files, the plan (world layout, batch arithmetic, strategy auto), the compatibility rules, the memory
estimate and the DeepSpeed config."""
