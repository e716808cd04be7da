"""The pytest-kode error family.

Every error the public API raises is a :class:`KodeError`. Messages name the backend, the sandbox
id (when there is one) and what to do about it; the original SDK or OS exception is chained with
``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "KodeError",
    "RateLimitError",
    "SandboxConnectionError",
    "SandboxCreateError",
    "SandboxFileNotFoundError",
    "SandboxNotFoundError",
    "SandboxPathError",
    "TemplateBuildError",
]


class KodeError(Exception):
    """Root of every pytest-kode error.

    ``message`` says what happened; ``backend`` and ``sandbox_id`` say where; ``hint`` says what
    to do. ``str(error)`` joins them into one line a user can act on.
    """

    def __init__(
        self,
        message: str,
        *,
        backend: str | None = None,
        sandbox_id: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.backend = backend
        self.sandbox_id = sandbox_id
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.backend:
            where.append(f"backend={self.backend}")
        if self.sandbox_id:
            where.append(f"sandbox={self.sandbox_id}")
        text = f"[{' '.join(where)}] {self.message}" if where else self.message
        if self.hint:
            text += f" -- {self.hint}"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields would be lost by the default pickling (xdist ships reports).
        return (_rebuild, (type(self), self.message, self.backend, self.sandbox_id, self.hint))


def _rebuild(
    cls: type[KodeError],
    message: str,
    backend: str | None,
    sandbox_id: str | None,
    hint: str | None,
) -> KodeError:
    return cls(message, backend=backend, sandbox_id=sandbox_id, hint=hint)


class ConfigError(KodeError, ValueError):
    """An option, marker argument or command-line value is invalid."""


class BackendUnavailableError(KodeError):
    """The backend cannot run here (no API key, isolation tool missing, feature unsupported)."""


class SandboxCreateError(KodeError):
    """The backend refused or failed to create a sandbox."""


class TemplateBuildError(SandboxCreateError):
    """A template cannot be built: a bad step (a missing local source, a wheel for another
    Python, a file destination outside the sandbox) or a step that failed. Names the step."""


class SandboxNotFoundError(KodeError):
    """The sandbox does not exist (any more): resuming a dead id, or it expired."""


class SandboxConnectionError(KodeError):
    """The service could not be reached or stayed busy after retries."""


class RateLimitError(SandboxConnectionError):
    """The service kept answering "too many requests" after retries."""


class SandboxFileNotFoundError(KodeError, FileNotFoundError):
    """A path inside the sandbox does not exist."""


class SandboxPathError(KodeError, ValueError):
    """A path would resolve outside the sandbox."""
