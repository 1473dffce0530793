class UserError(Exception):
    """A problem with what the user gave (a path, a file, an option): its message is one line that
    names the problem and what is accepted. CLIs print it and exit 2; the app shows it."""
