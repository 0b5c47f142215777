"""What the user writes, validated: the recipe schema (what to train), the task registry, cluster profiles
(where), and YAML loading with line numbers and overrides. Torch-free; runs before any rank starts."""
