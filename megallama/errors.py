"""The one exception type the CLI turns into a single readable line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (config, file, argument); the message is one line.

    A message quoting user input (a key, a file name, a value) could carry a line break; it is
    escaped here so the one-line promise holds whatever the input was.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if "\n" in text or "\r" in text:
            text = text.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(text, *args)


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``: the tail of an unknown-key error."""
    import difflib

    close = difflib.get_close_matches(word, sorted(str(c) for c in choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
