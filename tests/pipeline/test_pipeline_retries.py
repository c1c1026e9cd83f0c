"""download retries network and I/O errors with backoff, and fails at once on a bad reference."""

from __future__ import annotations

import errno
import shutil

import pytest

from metamerge.errors import MergeError
from pipeline import retry, steps


def run_download(ref: str):
    """The real task (its retry count and condition), without the waits between attempts."""
    from prefect import flow

    from tasks.download import download

    @flow(name="test-download")
    def pin_flow(r: str) -> dict:
        return download.with_options(retry_delay_seconds=0, retry_jitter_factor=None)(r)

    return pin_flow(ref)


def counting(monkeypatch, module, name, fail_first: BaseException | None = None):
    """Wrap ``module.name`` to count calls, and to raise ``fail_first`` on the first one."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if fail_first is not None and len(calls) == 1:
            raise fail_first
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_backoff_is_exponential():
    from tasks.download import download

    assert download.retries == 4
    assert download.retry_delay_seconds == [2, 4, 8, 16]


def test_an_io_error_is_retried_and_succeeds(tiny_models, prefect_server, monkeypatch, tmp_path):
    import metamerge.refs

    monkeypatch.setenv("METAMERGE_CACHE_DIR", str(tmp_path / "cache"))  # files hashed for real, not cached
    pins = counting(monkeypatch, steps, "pin")
    counting(monkeypatch, metamerge.refs, "sha256_file", OSError(errno.EIO, "Input/output error"))
    pinned = run_download(str(tiny_models["base"]))
    assert len(pins) == 2
    assert pinned["source"] == "local" and len(pinned["revision"]) == 64


def test_a_bad_local_revision_fails_without_retrying(tiny_models, prefect_server, monkeypatch):
    pins = counting(monkeypatch, steps, "pin")
    with pytest.raises(MergeError, match="not 'deadbeef'"):
        run_download(f"{tiny_models['base']}@deadbeef")
    assert len(pins) == 1


def _fake_hub(monkeypatch, tmp_path, tiny_models, first_error):
    """snapshot_download replaced: the first call raises ``first_error``, later ones return a snapshot."""
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / ("c0ffee" * 6 + "c0ff")
    shutil.copytree(tiny_models["base"], snapshot)
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, token=None, **_):
        calls.append((repo_id, revision, tuple(allow_patterns or ())))
        if len(calls) == 1 and first_error is not None:
            raise first_error
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, snapshot


def test_a_dropped_connection_to_the_hub_is_retried(tiny_models, prefect_server, monkeypatch, tmp_path):
    import httpx2

    calls, snapshot = _fake_hub(monkeypatch, tmp_path, tiny_models, httpx2.ConnectError("connection reset"))
    pinned = run_download("some-org/some-model")
    assert len(calls) == 2
    assert pinned["revision"] == snapshot.name and pinned["source"] == "hub"
    assert "*.safetensors" in calls[0][2] and "config.json" in calls[0][2]


def test_a_missing_hub_revision_fails_at_once(tiny_models, prefect_server, monkeypatch, tmp_path):
    import httpx2
    from huggingface_hub.errors import RevisionNotFoundError

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    calls, _ = _fake_hub(monkeypatch, tmp_path, tiny_models, RevisionNotFoundError("no such revision", response=response))
    with pytest.raises(MergeError, match="revision 'nope' does not exist"):
        run_download("some-org/some-model@nope")
    assert len(calls) == 1


def test_which_errors_are_transient():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise LocalEntryNotFoundError("not cached and the hub is unreachable") from e
        except LocalEntryNotFoundError:
            try:
                raise outer from None  # as metamerge.refs does
            except BaseException as final:
                return final

    def http(status: int) -> HfHubHTTPError:
        return HfHubHTTPError("x", response=httpx2.Response(status, request=httpx2.Request("GET", "https://h")))

    assert retry.is_transient(OSError(errno.EIO, "I/O error"))
    assert retry.is_transient(TimeoutError())
    assert retry.is_transient(http(503)) and retry.is_transient(http(429))
    assert not retry.is_transient(http(404)) and not retry.is_transient(http(401))
    assert retry.is_transient(chained(MergeError("unreachable"), httpx2.ConnectError("reset")))
    assert not retry.is_transient(chained(MergeError("offline"), OfflineModeIsEnabled("offline")))
    assert not retry.is_transient(MergeError("model 'x': no such directory"))
    assert not retry.is_transient(FileNotFoundError("gone"))
