"""The errors a user can cause, raised anywhere as UserError("what, and how to fix it"): flags.run
prints it as one line on stderr and exits with status 2. Anything else is a bug: it raises."""


class UserError(Exception):
    """A mistake the user can fix: shown as one line, no traceback."""


class DataError(UserError):
    """A problem with data the user can fix (bad file, bad line, missing data)."""


class ModelError(UserError):
    """The model computes something unusable (non-finite logits): its weights are at fault."""


class TurnError(UserError):
    """A chat turn that cannot be taken (empty, too long for the context); nothing has changed."""


def reason(error):
    """Why an OSError happened: its strerror, or its message where it has none (numpy's)."""
    return error.strerror or str(error)
