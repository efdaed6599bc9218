"""generated/ holds the rendered C of the canonical specs; it must match the templates."""
from pathlib import Path

from attngen import manifest, render

GENERATED = Path(__file__).resolve().parent.parent / "generated"


def test_generated_is_current():
    stale = [spec.slug for spec in manifest.CANONICAL
             if not (GENERATED / f"{spec.slug}.c").is_file()
             or (GENERATED / f"{spec.slug}.c").read_text() != render(spec, manifest.GENERATED_ISA)]
    assert not stale, f"generated/ is stale for {stale}: run `python cli.py generate`"


def test_no_orphans_in_generated():
    expected = {f"{spec.slug}.c" for spec in manifest.CANONICAL}
    assert {p.name for p in GENERATED.glob("*.c")} == expected
