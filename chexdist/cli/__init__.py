"""The `chexdist` command: one module per stage registers its subcommands (`main.build_parser`)."""
