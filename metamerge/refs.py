"""Model references: a local directory, or a hub id with an optional ``@revision``.

Resolving a reference pins it: a hub model to the commit hash of the snapshot that was used, a
local directory to a content hash of its files. The pinned revision is what cache keys and the
audit trail record, never a path or a timestamp.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import InputError, TransientSourceError
from .io.untrusted import own_file

# Files a merge needs from a model repository; nothing else is downloaded.
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "adapter_config.json",
    "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "added_tokens.json",
    "chat_template*",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
HASH_CHUNK = 8 << 20
_LOCAL_REV = re.compile(r"[0-9a-f]{7,64}")


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: ``name`` (a path or hub id) and an optional ``revision``."""

    name: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, _, rev = text.partition("@")
        return cls(name=name, revision=rev or None)

    def is_local(self) -> bool:
        return (
            os.path.isabs(self.name) or self.name.startswith((".", "~"))
            or Path(self.name).expanduser().exists() or not _HUB_ID.match(self.name)
        )

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


@dataclass
class ResolvedModel:
    """A reference pinned to files on disk.

    A PEFT adapter (a folder with ``adapter_config.json``) has ``adapter`` set, ``path`` its folder
    and ``base_path``/``base_ref`` the base it is applied to: from ``BASE+ADAPTER``, or attached from
    the recipe's ``base_model`` (``with_base``). Everything an ``AdapterReader`` needs is here, so a
    worker opens one from this value alone.
    """

    ref: str
    path: Path
    revision: str
    source: str  # "local" or "hub"
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256 (when hashed)
    adapter: bool = False
    base_path: Path | None = None
    base_ref: str | None = None
    base_revision: str | None = None

    def to_dict(self) -> dict:
        out: dict = {"ref": self.ref, "path": str(self.path), "revision": self.revision,
                     "source": self.source, "files": dict(sorted(self.files.items()))}
        if self.adapter:
            out.update(adapter=True, base_ref=self.base_ref, base_path=str(self.base_path) if self.base_path else None,
                       base_revision=self.base_revision)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ResolvedModel:
        """The inverse of ``to_dict`` (the pipeline passes pinned models between steps as JSON)."""
        base = d.get("base_path")
        return cls(ref=d["ref"], path=Path(d["path"]), revision=d["revision"], source=d["source"],
                   files=dict(d.get("files") or {}), adapter=bool(d.get("adapter")),
                   base_path=Path(base) if base else None, base_ref=d.get("base_ref"),
                   base_revision=d.get("base_revision"))


def with_base(model: ResolvedModel, base: ResolvedModel | None) -> ResolvedModel:
    """An adapter given as a bare folder, applied to the recipe's base (a copy; others unchanged)."""
    if not model.adapter or model.base_path is not None:
        return model
    if base is None:
        raise InputError(f"model '{model.ref}' is a LoRA adapter and the recipe has no base_model to apply it to; "
                         "set base_model or write the model as BASE+ADAPTER")
    if base.adapter:
        raise InputError(f"base_model '{base.ref}' is itself an adapter; write it as BASE+ADAPTER")
    return replace(model, base_path=base.path, base_ref=base.ref, base_revision=base.revision)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_files(path: Path) -> list[Path]:
    """The files of a model directory that define it (weights, configs, tokenizer), sorted."""
    out = [p for p in path.iterdir() if own_file(path, p) and not p.name.startswith(".")]
    return sorted(out, key=lambda p: p.name)


def _dir_digest(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()


def hash_model_dir(path: Path) -> tuple[str, dict[str, str]]:
    """Content hash of a directory: sha256 over the sorted (name, sha256) of its files. A file's
    hash comes from the cache (:mod:`metamerge.cache`) when the file has not changed since."""
    from .cache import file_sha256

    files = {p.name: file_sha256(p, sha256_file) for p in model_files(path)}
    return _dir_digest(files), files


def known_model_hash(path: Path) -> str | None:
    """The directory's content hash if every file's hash is cached already, else None (no hashing)."""
    from .cache import known_sha256

    files = {}
    for p in model_files(path):
        if (h := known_sha256(p)) is None:
            return None
        files[p.name] = h
    return _dir_digest(files)


def resolve(text: str, *, hash_files: bool = True, token: str | None = None) -> ResolvedModel:
    """Pin a reference to local files, downloading from the hub when it is not a local path.

    ``token`` defaults to ``HF_TOKEN`` from the environment and is never logged. ``BASE+ADAPTER``
    (mergekit's syntax) pins both: the adapter, with its base attached.
    """
    if "+" in text:
        base_text, _, adapter_text = text.partition("+")
        if not base_text.strip() or not adapter_text.strip() or "+" in adapter_text:
            raise InputError(f"model '{text}': write a LoRA reference as BASE+ADAPTER (one '+')")
        base = resolve(base_text.strip(), hash_files=hash_files, token=token)
        adapter = resolve(adapter_text.strip(), hash_files=hash_files, token=token)
        if base.adapter:
            raise InputError(f"model '{text}': '{base_text}' is an adapter, not a base model; write BASE+ADAPTER")
        if not adapter.adapter:
            raise InputError(f"model '{text}': '{adapter_text}' has no adapter_config.json, so it is not a PEFT "
                             "adapter; give a LoRA adapter after '+'")
        return replace(adapter, ref=text, base_path=base.path, base_ref=base.ref, base_revision=base.revision)
    ref = ModelRef.parse(text)
    if ref.is_local():
        path = Path(ref.name).expanduser().absolute()
        if not path.is_dir():
            raise InputError(f"model '{text}': no such directory {path}; check the path in the recipe")
        if ref.revision and not _LOCAL_REV.fullmatch(ref.revision):
            # a 1-character prefix matches 1 in 16 folders: it pins nothing
            raise InputError(f"model '{text}': a local @revision must be at least 7 lowercase hex characters "
                             f"of the folder's content hash (got '{ref.revision}'); copy it from provenance.json")
        digest, files = hash_model_dir(path) if hash_files else ("unhashed", {})
        if ref.revision and hash_files and not digest.startswith(ref.revision):
            raise InputError(
                f"model '{text}': local content hash is {digest[:12]}, not '{ref.revision}'; "
                "the folder changed since the recipe was pinned")
        return ResolvedModel(ref=text, path=path, revision=digest, source="local", files=files,
                             adapter=is_adapter(path))
    return _resolve_hub(ref, text, hash_files=hash_files, token=token)


def retryable_status(status: int) -> bool:
    """Whether an HTTP answer says "try again later": a server error, a timeout or rate limiting."""
    return status >= 500 or status in (408, 429)


HUB_ATTEMPTS = 3        # a hub outage (network down, 5xx, 429) is retried this many times in all
HUB_BACKOFF_S = 2.0     # seconds before the 2nd attempt, doubling after each failure


def _resolve_hub(ref: ModelRef, text: str, *, hash_files: bool, token: str | None) -> ResolvedModel:
    """``_resolve_hub_once`` with retries and exponential backoff on transient hub failures."""
    for attempt in range(1, HUB_ATTEMPTS + 1):
        try:
            return _resolve_hub_once(ref, text, hash_files=hash_files, token=token)
        except TransientSourceError as exc:
            if attempt == HUB_ATTEMPTS:
                raise TransientSourceError(f"{exc} (after {attempt} attempts)") from exc
            time.sleep(HUB_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _resolve_hub_once(ref: ModelRef, text: str, *, hash_files: bool, token: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    transient: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, *transport_errors())
    try:
        local = snapshot_download(ref.name, revision=ref.revision, allow_patterns=ALLOW_PATTERNS,
                                  token=token or os.environ.get("HF_TOKEN"))
    except RevisionNotFoundError:
        raise InputError(f"model '{text}': revision '{ref.revision}' does not exist; "
                         "use a branch, tag or commit hash of that repository") from None
    except GatedRepoError:
        raise InputError(f"model '{text}': gated repository; accept its licence and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"model '{text}': no such repository on the hub (or it is private: set HF_TOKEN)") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:
        # offline by choice (HF_HUB_OFFLINE) stays so; a network that is down may come back
        offline = isinstance(exc, OfflineModeIsEnabled) or _hub_offline() or \
            isinstance(exc.__cause__ or exc.__context__, OfflineModeIsEnabled)
        error = InputError if offline else TransientSourceError
        raise error(f"model '{text}': not in the local cache and the hub is unreachable "
                    "(HF_HUB_OFFLINE is set or no network); download it first or use a local path") from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if isinstance(status, int) and retryable_status(status):
            raise TransientSourceError(f"model '{text}': the hub answered {status}; try again later") from exc
        raise
    except transient as exc:
        raise TransientSourceError(f"model '{text}': cannot reach the hub ({type(exc).__name__}: {exc})") from exc
    path = Path(local)
    commit = path.name  # snapshots/<commit hash>
    from .cache import file_sha256  # a hub blob is named by its sha256: nothing to hash

    files = {p.name: file_sha256(p, sha256_file) for p in model_files(path)} if hash_files else {}
    return ResolvedModel(ref=text, path=path, revision=commit, source="hub", files=files, adapter=is_adapter(path))


def is_adapter(path: Path) -> bool:
    """A PEFT adapter folder: it has ``adapter_config.json`` (see ``lora.py``)."""
    return own_file(path, path / "adapter_config.json")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' "could not talk to the server" errors (connection, timeout, protocol), for
    the clients that are installed: the hub client's ``httpx2``, ``httpx``, ``requests``, ``urllib3``."""
    found: list[type[BaseException]] = []
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout")),
                          ("urllib3.exceptions", ("ProtocolError", "TimeoutError"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


class BackgroundHashes:
    """Fill in the content hash of local models resolved without one, on a worker thread.

    Hashing reads every input byte once more; beside the merge, which is busy converting and
    adding, it costs little wall time. ``wait()`` sets ``revision`` and ``files``.
    """

    def __init__(self, models: list[ResolvedModel | None]):
        todo = {id(m): m for m in models if m is not None and m.source == "local" and not m.files}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hash")
        self._jobs = [(m, self._pool.submit(hash_model_dir, m.path)) for m in todo.values()]

    def wait(self) -> None:
        for model, job in self._jobs:
            model.revision, model.files = job.result()

    def __enter__(self) -> BackgroundHashes:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
