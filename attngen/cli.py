"""The `attngen` command: build a model's kernels, show generated C, manage the cache."""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import click

from . import cache, config, manifest
from .check import TOLERANCE, check_spec
from .errors import AttngenError, SpecError
from .kernel import get_kernel, loaded_kernel
from .models import embedded_models, load_config, model_kernels
from .render import render
from .spec import AttentionSpec


@click.group()
@click.version_option(package_name="attngen")
def main():
    """attngen: specialised CPU flash-attention kernels, generated from a spec."""


def _config_label(path: Path) -> str:
    """A model's name from its config path: the folder of a config.json, else the file."""
    return path.parent.name if path.name == "config.json" else path.stem


def _targets(models, configs, suite, phases, kv_layouts):
    """[(label, spec, description)] without duplicate specs, in a stable order."""
    targets, seen = [], set()

    def add(label, spec, description):
        if spec not in seen:
            seen.add(spec)
            targets.append((label, spec, description))

    for source in [*models, *configs]:
        cfg = load_config(source)
        label = source if source in embedded_models() else _config_label(Path(source))
        for mk in model_kernels(cfg, phases=phases, kv_layouts=kv_layouts):
            add(label, mk.spec, mk.description)
    if suite:
        for spec in manifest.regression_specs():
            add("suite", spec, "regression manifest")
    return targets


@main.command()
@click.option("--model", "models", multiple=True, metavar="NAME",
              help=f"An embedded model config: {', '.join(embedded_models())}.")
@click.option("--config", "configs", multiple=True, type=click.Path(exists=True),
              help="A Hugging Face config.json (or a directory holding one).")
@click.option("--suite", is_flag=True, help="Also build the whole regression manifest.")
@click.option("--phase", "phases", multiple=True, type=click.Choice(["prefill", "decode"]),
              default=("prefill", "decode"), show_default=True)
@click.option("--kv-layout", "kv_layouts", multiple=True,
              type=click.Choice(["contiguous", "paged"]), default=("contiguous", "paged"),
              show_default=True, help="KV cache layouts to build for.")
@click.option("--jobs", "-j", type=int, default=None, help="Parallel compiles (default: cores).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check each kernel against the float64 reference on a small input.")
def build(models, configs, suite, phases, kv_layouts, jobs, check):
    """Pre-build (and check) every kernel a model needs, so serving never compiles."""
    if not (models or configs or suite):
        raise click.UsageError("give --model NAME, --config PATH or --suite")
    try:
        targets = _targets(models, configs, suite, phases, kv_layouts)
    except (AttngenError, ValueError) as exc:
        raise click.ClickException(str(exc))
    from tqdm import tqdm

    jobs = jobs or config.default_num_threads()
    already_loaded = {spec for _, spec, _ in targets if loaded_kernel(spec) is not None}
    kernels, failures = {}, {}
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(get_kernel, spec): spec for _, spec, _ in targets}
        for future in tqdm(as_completed(futures), total=len(futures), desc="building",
                           unit="kernel", file=sys.stderr, disable=None):
            spec = futures[future]
            try:
                kernels[spec] = future.result()
            except AttngenError as exc:
                failures[spec] = exc
    wall = time.perf_counter() - start

    rows, bad = [], 0
    for label, spec, description in targets:
        if spec in failures:
            rows.append((spec.slug, "FAILED", "-", label, str(failures[spec]).splitlines()[0]))
            bad += 1
            continue
        kernel = kernels[spec]
        fresh = not kernel.was_cached and spec not in already_loaded
        status = f"built {kernel.build_seconds:.2f} s" if fresh else "cache hit"
        error = "-"
        if check:
            err = check_spec(spec, kernel)
            ok = err <= TOLERANCE[spec.dtype]
            bad += not ok
            error = f"{err:.1e}" + ("" if ok else " FAIL")
        rows.append((spec.slug, status, error, label, description))
    headers = ("kernel", "build", "max err", "model", "used for")
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, tuple("-" * w for w in widths), *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    click.echo(f"{len(targets)} kernels, {len(targets) - len(failures)} ready in {wall:.1f} s; "
               f"cache: {cache.root()}")
    for spec, exc in failures.items():
        click.echo(f"\n{spec.slug}: {exc}", err=True)
    if bad:
        raise click.ClickException(f"{bad} kernel(s) failed to build or check")


@main.command()
@click.argument("target")
@click.option("--isa", type=click.Choice(list(config.ISAS)), default=None,
              help="Render for this ISA instead of the detected one.")
def show(target, isa):
    """Print the generated C of a spec slug, or of every kernel of a model."""
    try:
        if target.startswith(("prefill_", "decode_")):
            specs = [AttentionSpec.from_slug(target)]
        else:
            specs = [mk.spec for mk in model_kernels(load_config(target))]
    except (SpecError, ValueError) as exc:
        raise click.ClickException(str(exc))
    for spec in specs:
        click.echo(render(spec, isa))


@main.command("tune")
@click.argument("target")
@click.option("--repeats", type=int, default=5, show_default=True,
              help="Timed calls per candidate (round-robin), median kept.")
def tune_command(target, repeats):
    """Time a few tile blockings of a spec (or of every kernel of a model) on this machine
    and store the fastest; later builds use it."""
    from . import tuning
    from .render import default_tile
    from .toolchain import detect

    try:
        if target.startswith(("prefill_", "decode_")):
            specs = [AttentionSpec.from_slug(target)]
        else:
            specs = [mk.spec for mk in model_kernels(load_config(target),
                                                     phases=("prefill", "decode"))]
    except (SpecError, ValueError) as exc:
        raise click.ClickException(str(exc))
    for spec in specs:
        default = default_tile(spec, detect().isa)
        ranked = tuning.tune(spec, repeats=repeats)
        best_tile, best = ranked[0]
        base = dict(ranked).get(default, best)
        click.echo(f"{spec.slug:<48} {best_tile.label():<26} {best * 1e3:8.2f} ms  "
                   f"({base / best:.2f}x the default {default.label()})")


@main.group("cache")
def cache_group():
    """Inspect or clear the kernel cache."""


@cache_group.command("path")
def cache_path():
    """Print the cache directory."""
    click.echo(cache.root())


@cache_group.command("list")
def cache_list():
    """List the cached kernels."""
    found = cache.entries()
    for meta in found:
        click.echo(f"{meta['slug']:<56} {meta['isa']:<8} {meta['build_seconds']:>6.2f} s  "
                   f"{meta['directory']}")
    click.echo(f"{len(found)} kernels in {cache.root()}")


@cache_group.command("clear")
@click.confirmation_option(prompt="Delete every cached kernel?")
def cache_clear():
    """Delete every cached kernel."""
    click.echo(f"removed {cache.clear()} kernels from {cache.root()}")


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="generated",
              show_default=True)
@click.option("--check", "check_only", is_flag=True,
              help="Do not write; exit 1 if any file differs from the templates.")
def generate(out_dir, check_only):
    """Render the canonical specs into generated/ (the checked-in C)."""
    out = Path(out_dir)
    stale = []
    files = manifest.generated_files()
    for name, spec, isa in files:
        path = out / name
        text = render(spec, isa)
        if not path.is_file() or path.read_text() != text:
            stale.append(path)
            if not check_only:
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if check_only and stale:
        raise click.ClickException("stale: " + ", ".join(map(str, stale))
                                   + " (run `attngen generate`)")
    click.echo(f"{len(stale)} of {len(files)} files "
               + ("stale" if check_only else "written") + f" in {out}")


@main.command("models")
def models_command():
    """List the embedded model configs and the kernels each needs."""
    for name in embedded_models():
        for mk in model_kernels(load_config(name)):
            click.echo(f"{name:<14} {mk.spec.slug:<44} {mk.description}")


if __name__ == "__main__":
    main()
