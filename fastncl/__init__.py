"""fastncl: a performance-engineered trainer for noisy correspondence learning."""
__version__ = "0.1.0"


class FastnclError(Exception):
    """A problem with the user's input (a file, an option, a config value).

    The CLI prints its message as one line and exits with status 2.
    """
