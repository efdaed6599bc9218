"""On-disk cache of built kernels.

Layout: <cache dir>/v<FORMAT>/<isa>/<slug>-<digest16>/{kernel.c, kernel.so, meta.json}.
The key hashes everything that can change the binary. An entry is published atomically
(built in a temp dir on the same filesystem, os.replace'd into place) and meta.json, the
completion marker, is written last. An entry whose marker is missing or does not match
its library is a miss and is rebuilt; a published, valid entry is never rewritten.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import filelock

from . import build, config
from ._version import __version__
from .errors import CacheError, CompileError
from .render import render
from .spec import AttentionSpec
from .toolchain import Toolchain, detect

CACHE_FORMAT = 1
META_NAME = "meta.json"


@dataclass(frozen=True)
class CacheEntry:
    spec: AttentionSpec
    directory: Path
    meta: dict
    was_cached: bool        # True: found on disk; False: built by this call
    build_seconds: float    # compile time when built now or when it was first built

    @property
    def library_path(self) -> Path:
        return self.directory / build.LIBRARY_NAME

    @property
    def source_path(self) -> Path:
        return self.directory / build.SOURCE_NAME


def root() -> Path:
    return _versioned(config.cache_dir())


@functools.lru_cache(maxsize=16)
def _versioned(directory: Path) -> Path:    # asked on every kernel lookup: keep it cheap
    return directory / f"v{CACHE_FORMAT}"


def cache_key(spec: AttentionSpec, source: str, command: list[str], toolchain: Toolchain) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "attngen": __version__,
        "spec": spec.to_dict(),
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "command": command,
        "compiler": toolchain.compiler_id,
        "isa": toolchain.isa,
        "platform": [platform.system(), platform.machine(), sysconfig.get_platform(),
                     sys.implementation.cache_tag],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_valid_meta(directory: Path, key: str | None = None) -> dict | None:
    """meta.json of a complete entry (matching `key` if given), else None. Never raises."""
    try:
        meta = json.loads((directory / META_NAME).read_text())
        library = directory / build.LIBRARY_NAME
        if key is not None and meta.get("key") != key:
            return None
        if library.stat().st_size != meta["library_size"]:
            return None
        if _file_sha256(library) != meta["library_sha256"]:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _discard(directory: Path) -> None:
    """Move an invalid entry out of the way, then delete it. Processes that already mapped
    its library keep their (unlinked) copy."""
    if not directory.exists():
        return
    trash = directory.parent / f".trash-{uuid.uuid4().hex}"
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _keep_failed_source(spec: AttentionSpec, digest: str, source: str) -> Path:
    failed = root() / "failed"
    failed.mkdir(parents=True, exist_ok=True)
    path = failed / f"{spec.slug}-{digest[:16]}.c"
    path.write_text(source)
    return path


def lookup(spec: AttentionSpec, *, tile=None,
           broken_library_sha256: str | None = None) -> CacheEntry:
    """The built library for `spec` (blocked by `tile`, default: tuned or the ISA default):
    from disk when a valid entry exists, else built now.

    broken_library_sha256: the caller could not load the entry whose library has this hash;
    it is replaced, unless another process has replaced it already."""
    toolchain = detect()
    source = render(spec, toolchain.isa, tile)
    command = build.compile_command(toolchain)
    key = cache_key(spec, source, command, toolchain)
    isa_dir = root() / toolchain.isa
    directory = isa_dir / f"{spec.slug}-{key[:16]}"

    def usable(meta):
        return meta is not None and meta["library_sha256"] != broken_library_sha256

    meta = read_valid_meta(directory, key)
    if usable(meta):
        return CacheEntry(spec, directory, meta, True, meta.get("build_seconds", 0.0))

    lock_dir = isa_dir / ".locks"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the kernel cache at {isa_dir}: {exc}; "
                         "set ATTNGEN_CACHE_DIR to a writable directory") from exc
    lock = filelock.FileLock(str(lock_dir / f"{directory.name}.lock"), timeout=config.lock_timeout())
    try:
        with lock:
            meta = read_valid_meta(directory, key)
            if usable(meta):   # another process finished it while we waited
                return CacheEntry(spec, directory, meta, True, meta.get("build_seconds", 0.0))
            _discard(directory)
            return _build_and_publish(spec, source, key, toolchain, directory)
    except filelock.Timeout:
        raise CacheError(f"timed out after {config.lock_timeout():.0f} s waiting for another "
                         f"process to build {spec.slug} (lock {lock.lock_file}); raise "
                         "ATTNGEN_LOCK_TIMEOUT or remove a stale lock") from None


def _build_and_publish(spec, source, key, toolchain, directory: Path) -> CacheEntry:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        try:
            seconds = build.compile_in(tmp, source, toolchain)
        except CompileError as exc:
            exc.source_path = str(_keep_failed_source(spec, key, source))
            raise
        library = tmp / build.LIBRARY_NAME
        meta = {
            "key": key,
            "slug": spec.slug,
            "spec": spec.to_dict(),
            "attngen": __version__,
            "cache_format": CACHE_FORMAT,
            "isa": toolchain.isa,
            "compiler": toolchain.compiler_id,
            "command": build.compile_command(toolchain),
            "build_seconds": round(seconds, 4),
            "created": time.time(),
            "library_size": library.stat().st_size,
            "library_sha256": _file_sha256(library),
        }
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json_atomic(directory / META_NAME, meta)   # completion marker, last
    return CacheEntry(spec, directory, meta, False, seconds)


def entries() -> list[dict]:
    """Metadata of every complete entry in the cache (all ISAs)."""
    found = []
    base = root()
    if not base.is_dir():
        return found
    for meta_path in sorted(base.glob(f"*/*/{META_NAME}")):
        meta = read_valid_meta(meta_path.parent)
        if meta is not None:
            meta = dict(meta, directory=str(meta_path.parent))
            found.append(meta)
    return found


def clear() -> int:
    """Delete every entry; returns how many complete entries there were."""
    count = len(entries())
    base = root()
    if base.exists():
        trash = base.parent / f".trash-{uuid.uuid4().hex}"
        os.replace(base, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return count
