"""User-facing errors: one message naming the problem and the fix; the CLI prints it without a traceback."""


class DynLlavaError(Exception):
    """An error the user can fix (bad path, bad checkpoint, bad parameter)."""

    exit_code = 1  # what the CLI exits with

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(DynLlavaError):
    """An invalid configuration value."""


class CheckpointError(DynLlavaError):
    """A checkpoint that cannot be loaded: missing files, missing/unexpected keys, shape mismatches."""


class InputError(DynLlavaError):
    """A bad request: unreadable image, prompt too long, malformed batch file."""


class MissingDependency(DynLlavaError):
    """An optional package this command needs is not installed (exit code 2, like a usage error)."""

    exit_code = 2
