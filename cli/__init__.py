"""The command line: --key=value flags with --help, one-line errors, the Ctrl-C prologue. Imports
nothing of the repository, so that everything else can lean on it."""
