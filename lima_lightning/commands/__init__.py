"""Tool subcommands that need no Trainer: one module per command, each exposing `main(argv: list[str]) -> None`.

A command too long for one module keeps its parts beside it, named after it (`inspect_view`, `inspect_render`).
"""
