"""Tool subcommands that need no Trainer: one module per command, each exposing `main(argv: list[str]) -> None`."""
