"""One module per tool subcommand, each exposing main(argv)."""
