"""The one exception type for problems a user can fix (bad input, bad file, bad config).

The CLI prints its message on one line and exits with code 2; everything else is a bug and
keeps its traceback.
"""


class MultiLoRAError(Exception):
    """A user-fixable problem; the message names what is wrong and how to fix it."""
