"""The model catalogue: which weight files exist, how big they are, what they hash to, where from.

One YAML file (the packaged `models/catalog.yaml` by default, or the tiny one written by
`facefleet.models.tiny`) is the single source of truth for the init container (`facefleet models pull`)
and for the worker's start-up check (`verify_present`), so the two can never disagree about
which file a model is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

import yaml

from facefleet.models.integrity import Hasher, sha256_file, trusted_digest

Role = Literal[
    "detector", "recognizer", "swapper", "enhancer", "landmark", "attribute", "checkpoint"
]
ProblemKind = Literal["missing", "size", "checksum", "unreadable"]

SCHEMA_VERSION = 1
DEFAULT_CATALOG = Path(__file__).with_name("catalog.yaml")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MD5 = re.compile(r"[0-9a-f]{32}")
_REQUIRED = ("name", "file", "role", "bytes", "sha256", "urls", "licence")
_OPTIONAL = ("optional", "md5", "notes", "provenance")


class CatalogError(ValueError):
    """The catalogue file is unreadable or an entry is incomplete; a usage error, exit code 2."""


class UnknownModelError(CatalogError, LookupError):
    """A model name that is not in the catalogue; the message lists the known names."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    file: str
    role: Role
    bytes: int
    sha256: str
    urls: tuple[str, ...]
    """Absolute URLs (https, http, file, s3) or paths relative to a base URL / the catalogue."""
    licence: str
    optional: bool = False
    """Optional entries are pulled and required only when named explicitly."""
    md5: str | None = None
    notes: str = ""
    provenance: Mapping[str, str] = field(default_factory=dict)
    """Where each value came from, per field; values starting 'third-party' are not the publisher's."""

    def third_party_fields(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.provenance.items() if v.startswith("third-party"))


@dataclass(frozen=True)
class Problem:
    """One reason a model directory is not ready; str() is the operator-facing message."""

    name: str
    file: str
    path: Path
    kind: ProblemKind
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Catalog:
    entries: tuple[ModelEntry, ...]
    source: Path
    """The YAML file this was loaded from; relative URLs resolve against its directory."""

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        source = DEFAULT_CATALOG if path is None else Path(path)
        try:
            raw = yaml.safe_load(source.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CatalogError(f"cannot read catalogue {source}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise CatalogError(f"catalogue {source} is not valid YAML: {exc}") from exc
        return cls.from_mapping(raw, source)

    @classmethod
    def from_mapping(cls, raw: object, source: Path) -> Catalog:
        if not isinstance(raw, dict):
            raise CatalogError(f"{source}: expected a mapping with 'schema' and 'models'")
        if raw.get("schema") != SCHEMA_VERSION:
            raise CatalogError(
                f"{source}: schema must be {SCHEMA_VERSION}, got {raw.get('schema')!r}"
            )
        extra = set(raw) - {"schema", "models", "description"}
        if extra:
            raise CatalogError(f"{source}: unknown top-level keys {sorted(extra)}")
        items = raw.get("models")
        if not isinstance(items, list) or not items:
            raise CatalogError(f"{source}: 'models' must be a non-empty list")
        entries = tuple(
            _parse_entry(item, f"{source}: models[{i}]") for i, item in enumerate(items)
        )
        for attr in ("name", "file"):
            seen: set[str] = set()
            for entry in entries:
                value = getattr(entry, attr)
                if value in seen:
                    raise CatalogError(f"{source}: duplicate {attr} {value!r}")
                seen.add(value)
        return cls(entries=entries, source=source)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def default_names(self) -> tuple[str, ...]:
        """What `pull` and the worker need when no names are given: every non-optional entry."""
        return tuple(e.name for e in self.entries if not e.optional)

    def entry(self, name: str) -> ModelEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise UnknownModelError(
            f"unknown model {name!r}; {self.source} has: {', '.join(self.names)}"
        )

    def select(self, names: Iterable[str] | None = None) -> tuple[ModelEntry, ...]:
        """Entries for `names` in the order given (default: non-optional ones), checked up front."""
        wanted = self.default_names if names is None else tuple(names)
        return tuple(self.entry(n) for n in wanted)

    def by_role(self, role: Role) -> tuple[ModelEntry, ...]:
        return tuple(e for e in self.entries if e.role == role)

    def path_for(self, name: str, model_dir: Path) -> Path:
        return Path(model_dir) / self.entry(name).file

    def verify_present(
        self,
        model_dir: Path,
        names: Iterable[str] | None = None,
        *,
        deep: bool = False,
        hasher: Hasher = sha256_file,
    ) -> list[Problem]:
        """Why `model_dir` is not ready for `names`; empty when it is.

        The cheap check (the worker's start-up) looks at presence and size, and trusts a
        verified-stamp when one matches. `deep=True` also hashes files without a valid stamp;
        it never writes stamps, so it is safe on a read-only volume.
        """
        problems = []
        for entry in self.select(names):
            problem = _check_entry(entry, Path(model_dir), deep=deep, hasher=hasher)
            if problem is not None:
                problems.append(problem)
        return problems


def verify_present(
    model_dir: Path,
    names: Iterable[str] | None = None,
    *,
    catalog: Catalog | None = None,
    deep: bool = False,
) -> list[Problem]:
    """Start-up check for a worker: problems naming the file and its catalogue entry."""
    cat = Catalog.load() if catalog is None else catalog
    return cat.verify_present(model_dir, names, deep=deep)


def _check_entry(
    entry: ModelEntry, model_dir: Path, *, deep: bool, hasher: Hasher
) -> Problem | None:
    path = model_dir / entry.file
    hint = f"run `facefleet models pull --dest {model_dir} --only {entry.name}`"
    label = f"model {entry.name!r} ({entry.role}, catalogue entry {entry.name}, file {entry.file})"
    try:
        st = path.stat()
    except FileNotFoundError:
        return Problem(
            entry.name,
            entry.file,
            path,
            "missing",
            f"{label} is missing: expected {path} ({entry.bytes:,} bytes); {hint}",
        )
    except OSError as exc:
        return Problem(
            entry.name, entry.file, path, "unreadable", f"{label}: cannot stat {path}: {exc}"
        )
    if st.st_size != entry.bytes:
        return Problem(
            entry.name,
            entry.file,
            path,
            "size",
            f"{label} at {path} has {st.st_size:,} bytes, expected {entry.bytes:,} "
            f"(truncated or a different version); {hint}",
        )
    digest = trusted_digest(model_dir, entry.file, st)
    if digest is None and deep:
        try:
            digest = hasher(path)
        except OSError as exc:
            return Problem(
                entry.name, entry.file, path, "unreadable", f"{label}: cannot read {path}: {exc}"
            )
    if digest is not None and digest != entry.sha256:
        return Problem(
            entry.name,
            entry.file,
            path,
            "checksum",
            f"{label} at {path} has sha256 {digest}, expected {entry.sha256}; {hint}",
        )
    return None


def _parse_entry(item: object, where: str) -> ModelEntry:
    if not isinstance(item, dict):
        raise CatalogError(f"{where}: expected a mapping")
    name = item.get("name")
    if isinstance(name, str):
        where = f"{where} ({name})"
    missing = [k for k in _REQUIRED if item.get(k) in (None, "", [])]
    if missing:
        raise CatalogError(f"{where}: missing {', '.join(missing)}")
    unknown = set(item) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise CatalogError(f"{where}: unknown keys {sorted(unknown)}")

    def text(key: str) -> str:
        value = item[key]
        if not isinstance(value, str):
            raise CatalogError(f"{where}: {key} must be a string")
        return value.strip()

    file = text("file")
    if "/" in file or "\\" in file or file in (".", "..") or file.startswith("."):
        raise CatalogError(f"{where}: file must be a plain file name, got {file!r}")
    role = text("role")
    if role not in get_args(Role):
        raise CatalogError(f"{where}: role must be one of {', '.join(get_args(Role))}")
    size = item["bytes"]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise CatalogError(f"{where}: bytes must be a positive integer")
    sha256 = text("sha256")
    if not _SHA256.fullmatch(sha256):
        raise CatalogError(f"{where}: sha256 must be 64 lowercase hex characters")
    md5 = item.get("md5")
    if md5 is not None and not (isinstance(md5, str) and _MD5.fullmatch(md5)):
        raise CatalogError(f"{where}: md5 must be 32 lowercase hex characters")
    urls = item["urls"]
    if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
        raise CatalogError(f"{where}: urls must be a list of strings")
    provenance = item.get("provenance") or {}
    if not isinstance(provenance, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in provenance.items()
    ):
        raise CatalogError(f"{where}: provenance must map field names to strings")
    stray = set(provenance) - set(_REQUIRED) - set(_OPTIONAL)
    if stray:
        raise CatalogError(f"{where}: provenance names unknown fields {sorted(stray)}")
    optional = item.get("optional", False)
    if not isinstance(optional, bool):
        raise CatalogError(f"{where}: optional must be true or false")
    notes = item.get("notes", "")
    return ModelEntry(
        name=text("name"),
        file=file,
        role=cast(Role, role),
        bytes=size,
        sha256=sha256,
        urls=tuple(u.strip() for u in urls),
        licence=text("licence"),
        optional=optional,
        md5=md5,
        notes=str(notes).strip(),
        provenance={k: v.strip() for k, v in provenance.items()},
    )


def entries_to_mapping(entries: Sequence[ModelEntry]) -> dict[str, object]:
    """The YAML shape of a catalogue, for writers (the tiny models) that must match `load`."""
    models: list[dict[str, object]] = []
    for e in entries:
        item: dict[str, object] = {
            "name": e.name,
            "file": e.file,
            "role": e.role,
            "bytes": e.bytes,
            "sha256": e.sha256,
            "licence": e.licence,
            "urls": list(e.urls),
        }
        if e.optional:
            item["optional"] = True
        if e.md5:
            item["md5"] = e.md5
        if e.notes:
            item["notes"] = e.notes
        if e.provenance:
            item["provenance"] = dict(e.provenance)
        models.append(item)
    return {"schema": SCHEMA_VERSION, "models": models}
