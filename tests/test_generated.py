"""generated/ holds the rendered C of the canonical specs; it must match the templates."""
from pathlib import Path

from attngen import manifest, render

GENERATED = Path(__file__).resolve().parent.parent / "generated"


def test_generated_is_current():
    stale = [name for name, spec, isa in manifest.generated_files()
             if not (GENERATED / name).is_file() or (GENERATED / name).read_text() != render(spec, isa)]
    assert not stale, f"generated/ is stale for {stale}: run `python cli.py generate`"


def test_no_orphans_in_generated():
    expected = {name for name, _, _ in manifest.generated_files()}
    assert {p.name for p in GENERATED.glob("*.c")} == expected
