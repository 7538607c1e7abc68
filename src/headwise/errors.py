"""The one exception type users see.

Every failure a user can cause (bad spec, corrupt file, context too long, mismatched atlas)
is raised as a HeadwiseError whose message is one line saying what is wrong and how to fix
it. The CLI prints that line instead of a traceback.
"""


class HeadwiseError(Exception):
    """A problem with the user's input, explained in one line."""


__all__ = ["HeadwiseError"]
