"""The subcommands of `launch` other than running a recipe: plan, export, preflight, status and cancel
(launcher.cli.SUBCOMMANDS lists them)."""
