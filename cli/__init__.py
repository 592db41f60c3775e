"""The command line, below everything else: --key=value flags with --help, and one-line errors. Imports nothing
of the repository, so data/, support/ and the scripts can all lean on it."""
