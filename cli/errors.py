"""
The errors a user can cause: a bad flag, a bad file, a missing checkpoint, a model that cannot be had.
Raised anywhere as UserError("one line saying what and how to fix it"); the scripts' flags.run prints it as that one
line on stderr and exits with status 2, no traceback. Anything else is a bug and raises as usual.
"""


class UserError(Exception):
    """A mistake the user can fix: shown as one line, no traceback."""


class DataError(UserError):
    """A problem with data the user can fix (bad file, bad line, missing data)."""


class ModelError(UserError):
    """The model computes something unusable (non-finite logits): its weights, not the request, are at fault."""


class TurnError(UserError):
    """A chat turn that cannot be taken (empty message, a message too long for the context). Nothing has changed."""


def reason(error):
    """Why an OSError happened, in words: its strerror, or its message where it has none (numpy's on a full disk:
    "100000 requested and 32704 written")."""
    return error.strerror or str(error)
