"""User-facing errors: the CLI prints them as one line, without a traceback."""


class LightningRecError(Exception):
    """An error caused by user input (a file, an option); the message says what was expected."""


class DataError(LightningRecError):
    """Bad or missing data: names the file (and line) and what was expected."""


class ConfigError(LightningRecError):
    """Bad configuration: names the option and what was expected."""


def is_int(value, least: int) -> bool:
    """An int (not a bool, not a string of digits) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_int(value, option: str, least: int) -> int:
    """``value`` if :func:`is_int`, else a one-line error naming ``option``."""
    if not is_int(value, least):
        raise ConfigError(f"{option}={value!r}: expected an integer >= {least}")
    return value
