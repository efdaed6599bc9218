"""Disk cache: one compile across processes, corrupt entries rebuilt, keys cover every field,
compile errors carry the compiler's output."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap

import filelock
import pytest

import attngen
from attngen import build, cache, toolchain
from attngen.check import check_spec
from attngen.errors import CompileError
from attngen.spec import AttentionSpec


SPEC = AttentionSpec(head_dim=32, gqa=2, mask="causal")

CHILD = textwrap.dedent("""
    import json, sys, time
    start = time.perf_counter()
    import attngen
    from attngen.check import check_spec
    spec = attngen.AttentionSpec(head_dim=32, gqa=2, mask="causal")
    k = attngen.get_kernel(spec)
    ready = time.perf_counter() - start
    print(json.dumps({"cached": k.was_cached, "err": check_spec(spec, k), "ready_s": ready}))
""")


def _children(n, env):
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_two_processes_compile_once(fresh_cache):
    env = dict(os.environ, ATTNGEN_CACHE_DIR=str(fresh_cache))
    results = _children(2, env)
    assert sorted(r["cached"] for r in results) == [False, True]   # exactly one compile
    assert all(r["err"] < 1e-5 for r in results)
    assert len(cache.entries()) == 1
    # A new process loads it without compiling.
    (again,) = _children(1, env)
    assert again["cached"] is True


CLOSE_CHILD = textwrap.dedent("""
    import attngen
    from attngen import kernel
    from attngen.check import check_spec
    spec = attngen.AttentionSpec(head_dim=32, gqa=2, mask="causal")
    k = attngen.get_kernel(spec)
    assert check_spec(spec, k) < 1e-5   # starts the OpenMP workers
    kernel.ffi.dlclose(k._lib)          # what cffi does to every library at exit
    with open("/proc/self/maps") as maps:
        print(str(k.entry.library_path) in maps.read())
""")


def test_library_stays_mapped_when_closed(fresh_cache):
    # Unmapping the kernel (and its libgomp) under OpenMP workers still spinning in it was a
    # segfault at exit, about one run in 15 with two processes on 2 cores.
    env = dict(os.environ, ATTNGEN_CACHE_DIR=str(fresh_cache))
    proc = subprocess.run([sys.executable, "-c", CLOSE_CHILD], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True"]


def test_same_spec_same_kernel_object(fresh_cache):
    assert attngen.get_kernel(SPEC) is attngen.get_kernel(AttentionSpec(32, 2, "causal"))


def _entry_dir():
    (meta,) = cache.entries()
    return meta["directory"]


@pytest.mark.parametrize("damage", ["truncate_library", "truncate_meta", "delete_meta",
                                    "garbage_library_same_size"])
def test_corrupt_entry_is_rebuilt(fresh_cache, empty_kernel_memo, damage):
    first = cache.lookup(SPEC)
    assert not first.was_cached
    library, meta = first.library_path, first.directory / cache.META_NAME
    if damage == "truncate_library":
        library.write_bytes(library.read_bytes()[:1000])
    elif damage == "truncate_meta":
        meta.write_text(meta.read_text()[:20])
    elif damage == "delete_meta":
        meta.unlink()
    else:
        library.write_bytes(b"\0" * library.stat().st_size)
    second = cache.lookup(SPEC)
    assert not second.was_cached          # a miss, rebuilt, not a crash
    empty_kernel_memo()
    assert check_spec(SPEC) < 1e-5        # and the rebuilt library works
    assert cache.lookup(SPEC).was_cached


def test_unloadable_library_with_matching_meta_is_replaced(fresh_cache):
    entry = cache.lookup(SPEC)
    entry.library_path.write_bytes(b"not an ELF file")
    meta = json.loads((entry.directory / cache.META_NAME).read_text())
    meta.update(library_size=15, library_sha256=cache._file_sha256(entry.library_path))
    (entry.directory / cache.META_NAME).write_text(json.dumps(meta))
    k = attngen.get_kernel(SPEC)         # dlopen fails, so the entry is rebuilt and loaded
    assert not k.was_cached
    assert check_spec(SPEC, k) < 1e-5


def test_every_spec_field_changes_the_key():
    tc = toolchain.detect()
    command = build.compile_command(tc)
    base = AttentionSpec(head_dim=64, gqa=2)
    variants = dict(head_dim=72, gqa=4, mask="causal", documents=True, bias="alibi",
                    softcap=True, sinks=True, kv_layout="paged")
    assert set(variants) | {"dtype", "phase"} == {f.name for f in dataclasses.fields(AttentionSpec)}
    keys = {cache.cache_key(base, attngen.render(base, tc.isa), command, tc)}
    for field, value in variants.items():
        spec = base.replace(**{field: value})
        keys.add(cache.cache_key(spec, attngen.render(spec, tc.isa), command, tc))
        assert spec.digest != base.digest and spec.slug != base.slug
    assert len(keys) == len(variants) + 1
    # The compile command is part of the key too.
    assert cache.cache_key(base, "x", command, tc) != cache.cache_key(base, "x", command + ["-g"], tc)


def test_bad_compiler_flag_raises_compile_error(fresh_cache, monkeypatch):
    monkeypatch.setenv("ATTNGEN_EXTRA_CFLAGS", "-fno-such-flag-for-attngen")
    with pytest.raises(CompileError) as info:
        attngen.get_kernel(SPEC)
    err = info.value
    assert "-fno-such-flag-for-attngen" in err.command
    assert "no-such-flag" in err.output            # the compiler's own message
    assert os.path.isfile(err.source_path)
    assert cache.entries() == []                   # nothing half-built was published
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.command, clone.output, clone.source_path) == (err.command, err.output, err.source_path)


def test_broken_template_raises_compile_error(fresh_cache, monkeypatch):
    real_render = cache.render
    monkeypatch.setattr(cache, "render",
                        lambda spec, isa, tile=None: real_render(spec, isa, tile) + "\nthis is not C;\n")
    with pytest.raises(CompileError) as info:
        cache.lookup(SPEC)
    assert "error" in info.value.output and "kernel.c" in info.value.output
    with open(info.value.source_path) as f:
        assert "this is not C" in f.read()
    assert "compiler output" in str(info.value)


def test_lock_timeout_is_a_clear_error(fresh_cache, monkeypatch):
    monkeypatch.setenv("ATTNGEN_LOCK_TIMEOUT", "0.2")
    tc = toolchain.detect()
    key = cache.cache_key(SPEC, attngen.render(SPEC, tc.isa), build.compile_command(tc), tc)
    lock_dir = cache.root() / tc.isa / ".locks"
    lock_dir.mkdir(parents=True)
    held = filelock.FileLock(str(lock_dir / f"{SPEC.slug}-{key[:16]}.lock"))
    with held:
        # Hold the lock from another thread's point of view: filelock is re-entrant per
        # object, so use a different process.
        code = (f"import attngen; attngen.get_kernel(attngen.AttentionSpec.from_slug({SPEC.slug!r}))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ), timeout=120)
    assert proc.returncode != 0
    assert "CacheError" in proc.stderr and "timed out" in proc.stderr


def test_cache_layout(fresh_cache):
    entry = cache.lookup(SPEC)
    tc = toolchain.detect()
    assert entry.directory.parent == fresh_cache / f"v{cache.CACHE_FORMAT}" / tc.isa
    assert entry.directory.name.startswith(SPEC.slug + "-")
    assert {p.name for p in entry.directory.iterdir()} == {"kernel.c", "kernel.so", "meta.json"}
    meta = json.loads((entry.directory / "meta.json").read_text())
    assert meta["slug"] == SPEC.slug and meta["command"][0] == tc.compiler
    assert not any(str(fresh_cache) in part for part in meta["command"])   # path-free
