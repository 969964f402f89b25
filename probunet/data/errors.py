"""The error raised for bad input data (its own module, so that every data module can import it)."""


class DataError(ValueError):
    """Bad input data. The message names the file (or case) and what is wrong."""


__all__ = ["DataError"]
