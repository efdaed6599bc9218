"""Exception hierarchy: every error attngen raises on purpose is an AttngenError."""


class AttngenError(Exception):
    """Base class of attngen's own errors."""


class SpecError(AttngenError, ValueError):
    """An AttentionSpec field is invalid or a combination of fields makes no sense."""


class CacheError(AttngenError):
    """The kernel cache could not be read or written (lock timeout, permissions)."""


class CompileError(AttngenError):
    """The C compiler rejected a generated kernel.

    Carries the exact command, the compiler's full output and where the failing
    source was kept, so the user can read and rerun it. Pickles cleanly (the
    arguments are plain strings), so it crosses process pools intact.
    """

    def __init__(self, message, command="", output="", source_path=""):
        super().__init__(message, command, output, source_path)
        self.message = message
        self.command = command
        self.output = output
        self.source_path = source_path

    def __str__(self):
        parts = [self.message]
        if self.command:
            parts.append(f"command: {self.command}")
        if self.source_path:
            parts.append(f"source kept at: {self.source_path}")
        if self.output:
            parts.append("compiler output:\n" + self.output.rstrip())
        return "\n".join(parts)
