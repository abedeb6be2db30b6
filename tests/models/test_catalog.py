"""The packaged catalogue is complete, the loader is strict, and verify_present names the file."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from facefleet.models.catalog import (
    DEFAULT_CATALOG,
    Catalog,
    CatalogError,
    ModelEntry,
    UnknownModelError,
    verify_present,
)
from facefleet.models.integrity import Stamp, sha256_file, write_stamp

PIPELINE = {
    "det_10g": "detector",
    "w600k_r50": "recognizer",
    "inswapper_128": "swapper",
    "gfpgan_1.4": "enhancer",
}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def test_default_catalog_is_the_packaged_file(catalog: Catalog) -> None:
    assert catalog.source == DEFAULT_CATALOG
    assert DEFAULT_CATALOG.name == "catalog.yaml" and DEFAULT_CATALOG.parent.name == "models"


def test_pipeline_models_are_required_with_their_roles(catalog: Catalog) -> None:
    assert {n: catalog.entry(n).role for n in PIPELINE} == PIPELINE
    assert set(catalog.default_names) == set(PIPELINE)


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in Catalog.load().names])
def test_every_entry_is_complete(catalog: Catalog, name: str) -> None:
    entry = catalog.entry(name)
    assert entry.file and "/" not in entry.file
    assert entry.bytes > 1_000_000
    assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    assert entry.urls and all(u.startswith("https://") for u in entry.urls)
    assert entry.licence
    for field in ("bytes", "sha256", "urls", "licence"):
        assert field in entry.provenance, f"{name}: no provenance for {field}"


@pytest.mark.parametrize(
    ("name", "sha256", "size"),
    [
        pytest.param(
            "det_10g",
            "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91",
            16_923_827,
            id="det_10g",
        ),
        pytest.param(
            "w600k_r50",
            "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43",
            174_383_860,
            id="w600k_r50",
        ),
        pytest.param(
            "inswapper_128",
            "e4a3f08c753cb72d04e10aa0f7dbe3deebbf39567d4ead6dce08e98aa49e16af",
            554_253_681,
            id="inswapper_128",
        ),
        pytest.param(
            "gfpgan_1.4",
            "accc4757b26bdb89b32b4d3500d4f79c9dff97c1dd7c7104bf9dcb95e3311385",
            340_299_087,
            id="gfpgan_1.4",
        ),
    ],
)
def test_values_match_the_reference(catalog: Catalog, name: str, sha256: str, size: int) -> None:
    entry = catalog.entry(name)
    assert (entry.sha256, entry.bytes) == (sha256, size)
    assert "sha256" in entry.third_party_fields()


def test_unknown_name_lists_the_known_ones(catalog: Catalog) -> None:
    with pytest.raises(UnknownModelError) as info:
        catalog.entry("inswapper_256")
    message = str(info.value)
    assert "inswapper_256" in message
    assert all(n in message for n in PIPELINE)


def test_path_for_is_the_plain_file_in_the_model_dir(catalog: Catalog, tmp_path: Path) -> None:
    assert catalog.path_for("inswapper_128", tmp_path) == tmp_path / "inswapper_128.onnx"


GOOD = """\
schema: 1
models:
  - name: m
    file: m.onnx
    role: detector
    bytes: 10
    sha256: {sha}
    licence: MIT
    urls: [m.onnx]
""".format(sha="a" * 64)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("[: not yaml", "not valid YAML", id="bad-yaml"),
        pytest.param(GOOD.replace("schema: 1", "schema: 2"), "schema must be 1", id="schema"),
        pytest.param(GOOD.replace("    bytes: 10\n", ""), "missing bytes", id="no-bytes"),
        pytest.param(GOOD.replace("bytes: 10", "bytes: -1"), "positive integer", id="neg-bytes"),
        pytest.param(GOOD.replace("a" * 64, "A" * 64), "64 lowercase hex", id="sha-case"),
        pytest.param(GOOD.replace("role: detector", "role: upscaler"), "role", id="role"),
        pytest.param(GOOD.replace("file: m.onnx", "file: ../m.onnx"), "plain file", id="path"),
        pytest.param(GOOD + "    colour: red\n", "unknown keys ['colour']", id="typo-key"),
        pytest.param(
            GOOD + "    provenance: {sha: third-party}\n", "unknown fields", id="provenance-typo"
        ),
        pytest.param(GOOD + GOOD.split("models:\n")[1], "duplicate name", id="duplicate"),
    ],
)
def test_malformed_catalogues_are_rejected(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=re.escape(message)):
        Catalog.load(path)


def test_missing_catalogue_file_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read catalogue"):
        Catalog.load(tmp_path / "nope.yaml")


def _one_entry_catalog(tmp_path: Path, content: bytes) -> tuple[Catalog, ModelEntry]:
    import hashlib

    text = textwrap.dedent(f"""\
        schema: 1
        models:
          - name: swap
            file: swap.onnx
            role: swapper
            bytes: {len(content)}
            sha256: {hashlib.sha256(content).hexdigest()}
            licence: test
            urls: [swap.onnx]
        """)
    (tmp_path / "catalog.yaml").write_text(text)
    catalog = Catalog.load(tmp_path / "catalog.yaml")
    return catalog, catalog.entry("swap")


@pytest.mark.parametrize(
    ("prepare", "deep", "kind", "fragment"),
    [
        pytest.param(None, False, "missing", "is missing: expected", id="missing"),
        pytest.param(b"short", False, "size", "has 5 bytes, expected 11", id="truncated"),
        pytest.param(b"other bytes", False, None, "", id="same-size-unchecked-when-quick"),
        pytest.param(b"other bytes", True, "checksum", "has sha256", id="same-size-deep"),
        pytest.param(b"model bytes", True, None, "", id="good"),
    ],
)
def test_verify_present_names_file_and_entry(
    prepare: bytes | None, deep: bool, kind: str | None, fragment: str, tmp_path: Path
) -> None:
    catalog, entry = _one_entry_catalog(tmp_path, b"model bytes")
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    if prepare is not None:
        (model_dir / entry.file).write_bytes(prepare)

    problems = verify_present(model_dir, ["swap"], catalog=catalog, deep=deep)

    if kind is None:
        assert problems == []
        return
    (problem,) = problems
    assert problem.kind == kind
    assert fragment in str(problem)
    assert "swap.onnx" in str(problem) and "catalogue entry swap" in str(problem)
    assert "facefleet models pull" in str(problem)


def test_verify_present_trusts_a_matching_stamp_even_when_quick(tmp_path: Path) -> None:
    catalog, entry = _one_entry_catalog(tmp_path, b"model bytes")
    path = tmp_path / entry.file
    path.write_bytes(b"other bytes")
    write_stamp(tmp_path, entry.file, Stamp.of(path.stat(), sha256_file(path)))

    (problem,) = catalog.verify_present(tmp_path, deep=False)

    assert problem.kind == "checksum"


def test_verify_present_deep_hashes_without_writing_stamps(tmp_path: Path) -> None:
    catalog, entry = _one_entry_catalog(tmp_path, b"model bytes")
    (tmp_path / entry.file).write_bytes(b"model bytes")
    assert catalog.verify_present(tmp_path, deep=True) == []
    assert not (tmp_path / ".verified").exists()
