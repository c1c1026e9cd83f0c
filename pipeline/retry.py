"""Which failures are worth retrying: a network or I/O error that may pass, not a bad input.

Decided by type, never by message or class name. The core already sorts what it can: a hub failure
that may pass is a ``TransientSourceError``, a bad reference an ``InputError``. For anything else
(a library's own exception, an I/O error while hashing) the exception chain is looked at: a hub
answer that says "no" (missing repo or revision, gated, offline mode, a 4xx) is final; a dropped
connection, a timeout, a 5xx/429 or an I/O error are retried.
"""

from __future__ import annotations

from metamerge.errors import InputError, MergeError, TransientSourceError
from metamerge.refs import retryable_status, transport_errors

# I/O errors that a second try cannot fix.
_NOT_TRANSIENT_OS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _final_hub_errors() -> tuple[type[BaseException], ...]:
    """The hub's answers that mean "this will not work": retrying asks the same question again."""
    from huggingface_hub.errors import (
        BadRequestError,
        DisabledRepoError,
        GatedRepoError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, DisabledRepoError,
            RemoteEntryNotFoundError, BadRequestError, OfflineModeIsEnabled)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from or while handling, each once."""
    chain, seen, stack = [], set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        stack += [e.__cause__, e.__context__]
    return chain


def is_transient(exc: BaseException) -> bool:
    """Whether a failed download (or registration) is worth retrying."""
    if isinstance(exc, InputError):  # the core's verdict: the input is wrong, a retry cannot help
        return False
    chain = _chain(exc)
    if any(isinstance(e, TransientSourceError) for e in chain):
        return True
    if any(isinstance(e, _final_hub_errors()) for e in chain):
        return False
    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int):
            return retryable_status(status)
    transport = transport_errors()
    for e in chain:
        if isinstance(e, MergeError):  # the core's verdict on its own inputs
            continue
        if isinstance(e, (ConnectionError, TimeoutError, *transport)):
            return True
        if isinstance(e, OSError) and not isinstance(e, _NOT_TRANSIENT_OS):
            return True
    return False
