"""The README's migration section and its generated references are current."""

from __future__ import annotations

from pathlib import Path

from meshkv.cli.reference_docs import SECTIONS, rendered

README = Path(__file__).resolve().parents[1] / "README.md"


def test_generated_sections_match_the_code():
    text = README.read_text()
    assert rendered(text) == text, (
        "README.md's generated sections are stale: run "
        "`python -m meshkv.cli.reference_docs README.md`"
    )
    for name in SECTIONS:
        assert f"<!-- BEGIN GENERATED: {name} -->" in text


def test_migration_section_shows_the_one_word_that_changes():
    text = README.read_text()
    assert "## Migrating from LMCache P2P" in text
    assert '-  --kv-transfer-config \'{"kv_connector":"LMCacheConnectorV1"' in text
    assert '+  --kv-transfer-config \'{"kv_connector":"MeshKVConnector"' in text
