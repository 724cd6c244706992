"""A registry of embedding versions and the maps between their spaces (protocols.md §5-§6).

A registry is a directory holding ``registry.json`` (rewritten atomically on every change)::

    {"format": "fct-embedding-registry", "format_version": 1,
     "versions": [VersionManifest, ...], "edges": [Edge, ...]}

A *version* is one embedding model (:class:`VersionManifest`); ``change`` says how it differs from
its parent in the semantic-versioning sense: ``major`` = new architecture or embedding width,
``minor`` = new extraction (e.g. another pooling), ``patch`` = retrained on new data.

An *edge* says how embeddings of ``source`` are brought into the space of ``target``:

``identity``
    the two versions share one space (e.g. a BCT-trained model and its old model): embeddings are
    compared as they are. The statement is symmetric, so :meth:`VersionRegistry.path` follows an
    identity edge in both directions.
``transformation``
    an fct model file of kind ``transformation`` (``fct.models.model_file``) mapping (N, d_source)
    to (N, d_target): an FCT h old -> new, or a learned backward map new -> old saved as a
    ``LINEAR`` transformation. It is applied to stored embeddings alone, so a head trained with a
    side-information model is refused.

Relative paths (``model_path``, an edge's ``path``) are resolved against the registry directory,
so a registry directory that holds its map files can be moved as a whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from fct.errors import UserError
from fct.io import atomic_write_json, file_sha256, read_tagged_json

PathLike = Union[str, os.PathLike]
EmbeddingMap = Callable[[torch.Tensor], torch.Tensor]  # (N, d_source) -> (N, d_target)

REGISTRY_FILE = "registry.json"
FORMAT = "fct-embedding-registry"
FORMAT_VERSION = 1
CHANGES = ("major", "minor", "patch")
EDGE_KINDS = ("identity", "transformation")


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_id(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value or value != value.strip():
        raise UserError(f"{what} must be a non-empty string without surrounding spaces, got {value!r}")


def _strict_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` checked to hold only ``cls``'s field names and all of its required ones."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown = sorted(set(map(str, data)) - names)
    missing = sorted(required - set(data))
    if unknown or missing:
        raise UserError(f"{where}: unknown keys {unknown or 'none'}, missing keys {missing or 'none'}; "
                        f"valid: {', '.join(sorted(names))}")
    return dict(data)


@dataclass(frozen=True)
class VersionManifest:
    """One embedding version.

    ``compatible_with`` lists older versions whose embeddings this one claims to be comparable
    with after following registry edges (either direction); registration refuses a claim that no
    chain of edges backs. ``model_sha256`` is computed at registration when ``model_path`` exists.
    """

    id: str
    change: str  # major | minor | patch
    dim: int
    model_path: Optional[str] = None
    model_sha256: Optional[str] = None
    data: Any = None  # free text or a JSON-ready dict: what the model was trained on
    date: str = field(default_factory=_now_iso)
    compatible_with: tuple[str, ...] = ()
    parent: Optional[str] = None

    def __post_init__(self) -> None:
        _check_id(self.id, "version id")
        if self.change not in CHANGES:
            raise UserError(f"version {self.id!r}: change must be one of {', '.join(CHANGES)}, "
                            f"got {self.change!r}")
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise UserError(f"version {self.id!r}: dim must be a positive integer, got {self.dim!r}")
        for key in ("model_path", "model_sha256", "date", "parent"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise UserError(f"version {self.id!r}: {key} must be a string, got {type(value).__name__}")
        if self.model_path is not None:
            object.__setattr__(self, "model_path", os.fspath(self.model_path))
        if isinstance(self.compatible_with, str) or not isinstance(self.compatible_with, Iterable):
            raise UserError(f"version {self.id!r}: compatible_with must be a list of version ids, "
                            f"got {self.compatible_with!r}")
        object.__setattr__(self, "compatible_with", tuple(self.compatible_with))
        for other in self.compatible_with:
            _check_id(other, f"version {self.id!r}: compatible_with entry")
        try:
            json.dumps(self.data, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise UserError(f"version {self.id!r}: data must be JSON-ready text or a dict ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compatible_with"] = list(self.compatible_with)
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "version") -> "VersionManifest":
        return cls(**_strict_fields(cls, data, where))


@dataclass(frozen=True)
class Edge:
    """Embeddings of ``source`` -> the space of ``target``; ``path``/``sha256`` of the map file
    for a ``transformation`` edge (the sha is computed at registration when not given)."""

    source: str
    target: str
    kind: str  # identity | transformation
    path: Optional[str] = None
    sha256: Optional[str] = None

    def __post_init__(self) -> None:
        _check_id(self.source, "edge source")
        _check_id(self.target, "edge target")
        name = f"edge {self.source} -> {self.target}"
        if self.source == self.target:
            raise UserError(f"{name}: an edge joins two different versions")
        if self.kind not in EDGE_KINDS:
            raise UserError(f"{name}: kind must be one of {', '.join(EDGE_KINDS)}, got {self.kind!r}")
        if self.path is not None:
            object.__setattr__(self, "path", os.fspath(self.path))
        if self.kind == "identity" and (self.path is not None or self.sha256 is not None):
            raise UserError(f"{name}: an identity edge has no map file (path and sha256 must be empty)")
        if self.kind == "transformation" and not self.path:
            raise UserError(f"{name}: a transformation edge needs the path of its map file")

    def describe(self) -> str:
        return f"{self.source} -> {self.target} ({self.kind}{'' if self.path is None else ': ' + self.path})"

    def reversed_identity(self) -> "Edge":
        """The same identity statement read target -> source."""
        assert self.kind == "identity"
        return Edge(self.target, self.source, "identity")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "edge") -> "Edge":
        return cls(**_strict_fields(cls, data, where))


def edges_fingerprint(edges: Sequence[Edge]) -> str:
    """SHA-256 of a chain of edges (their versions, kinds and map-file hashes): changes whenever
    any map on the chain does."""
    text = json.dumps([e.to_dict() for e in edges], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Applying maps
# --------------------------------------------------------------------------------------------


def _resolve(path: str, root: Optional[Path]) -> Path:
    p = Path(path)
    return p if p.is_absolute() or root is None else root / p


def _needs_side_information(arch_params: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
    """Whether a transformation was trained with a side-information model's features.

    fct training records ``meta.side_info_model_path``; a file without it counts as such when its
    side branch is wider or narrower than its old branch (it cannot take the old feature then)."""
    if meta.get("side_info_model_path") is not None:
        return True
    side = arch_params.get("side_info_dim")
    return side is not None and side != arch_params.get("old_embedding_dim")


def _read_transformation(edge: Edge, file: Path) -> dict[str, Any]:
    """Header of a transformation edge's map file, checked to be a feature map usable alone."""
    from fct.models import read_model_file

    if not file.is_file():
        raise UserError(f"edge {edge.source} -> {edge.target}: map file {file} does not exist")
    data = read_model_file(file)
    if data["kind"] != "transformation":
        raise UserError(f"edge {edge.source} -> {edge.target}: {file} is a model file of kind "
                        f"{data['kind']!r}; an edge needs a 'transformation' file (it maps stored "
                        "embeddings, not images)")
    if _needs_side_information(data["arch_params"], data["meta"]):
        side = data["meta"].get("side_info_model_path")
        raise UserError(
            f"edge {edge.source} -> {edge.target}: {file} was trained with side-information features"
            f"{f' (from {side})' if side else ''}; it needs those features of every image, so it cannot "
            "convert stored embeddings alone. Register a transformation trained without side information "
            "(side_info_dim null), or re-extract the images with the transformed_old model")
    return data


def load_map(edge: Edge, root: Optional[PathLike] = None,
             device: Union[str, torch.device] = "cpu") -> EmbeddingMap:
    """The function of one edge: (N, d_source) -> (N, d_target) (float32 on ``device``; an identity
    edge returns its input unchanged).

    A transformation file is loaded with ``weights_only`` (``fct.models.load_model_file``), its
    SHA-256 checked against the edge's, and applied in eval mode under ``inference_mode``; the
    result is ``TransformationOutput.feature``. ``root`` resolves a relative map path.
    """
    if edge.kind == "identity":
        return lambda x: x
    if edge.kind != "transformation":  # Edge.__post_init__ already refuses other kinds
        raise UserError(f"edge {edge.describe()}: unknown kind {edge.kind!r}")
    from fct.models import load_model_file

    file = _resolve(edge.path, None if root is None else Path(root))  # type: ignore[arg-type]
    if not file.is_file():
        raise UserError(f"edge {edge.source} -> {edge.target}: map file {file} does not exist")
    actual = file_sha256(file)
    if edge.sha256 is not None and actual != edge.sha256:
        raise UserError(f"edge {edge.source} -> {edge.target}: the map file {file} changed since it was "
                        f"registered (sha256 {actual[:12]}..., registered {edge.sha256[:12]}...); register "
                        "it again as a new edge or restore the original file")
    _read_transformation(edge, file)
    model = load_model_file(file, map_location=device).eval()
    dtype = next(model.parameters()).dtype

    def apply(x: torch.Tensor) -> torch.Tensor:
        """(N, d_source) -> (N, d_target)."""
        with torch.inference_mode():
            return model(x.to(device=device, dtype=dtype)).feature

    return apply


def compose_maps(maps: Sequence[EmbeddingMap]) -> EmbeddingMap:
    """x -> maps[-1](...maps[0](x)); the empty chain is the identity."""
    maps = list(maps)

    def apply(x: torch.Tensor) -> torch.Tensor:
        for f in maps:
            x = f(x)
        return x

    return apply


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


class VersionRegistry:
    """Versions and edges of one registry directory; every change is saved atomically."""

    def __init__(self, root: PathLike, versions: Sequence[VersionManifest] = (),
                 edges: Sequence[Edge] = ()) -> None:
        self.root = Path(root)
        self._versions: dict[str, VersionManifest] = {v.id: v for v in versions}
        self._edges: list[Edge] = list(edges)

    # ---- opening / saving ------------------------------------------------------------------

    @property
    def file(self) -> Path:
        return self.root / REGISTRY_FILE

    @classmethod
    def create(cls, root: PathLike) -> "VersionRegistry":
        """A new, empty registry in ``root`` (created if needed); refuses to overwrite one."""
        reg = cls(root)
        if reg.file.exists():
            raise UserError(f"{reg.file} already exists; open it with VersionRegistry.open")
        reg.save()
        return reg

    @classmethod
    def open(cls, root: PathLike) -> "VersionRegistry":
        """The registry saved in ``root``; malformed files raise UserError naming the problem."""
        file = Path(root) / REGISTRY_FILE
        if not file.is_file():
            raise UserError(f"no embedding registry at {root} ({REGISTRY_FILE} not found); create one first")
        data = read_tagged_json(file, FORMAT, FORMAT_VERSION, "an fct embedding registry", "format_version")
        extra = sorted(set(data) - {"format", "format_version", "versions", "edges"})
        if extra or not isinstance(data.get("versions"), list) or not isinstance(data.get("edges"), list):
            raise UserError(f"{file}: malformed registry (needs lists 'versions' and 'edges'; "
                            f"unexpected keys {extra or 'none'})")
        versions = [VersionManifest.from_dict(v, f"{file}: versions[{i}]")
                    for i, v in enumerate(data["versions"])]
        edges = [Edge.from_dict(e, f"{file}: edges[{i}]") for i, e in enumerate(data["edges"])]
        ids = [v.id for v in versions]
        if len(set(ids)) != len(ids):
            raise UserError(f"{file}: malformed registry (duplicate version ids)")
        unknown = sorted({x for e in edges for x in (e.source, e.target)} - set(ids))
        if unknown:
            raise UserError(f"{file}: malformed registry (edges name unknown versions {', '.join(unknown)})")
        return cls(root, versions, edges)

    def save(self) -> None:
        atomic_write_json({"format": FORMAT, "format_version": FORMAT_VERSION,
                           "versions": [v.to_dict() for v in self._versions.values()],
                           "edges": [e.to_dict() for e in self._edges]}, self.file)

    # ---- queries ---------------------------------------------------------------------------

    def versions(self) -> list[VersionManifest]:
        """All versions in registration order."""
        return list(self._versions.values())

    def edges(self) -> list[Edge]:
        return list(self._edges)

    def get(self, version_id: str) -> VersionManifest:
        try:
            return self._versions[version_id]
        except (KeyError, TypeError):
            raise UserError(f"unknown embedding version {version_id!r}; known: "
                            f"{', '.join(self._versions) or '(none registered)'}") from None

    def resolve(self, path: str) -> Path:
        """A stored path; relative ones are relative to the registry directory."""
        return _resolve(path, self.root)

    def path(self, source: str, target: str) -> list[Edge]:
        """The edges of a shortest chain source -> target (BFS; [] when source == target).

        Identity edges are followed both ways (returned read in the direction travelled)."""
        self.get(source), self.get(target)
        found = _shortest_path(self._edges, source, target)
        if found is None:
            listed = "; ".join(e.describe() for e in self._edges) or "none"
            raise UserError(f"no path of registry edges from {source} to {target}; edges: {listed}")
        return found

    def load_map(self, edge: Edge, device: Union[str, torch.device] = "cpu") -> EmbeddingMap:
        """:func:`load_map` with map paths resolved against this registry's directory."""
        return load_map(edge, self.root, device)

    def compose(self, edges: Sequence[Edge], device: Union[str, torch.device] = "cpu") -> EmbeddingMap:
        """The maps of a chain of edges, applied one by one; refuses a broken chain."""
        for a, b in zip(edges, edges[1:]):
            if a.target != b.source:
                raise UserError(f"edges do not form a chain: {a.describe()} is followed by {b.describe()}")
        return compose_maps([self.load_map(e, device) for e in edges])

    def converter(self, source: str, target: str, device: Union[str, torch.device] = "cpu") -> EmbeddingMap:
        """(N, d_source) embeddings of ``source`` -> (N, d_target) in ``target``'s space."""
        return self.compose(self.path(source, target), device)

    # ---- changes ---------------------------------------------------------------------------

    def _checked_edge(self, edge: Edge, dims: Mapping[str, int]) -> Edge:
        """``edge`` checked against the versions' dims and its map file; sha256 filled in."""
        name = f"edge {edge.source} -> {edge.target}"
        for end in (edge.source, edge.target):
            if end not in dims:
                raise UserError(f"{name}: unknown version {end!r}; known: {', '.join(dims)}")
        d_src, d_tgt = dims[edge.source], dims[edge.target]
        if edge.kind == "identity":
            if d_src != d_tgt:
                raise UserError(f"{name}: an identity edge joins versions of one space, but {edge.source} "
                                f"has dim {d_src} and {edge.target} dim {d_tgt}")
            return edge
        file = self.resolve(edge.path)  # type: ignore[arg-type]
        data = _read_transformation(edge, file)
        ap = data["arch_params"]
        got = (ap.get("old_embedding_dim"), ap.get("new_embedding_dim"))
        if got != (d_src, d_tgt):
            raise UserError(f"{name}: {file} maps {got[0]}-d to {got[1]}-d embeddings, but {edge.source} has "
                            f"dim {d_src} and {edge.target} dim {d_tgt}")
        sha = file_sha256(file)
        if edge.sha256 is not None and edge.sha256 != sha:
            raise UserError(f"{name}: sha256 given for {file} does not match the file (file {sha[:12]}..., "
                            f"given {edge.sha256[:12]}...)")
        return dataclasses.replace(edge, sha256=sha)

    def _check_new_edges(self, edges: Sequence[Edge], dims: Mapping[str, int]) -> list[Edge]:
        checked = [self._checked_edge(e, dims) for e in edges]
        seen = {(e.source, e.target) for e in self._edges}
        for e in checked:
            if (e.source, e.target) in seen:
                raise UserError(f"edge {e.source} -> {e.target} is already registered")
            seen.add((e.source, e.target))
        return checked

    def add_version(self, manifest: VersionManifest, edges: Sequence[Edge] = ()) -> VersionManifest:
        """Register ``manifest`` with edges joining it to older versions; returns the stored manifest
        (``model_sha256`` filled in). Refuses (UserError, nothing saved): a duplicate id, an unknown
        parent, a minor/patch change of width, edges not touching the new version or whose dims do not
        fit, and a ``compatible_with`` claim with no chain of edges either way between the versions."""
        vid = manifest.id
        if vid in self._versions:
            raise UserError(f"version {vid!r} is already registered")
        if manifest.parent is not None:
            parent = self.get(manifest.parent)
            if manifest.change != "major" and parent.dim != manifest.dim:
                raise UserError(f"version {vid!r}: a {manifest.change} change keeps the embedding width, but "
                                f"dim {manifest.dim} differs from parent {parent.id}'s {parent.dim}; a new "
                                "width is a major change")
        for other in manifest.compatible_with:
            self.get(other)
        if manifest.model_path is not None:
            model_file = self.resolve(manifest.model_path)
            if model_file.is_file():
                sha = file_sha256(model_file)
                if manifest.model_sha256 is not None and manifest.model_sha256 != sha:
                    raise UserError(f"version {vid!r}: model_sha256 does not match {model_file}")
                manifest = dataclasses.replace(manifest, model_sha256=sha)
        for e in edges:
            if vid not in (e.source, e.target):
                raise UserError(f"edge {e.source} -> {e.target} does not touch the new version {vid!r}; "
                                "add edges between registered versions with add_edge")
        dims = {v.id: v.dim for v in self._versions.values()}
        dims[vid] = manifest.dim
        checked = self._check_new_edges(edges, dims)
        all_edges = self._edges + checked
        broken = [x for x in manifest.compatible_with
                  if _shortest_path(all_edges, x, vid) is None and _shortest_path(all_edges, vid, x) is None]
        if broken:
            listed = "; ".join(e.describe() for e in checked) or "none"
            raise UserError(f"version {vid!r} claims compatibility with {', '.join(broken)}, but no chain of "
                            f"edges joins them in either direction (its edges: {listed}); register the map "
                            "(an identity edge or a transformation file) or drop the claim")
        self._versions[vid] = manifest
        self._edges = all_edges
        self.save()
        return manifest

    def add_edge(self, edge: Edge) -> Edge:
        """Register a map between two registered versions (e.g. a backward map trained later)."""
        (checked,) = self._check_new_edges([edge], {v.id: v.dim for v in self._versions.values()})
        self._edges.append(checked)
        self.save()
        return checked


def _shortest_path(edges: Sequence[Edge], source: str, target: str) -> Optional[list[Edge]]:
    """BFS over ``edges`` (identity edges both ways); None when target is unreachable."""
    out: dict[str, list[Edge]] = {}
    for e in edges:
        out.setdefault(e.source, []).append(e)
        if e.kind == "identity":
            out.setdefault(e.target, []).append(e.reversed_identity())
    previous: dict[str, Optional[Edge]] = {source: None}
    queue = deque([source])
    while queue:
        node = queue.popleft()
        if node == target:
            chain: list[Edge] = []
            while previous[node] is not None:
                edge = previous[node]
                chain.append(edge)  # type: ignore[arg-type]
                node = edge.source  # type: ignore[union-attr]
            return chain[::-1]
        for e in out.get(node, []):
            if e.target not in previous:
                previous[e.target] = e
                queue.append(e.target)
    return None


__all__ = [
    "CHANGES",
    "EDGE_KINDS",
    "Edge",
    "EmbeddingMap",
    "VersionManifest",
    "VersionRegistry",
    "compose_maps",
    "edges_fingerprint",
    "load_map",
]
