class ConfigError(ValueError):
    """A problem with what the user asked for, reported as one line naming the field or file."""
