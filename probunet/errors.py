"""The error of a user's configuration: a leaf module every part of probunet may import.

:class:`ConfigError` is raised for an invalid config file, override or key; its
message names the key or file. (The data's own error, ``DataError``, lives in
:mod:`probunet.data.errors`.)
"""


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the key or file."""


__all__ = ["ConfigError"]
