"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""


class DistillError(Exception):
    """A problem the user can fix; the message names the file or key and the fix."""

    exit_code = 1


class ConfigError(DistillError):
    """A config file or override is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class StageInputError(DistillError):
    """A stage's input folder is missing or incomplete."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so every `finally` (servers, temp files) runs as on Ctrl-C."""
