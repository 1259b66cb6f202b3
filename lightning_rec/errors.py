"""User-facing errors: the CLI prints them as one line, without a traceback."""


class LightningRecError(Exception):
    """An error caused by user input (a file, an option); the message says what was expected."""


class DataError(LightningRecError):
    """Bad or missing data: names the file (and line) and what was expected."""


class ConfigError(LightningRecError):
    """Bad configuration: names the option and what was expected."""
