class UserError(Exception):
    """A mistake in the user's input or configuration (not a bug).

    The command-line entry points print its message as one paragraph and exit with status 2,
    without a traceback. The message must name the problem: the file, row id or config key.
    """
