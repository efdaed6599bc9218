"""Shared fixtures: a temporary kernel cache for the whole session, and the manifest's
kernels built once, in parallel, before the tests that use them."""
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

# Before attngen reads it: the suite never touches the user's cache.
os.environ["ATTNGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="attngen-test-cache-")
for _knob in ("ATTNGEN_ISA", "ATTNGEN_EXTRA_CFLAGS", "ATTNGEN_CC"):
    os.environ.pop(_knob, None)

import attngen  # noqa: E402
from attngen import manifest  # noqa: E402


@pytest.fixture(scope="session")
def manifest_kernels():
    """{spec: Kernel} for every spec of the regression manifest."""
    specs = manifest.regression_specs()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        kernels = list(pool.map(attngen.get_kernel, specs))
    return dict(zip(specs, kernels))
