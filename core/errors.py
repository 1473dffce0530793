class UserError(Exception):
    """A problem with what the user gave (a path, a file, an option): its message is one line that
    names the problem and what is accepted. CLIs print it and exit 2; the app shows it."""


class LimitError(UserError):
    """Over a rate or queue limit: the same request may succeed later (HTTP 429)."""


class TooLargeError(UserError):
    """An input over its size limit: a message, a file, a request body (HTTP 413)."""


def first_line(e: BaseException, limit: int = 120) -> str:
    """An exception's message for a one-line error: its first line, cut to `limit`, or its type
    where it has no message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
