"""Shared fixtures: a temporary kernel cache for the whole session, the manifest's kernels
built once, in parallel, before the tests that use them, and per-test empty caches."""
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

# Before attngen reads it: the suite never touches the user's cache.
os.environ["ATTNGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="attngen-test-cache-")
for _knob in ("ATTNGEN_ISA", "ATTNGEN_EXTRA_CFLAGS", "ATTNGEN_CC"):
    os.environ.pop(_knob, None)

import attngen  # noqa: E402
from attngen import kernel, manifest  # noqa: E402


@pytest.fixture(scope="session")
def manifest_kernels():
    """{spec: Kernel} for every spec of the regression manifest."""
    specs = manifest.regression_specs()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        kernels = list(pool.map(attngen.get_kernel, specs))
    return dict(zip(specs, kernels))


@pytest.fixture
def empty_kernel_memo(monkeypatch):
    """This process's kernel lookups start empty (restored after the test); calling the
    fixture's value empties them again mid-test."""
    def empty():
        monkeypatch.setattr(kernel, "_memo", {})
        monkeypatch.setattr(kernel, "_recent", {})
    empty()
    return empty


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch, empty_kernel_memo):
    """An empty cache directory and an empty in-process memo."""
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
