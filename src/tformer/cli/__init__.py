"""The `tformer` command: one small module per subcommand."""
