"""The subcommands (verify/cli.py SUBCOMMANDS names them) and check's baseline model."""
