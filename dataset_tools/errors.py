"""The one exception type for problems in user-supplied data."""


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming where and how."""
