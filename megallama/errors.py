"""The one exception type the CLI turns into a single readable line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (config, file, argument); the message is one line."""
