"""fastncl: a performance-engineered trainer for noisy correspondence learning."""
import importlib

__version__ = "0.1.0"


class FastnclError(Exception):
    """A problem with the user's input (a file, an option, a config value).

    The CLI prints its message as one line and exits with status 2.
    """


class Diverged(Exception):
    """Training produced a non-finite loss or similarity: the run stops (its last checkpoint is the
    last good epoch's) and no result is reported. The CLI prints the message and exits with 1."""


def optional_import(name: str, message: str):
    """The module ``name`` (an optional dependency), or a FastnclError with ``message`` (which names
    what to install) when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FastnclError(message) from None
