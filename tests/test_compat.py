"""Version registry, chained maps, resumable conversion, compatibility-matrix metrics (fct.compat)."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fct.cli import run_main
from fct.compat import (
    Edge,
    VersionManifest,
    VersionRegistry,
    average_compatibility,
    average_metric,
    compatibility_criterion,
    matrix_summary,
    plot_matrix,
    plot_projection,
    update_gain,
)
from fct.compat import convert as convert_mod
from fct.compat.convert import convert_embeddings, open_features
from fct.errors import UserError
from fct.models import save_transformation
from fct.transformations import build_transformation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def linear_file(path: Path, d_in: int, d_out: int, seed: int, meta=None, side_info_dim=None):
    """A LINEAR transformation file; returns its effective map (A (d_out, d_in), b (d_out,)).

    LINEAR applies one affine map to [old, side], and side is the old feature again, so the map
    of x is (W[:, :d_in] + W[:, d_in:]) x + b."""
    torch.manual_seed(seed)
    h = build_transformation("LINEAR", old_embedding_dim=d_in, new_embedding_dim=d_out,
                             side_info_dim=side_info_dim)
    save_transformation(path, h, h.arch_params(), meta)
    w = h.linear.weight.detach().double()
    if side_info_dim is not None:
        return None
    return w[:, :d_in] + w[:, d_in:], h.linear.bias.detach().double()


@pytest.fixture
def chain(tmp_path):
    """v1 (4-d) -> v2 (6-d) -> v3 (5-d) with forward maps, and a backward map v3 -> v2."""
    root = tmp_path / "reg"
    reg = VersionRegistry.create(root)
    maps = {
        ("v1", "v2"): linear_file(root / "h12.pt", 4, 6, seed=1),
        ("v2", "v3"): linear_file(root / "h23.pt", 6, 5, seed=2),
        ("v3", "v2"): linear_file(root / "b32.pt", 5, 6, seed=3),
    }
    reg.add_version(VersionManifest("v1", "major", 4, data="digits, 5 classes"))
    reg.add_version(VersionManifest("v2", "major", 6, parent="v1", compatible_with=["v1"]),
                    edges=[Edge("v1", "v2", "transformation", "h12.pt")])
    reg.add_version(VersionManifest("v3", "major", 5, parent="v2", compatible_with=["v1", "v2"]),
                    edges=[Edge("v2", "v3", "transformation", str(root / "h23.pt")),
                           Edge("v3", "v2", "transformation", "b32.pt")])
    return reg, maps


def affine(x: torch.Tensor, ab) -> torch.Tensor:
    a, b = ab
    return x.double() @ a.T + b


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_persists_and_fills_hashes(chain, tmp_path):
    reg, _ = chain
    again = VersionRegistry.open(reg.root)
    assert [v.id for v in again.versions()] == ["v1", "v2", "v3"]
    assert again.get("v3").compatible_with == ("v1", "v2")
    assert again.get("v1").data == "digits, 5 classes"
    assert all(e.sha256 and len(e.sha256) == 64 for e in again.edges())
    assert again.edges() == reg.edges()
    saved = json.loads((reg.root / "registry.json").read_text())
    assert saved["format"] == "fct-embedding-registry" and len(saved["edges"]) == 3

    model = tmp_path / "model.bin"
    model.write_bytes(b"abc")
    v = reg.add_version(VersionManifest("v4", "patch", 5, model_path=str(model), parent="v3"))
    # sha256("abc")
    assert v.model_sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(UserError, match="already exists"):
        VersionRegistry.create(reg.root)
    with pytest.raises(UserError, match="no embedding registry"):
        VersionRegistry.open(tmp_path / "nowhere")


@pytest.mark.parametrize("text,message", [
    (b"\xff\xfe", "is not readable JSON"),
    ("{not json", "is not readable JSON"),
    ('["a list"]', "is not an fct embedding registry (no \"format\": \"fct-embedding-registry\")"),
    ('{"format": "fct-model", "format_version": 1}', "is not an fct embedding registry"),
    ('{"format": "fct-embedding-registry", "format_version": 9, "versions": [], "edges": []}',
     "has format_version 9; this fct reads version 1"),
    ('{"format": "fct-embedding-registry", "format_version": 1, "versions": {}, "edges": []}',
     "malformed registry (needs lists 'versions' and 'edges'"),
])
def test_a_damaged_registry_file_is_named(tmp_path, text, message):
    file = tmp_path / "registry.json"
    file.write_bytes(text) if isinstance(text, bytes) else file.write_text(text)
    with pytest.raises(UserError) as e:
        VersionRegistry.open(tmp_path)
    assert message in str(e.value) and str(file) in str(e.value)


def test_path_finding_forward_and_backward(chain):
    reg, _ = chain
    kinds = lambda edges: [(e.source, e.target) for e in edges]  # noqa: E731
    assert kinds(reg.path("v1", "v3")) == [("v1", "v2"), ("v2", "v3")]
    assert kinds(reg.path("v3", "v2")) == [("v3", "v2")]
    assert reg.path("v2", "v2") == []
    with pytest.raises(UserError, match="no path of registry edges from v3 to v1; edges: v1 -> v2"):
        reg.path("v3", "v1")
    linear_file(reg.root / "b21.pt", 6, 4, seed=4)
    reg.add_edge(Edge("v2", "v1", "transformation", "b21.pt"))
    assert kinds(reg.path("v3", "v1")) == [("v3", "v2"), ("v2", "v1")]
    # a direct edge is preferred over the two-step chain (shortest path)
    linear_file(reg.root / "h13.pt", 4, 5, seed=5)
    reg.add_edge(Edge("v1", "v3", "transformation", "h13.pt"))
    assert kinds(reg.path("v1", "v3")) == [("v1", "v3")]
    # an identity edge is followed both ways
    reg.add_version(VersionManifest("v4", "patch", 5, parent="v3", compatible_with=["v3"]),
                    edges=[Edge("v4", "v3", "identity")])
    assert [(e.source, e.target, e.kind) for e in reg.path("v3", "v4")] == [("v3", "v4", "identity")]
    assert kinds(reg.path("v4", "v1")) == [("v4", "v3"), ("v3", "v2"), ("v2", "v1")]


def test_unknown_versions_are_refused(chain):
    reg, _ = chain
    with pytest.raises(UserError, match="unknown embedding version 'v9'; known: v1, v2, v3"):
        reg.path("v1", "v9")
    with pytest.raises(UserError, match="unknown embedding version 'v0'"):
        reg.add_version(VersionManifest("v4", "patch", 5, parent="v0"))
    with pytest.raises(UserError, match="unknown embedding version 'vx'"):
        reg.add_version(VersionManifest("v4", "major", 5, compatible_with=["vx"]))
    with pytest.raises(UserError, match="unknown version 'v7'"):
        reg.add_version(VersionManifest("v4", "major", 5), edges=[Edge("v7", "v4", "identity")])


def test_broken_chains_and_bad_versions_are_refused(chain):
    reg, _ = chain
    before = (reg.root / "registry.json").read_text()
    # claims compatibility with v1 but brings no edge at all
    with pytest.raises(UserError, match="'v4' claims compatibility with v1, but no chain of edges"):
        reg.add_version(VersionManifest("v4", "major", 8, compatible_with=["v1"]))
    # v4 -> v3 backs the claim on v3, but v1 -> v4 has no chain (nothing enters v4) and neither has
    # v4 -> v1 (v4 -> v3 -> v2, and no edge leaves v2 towards v1)
    linear_file(reg.root / "b43.pt", 8, 5, seed=6)
    with pytest.raises(UserError, match="claims compatibility with v1"):
        reg.add_version(VersionManifest("v4", "major", 8, compatible_with=["v3", "v1"]),
                        edges=[Edge("v4", "v3", "transformation", "b43.pt")])
    assert (reg.root / "registry.json").read_text() == before  # nothing saved by a refused version
    with pytest.raises(UserError, match="already registered"):
        reg.add_version(VersionManifest("v2", "major", 6))
    with pytest.raises(UserError, match="a new width is a major change"):
        reg.add_version(VersionManifest("v4", "patch", 7, parent="v3"))
    with pytest.raises(UserError, match="change must be one of major, minor, patch"):
        VersionManifest("v4", "huge", 7)
    with pytest.raises(UserError, match="does not touch the new version"):
        reg.add_version(VersionManifest("v4", "major", 8), edges=[Edge("v2", "v3", "identity")])
    reg.add_version(VersionManifest("v4", "major", 8))  # a fresh start that claims nothing is fine
    assert reg.get("v4").compatible_with == ()


def test_dim_mismatches_are_refused(chain):
    reg, _ = chain
    with pytest.raises(UserError, match="one space, but v3 has dim 5 and v4 dim 6"):
        reg.add_version(VersionManifest("v4", "major", 6), edges=[Edge("v3", "v4", "identity")])
    # h12.pt maps 4-d to 6-d; v3 is 5-d
    with pytest.raises(UserError, match="maps 4-d to 6-d embeddings, but v1 has dim 4 and v3 dim 5"):
        reg.add_edge(Edge("v1", "v3", "transformation", "h12.pt"))
    with pytest.raises(UserError, match="does not exist"):
        reg.add_edge(Edge("v1", "v3", "transformation", "missing.pt"))
    with pytest.raises(UserError, match="identity edge has no map file"):
        Edge("v1", "v2", "identity", path="h12.pt")


def test_side_information_heads_are_refused(chain):
    reg, _ = chain
    linear_file(reg.root / "side.pt", 6, 5, seed=7, side_info_dim=3)
    with pytest.raises(UserError, match="trained with side-information features"):
        reg.add_edge(Edge("v2", "v3", "transformation", "side.pt"))
    # same widths, but the training run recorded a side-information model
    linear_file(reg.root / "side2.pt", 6, 5, seed=7, meta={"side_info_model_path": "side_model.pt"})
    with pytest.raises(UserError, match=r"side-information features \(from side_model.pt\)"):
        reg.load_map(Edge("v2", "v3", "transformation", "side2.pt"))


def test_composition_equals_maps_one_by_one_and_matrix_product(chain):
    reg, maps = chain
    x = torch.randn(7, 4)
    edges = reg.path("v1", "v3")
    composed = reg.compose(edges)(x)
    one_by_one = reg.load_map(edges[1])(reg.load_map(edges[0])(x))
    assert composed.shape == (7, 5)
    torch.testing.assert_close(composed, one_by_one)
    (a1, b1), (a2, b2) = maps[("v1", "v2")], maps[("v2", "v3")]
    product = x.double() @ (a2 @ a1).T + (a2 @ b1 + b2)
    torch.testing.assert_close(composed.double(), product, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reg.converter("v1", "v3")(x), composed)
    assert torch.equal(reg.compose([])(x), x)
    with pytest.raises(UserError, match="do not form a chain"):
        reg.compose([edges[1], edges[0]])


def test_changed_map_file_is_refused(chain):
    reg, _ = chain
    linear_file(reg.root / "h23.pt", 6, 5, seed=99)  # same shape, other weights
    with pytest.raises(UserError, match="changed since it was registered"):
        reg.converter("v1", "v3")
    linear_file(reg.root / "h13.pt", 4, 5, seed=1)
    with pytest.raises(UserError, match="does not match the file"):
        reg.add_edge(Edge("v1", "v3", "transformation", "h13.pt", sha256="0" * 64))


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------


def _expected(maps, x: np.ndarray) -> np.ndarray:
    return affine(affine(torch.from_numpy(x), maps[("v1", "v2")]), maps[("v2", "v3")]).float().numpy()


def test_chunked_conversion_equals_in_memory(chain, tmp_path):
    reg, maps = chain
    x = np.random.default_rng(0).standard_normal((23, 4)).astype(np.float32)
    np.save(tmp_path / "v1.npy", x)
    summary = convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", tmp_path / "out" / "v3.npy",
                                 chunk_rows=5, progress=False)
    out = np.load(tmp_path / "out" / "v3.npy")
    in_memory = reg.converter("v1", "v3")(torch.from_numpy(x)).numpy()
    assert out.dtype == np.float32 and out.shape == (23, 5)
    np.testing.assert_array_equal(out, in_memory)
    np.testing.assert_allclose(out, _expected(maps, x), rtol=1e-5, atol=1e-5)
    assert summary["rows"] == 23 and summary["resumed_from_row"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["v3.npy"]  # no partial file, no sidecar
    with pytest.raises(UserError, match="holds 4-d embeddings, but version v2 has dim 6"):
        convert_embeddings(reg, "v2", "v3", tmp_path / "v1.npy", tmp_path / "bad.npy", progress=False)


def _interrupt_third_chunk(monkeypatch) -> None:
    """Make conversions raise KeyboardInterrupt (Ctrl-C) when the third chunk is mapped."""
    real_compose = VersionRegistry.compose
    calls: list = []

    def failing(self, edges, device="cpu"):
        fn = real_compose(self, edges, device)

        def apply(t):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(t.clone())
            return fn(t)

        return apply

    monkeypatch.setattr(VersionRegistry, "compose", failing)


def _record_conversions(monkeypatch, real_compose) -> list:
    """Make conversions record every chunk the maps are applied to; returns that list."""
    seen: list = []

    def recording(self, edges, device="cpu"):
        fn = real_compose(self, edges, device)
        return lambda t: (seen.append(t.clone()), fn(t))[1]

    monkeypatch.setattr(VersionRegistry, "compose", recording)
    return seen


def test_interrupted_conversion_resumes(chain, tmp_path, monkeypatch):
    reg, maps = chain
    x = np.random.default_rng(1).standard_normal((23, 4)).astype(np.float32)
    np.save(tmp_path / "v1.npy", x)
    out_path = tmp_path / "v3.npy"
    real_compose = VersionRegistry.compose
    _interrupt_third_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", out_path, chunk_rows=5, progress=False)
    sidecar = tmp_path / ".v3.npy.progress.json"
    assert json.loads(sidecar.read_text())["done_rows"] == 10
    assert not out_path.exists()

    seen = _record_conversions(monkeypatch, real_compose)
    summary = convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", out_path, chunk_rows=5, progress=False)
    assert summary["resumed_from_row"] == 10
    assert [t.shape[0] for t in seen] == [5, 5, 3]  # rows 10-14, 15-19, 20-22
    torch.testing.assert_close(seen[0], torch.from_numpy(x[10:15]))
    np.testing.assert_allclose(np.load(out_path), _expected(maps, x), rtol=1e-5, atol=1e-5)
    assert not sidecar.exists() and not (tmp_path / ".v3.npy.partial.npy").exists()

    # an interrupted run whose input then changes starts over
    monkeypatch.setattr(VersionRegistry, "compose", real_compose)
    _interrupt_third_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", out_path, chunk_rows=5, progress=False)
    x2 = x[:21] * 2
    np.save(tmp_path / "v1.npy", x2)
    monkeypatch.setattr(VersionRegistry, "compose", real_compose)
    summary = convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", out_path, chunk_rows=5, progress=False)
    assert summary["resumed_from_row"] == 0
    np.testing.assert_allclose(np.load(out_path), _expected(maps, x2), rtol=1e-5, atol=1e-5)


def test_npz_in_and_out_with_labels(chain, tmp_path, capsys):
    reg, maps = chain
    rng = np.random.default_rng(2)
    x = rng.standard_normal((17, 4)).astype(np.float32)
    y = rng.integers(0, 5, 17)
    np.savez(tmp_path / "plain.npz", features=x, labels=y)
    feats, labels = open_features(tmp_path / "plain.npz")
    assert isinstance(feats, np.memmap)  # np.savez stores members uncompressed: read in place
    np.testing.assert_array_equal(feats, x)
    np.testing.assert_array_equal(labels, y)

    convert_embeddings(reg, "v1", "v3", tmp_path / "plain.npz", tmp_path / "out.npz", chunk_rows=4,
                       progress=False)
    with np.load(tmp_path / "out.npz") as z:
        assert sorted(z.files) == ["features", "labels"]
        np.testing.assert_allclose(z["features"], _expected(maps, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(z["labels"], y)

    np.savez_compressed(tmp_path / "packed.npz", features=x)
    feats, labels = open_features(tmp_path / "packed.npz")
    assert not isinstance(feats, np.memmap) and labels is None
    assert "loaded into memory" in capsys.readouterr().err
    convert_embeddings(reg, "v1", "v2", tmp_path / "packed.npz", tmp_path / "v2.npy", chunk_rows=6,
                       progress=False)
    expected = affine(torch.from_numpy(x), maps[("v1", "v2")]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "v2.npy"), expected, rtol=1e-5, atol=1e-5)


def test_convert_command_line(chain, tmp_path, capsys):
    reg, maps = chain
    x = np.random.default_rng(3).standard_normal((9, 4)).astype(np.float32)
    np.save(tmp_path / "v1.npy", x)
    args = ["--registry", str(reg.root), "--from", "v1", "--to", "v3", "--input", str(tmp_path / "v1.npy")]
    assert run_main(convert_mod.main, args + ["--output", str(tmp_path / "v3.npy"), "--no-progress"]) == 0
    assert "converted 9 embeddings v1 -> v2 -> v3 (4-d -> 5-d)" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "v3.npy"), _expected(maps, x), rtol=1e-5, atol=1e-5)
    bad = ["--registry", str(reg.root), "--from", "v3", "--to", "v1", "--input", str(tmp_path / "v1.npy")]
    assert run_main(convert_mod.main, bad + ["--output", str(tmp_path / "x.npy")]) == 2
    assert "error: no path of registry edges from v3 to v1" in capsys.readouterr().err


def test_convert_module_runs_as_script(chain, tmp_path, monkeypatch, capsys):
    """``python -m fct.compat.convert`` (run in-process with runpy: a subprocess would spend
    seconds importing torch)."""
    reg, maps = chain
    x = np.random.default_rng(3).standard_normal((9, 4)).astype(np.float32)
    np.save(tmp_path / "v1.npy", x)
    argv = ["fct.compat.convert", "--registry", str(reg.root), "--from", "v1", "--to", "v3",
            "--input", str(tmp_path / "v1.npy"), "--output", str(tmp_path / "w.npy"), "--no-progress"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "fct.compat.convert")  # runpy executes the module afresh as __main__
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("fct.compat.convert", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert "converted 9 embeddings" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "w.npy"), _expected(maps, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Compatibility matrix
# ---------------------------------------------------------------------------------------------

NAN = float("nan")
M = [[50.0, NAN, NAN],
     [55.0, 60.0, NAN],
     [48.0, 58.0, 70.0]]


def test_matrix_metrics_by_hand():
    crit = compatibility_criterion(M)
    # (1,0): 55 > 50 yes; (2,0): 48 > 50 no; (2,1): 58 > 60 no
    assert crit.tolist() == [[False, False, False], [True, False, False], [False, False, False]]
    assert average_compatibility(M) == pytest.approx(1 / 3)
    assert average_metric(M) == pytest.approx((50 + 55 + 60 + 48 + 58 + 70) / 6)
    g = update_gain(M)
    assert g[1, 0] == pytest.approx(5 / 10)  # (55 - 50) / (60 - 50)
    assert g[2, 0] == pytest.approx(-2 / 20)  # (48 - 50) / (70 - 50)
    assert g[2, 1] == pytest.approx(-2 / 10)  # (58 - 60) / (70 - 60)
    assert np.isnan(g[0, 0]) and np.isnan(g[0, 1]) and np.isnan(g[1, 1])
    g = update_gain(M, reference_new_new=[None, 62.0, 75.0])
    assert g[1, 0] == pytest.approx(5 / 12)  # (55 - 50) / (62 - 50)
    assert g[2, 0] == pytest.approx(-2 / 25)  # (48 - 50) / (75 - 50)
    assert g[2, 1] == pytest.approx(-2 / 15)  # (58 - 60) / (75 - 60)
    # values above the diagonal are ignored
    upper = [[50.0, 1.0, 2.0], [55.0, 60.0, 3.0], [48.0, 58.0, 70.0]]
    assert average_metric(upper) == average_metric(M)


def test_matrix_summary_is_json_ready():
    s = matrix_summary(M, ["v1", "v2", "v3"], "top1")
    json.dumps(s, allow_nan=False)
    assert s["matrix"][0] == [50.0, None, None]
    assert s["AC"] == pytest.approx(1 / 3) and s["AM"] == pytest.approx(341 / 6)
    assert (s["compatible_pairs"], s["pairs"]) == (1, 3)
    pair = {(p["query"], p["gallery"]): p for p in s["pair_details"]}
    assert pair[("v2", "v1")]["compatible"] and pair[("v2", "v1")]["update_gain"] == pytest.approx(0.5)
    assert "no unconstrained new/new reference given" in s["update_gain_reference"]
    s = matrix_summary(M, ["v1", "v2", "v3"], "top1", reference_new_new={"v2": 62.0, "v3": 75.0})
    assert s["pair_details"][0]["update_gain"] == pytest.approx(5 / 12)
    assert s["update_gain_reference"].startswith("reference_new_new")
    one = matrix_summary([[40.0]], ["v1"], "mAP")
    assert one["AC"] is None and one["AM"] == 40.0 and one["pairs"] == 0
    with pytest.raises(UserError, match=r"entry \[2\]\[0\]"):
        matrix_summary([[1.0, NAN, NAN], [1.0, 1.0, NAN], [NAN, 1.0, 1.0]], ["a", "b", "c"], "top1")
    with pytest.raises(UserError, match="2 version names for a 3 x 3 matrix"):
        matrix_summary(M, ["a", "b"], "top1")
    with pytest.raises(UserError, match="unknown versions v9"):
        matrix_summary(M, ["v1", "v2", "v3"], "top1", reference_new_new={"v9": 1.0})


def test_plot_matrix_writes_png(tmp_path):
    plot_matrix(M, ["v1", "v2", "v3"], tmp_path / "m" / "matrix.png", title="top-1 (%)")
    assert (tmp_path / "m" / "matrix.png").read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["matrix.png"]  # no temporary file left


def test_plot_projection_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    centres = rng.standard_normal((3, 8)) * 5
    a = centres[labels] + rng.standard_normal((60, 8))
    b = a[:, :6] * 2
    used = plot_projection(a, b, labels, ["v1", "v2"], tmp_path / "proj.png", method="tsne", max_points=50)
    assert used == "tsne"
    data = (tmp_path / "proj.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    with pytest.raises(UserError, match="unknown projection method"):
        plot_projection(a, b, labels, ["v1", "v2"], tmp_path / "x.png", method="pca")
    with pytest.raises(UserError, match="same images"):
        plot_projection(a, b[:50], labels, ["v1", "v2"], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# Hostile-user review (issue 13): NaN / infinite input rows
# ---------------------------------------------------------------------------------------------


def _convert_cli(reg, inp, out, *extra):
    import os
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fct.compat.convert", "--registry", str(reg.root), "--from", "v1",
           "--to", "v3", "--input", str(inp), "--output", str(out), "--chunk-rows", "4", "--no-progress",
           *extra]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def _rows_with_nonfinite(tmp_path):
    x = np.random.default_rng(4).standard_normal((11, 4)).astype(np.float32)
    x[5, 1] = np.nan
    x[9, 0] = np.inf
    np.save(tmp_path / "v1.npy", x)
    return x


@pytest.mark.slow
@pytest.mark.parametrize("strict", [False, True])
def test_nonfinite_rows_warn_or_are_refused(chain, tmp_path, strict):
    reg, maps = chain
    x = _rows_with_nonfinite(tmp_path)
    before = (tmp_path / "v1.npy").read_bytes()
    out = tmp_path / "out" / "v3.npy"
    r = _convert_cli(reg, tmp_path / "v1.npy", out, *(["--strict"] if strict else []))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{tmp_path / 'v1.npy'}: 2 of 11 rows hold NaN or infinite values" in lines[0]
    assert "first at row 5" in lines[0]
    assert (tmp_path / "v1.npy").read_bytes() == before
    if strict:
        assert r.returncode == 2 and lines[0].startswith("error:") and "--strict" in lines[0]
        assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    else:
        assert r.returncode == 0 and lines[0].startswith("warning:")
        got = np.load(out)
        ok = np.isfinite(x).all(1)
        np.testing.assert_allclose(got[ok], _expected(maps, x)[ok], rtol=1e-5, atol=1e-5)
        assert not np.isfinite(got[~ok]).all(1).any()  # passed through, flagged by the warning


def test_nonfinite_count_survives_a_resume(chain, tmp_path, monkeypatch, capsys):
    reg, _ = chain
    _rows_with_nonfinite(tmp_path)
    out_path = tmp_path / "v3.npy"
    real_compose = VersionRegistry.compose
    _interrupt_third_chunk(monkeypatch)  # rows 0-7 are done, with row 5
    with pytest.raises(KeyboardInterrupt):
        convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", out_path, chunk_rows=4, progress=False)
    saved = json.loads((tmp_path / ".v3.npy.progress.json").read_text())
    assert (saved["done_rows"], saved["nonfinite_rows"], saved["first_nonfinite_row"]) == (8, 1, 5)
    assert capsys.readouterr().err == ""  # the warning comes once, at the end
    monkeypatch.setattr(VersionRegistry, "compose", real_compose)
    summary = convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", out_path, chunk_rows=4, progress=False)
    assert summary["resumed_from_row"] == 8
    assert (summary["nonfinite_rows"], summary["first_nonfinite_row"]) == (2, 5)  # rows 5 and 9
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "2 of 11 rows" in err
    with pytest.raises(UserError, match="2 of 11 rows hold NaN or infinite values.*first at row 5"):
        convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", tmp_path / "s.npy", strict=True,
                           progress=False)
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / ".s.npy.progress.json").exists()


def test_values_beyond_float32_count_as_infinite(chain, tmp_path, capsys):
    import warnings

    reg, _ = chain
    x = np.random.default_rng(5).standard_normal((6, 4))
    x[3, 2] = 1e300  # finite as float64, infinite for the float32 maps
    np.save(tmp_path / "big.npy", x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning on top of ours
        summary = convert_embeddings(reg, "v1", "v3", tmp_path / "big.npy", tmp_path / "o.npy",
                                     progress=False)
    assert (summary["nonfinite_rows"], summary["first_nonfinite_row"]) == (1, 3)
    assert capsys.readouterr().err.startswith("warning:")


def test_infinite_reference_is_refused():
    with pytest.raises(UserError, match="reference_new_new for version v2 is inf"):
        matrix_summary(M, ["v1", "v2", "v3"], "top1", reference_new_new={"v2": float("inf")})


# ---------------------------------------------------------------------------------------------
# Conversion split over processes
# ---------------------------------------------------------------------------------------------


def test_remaining_rows_are_cut_into_one_piece_per_process():
    from fct.compat.convert import merge_intervals, share_of_remaining

    assert merge_intervals([[5, 8], [0, 2], [2, 3], [7, 9], [4, 4]]) == [(0, 3), (5, 9)]
    # nothing done: 10 rows over 3 processes -> 3, 3, 4 rows
    assert [share_of_remaining([], 10, r, 3) for r in range(3)] == [[(0, 3)], [(3, 6)], [(6, 10)]]
    # rows 2-5 done: the 6 left (0, 1, 6, 7, 8, 9) cut in 2 -> 0, 1, 6 | 7, 8, 9
    assert [share_of_remaining([(2, 6)], 10, r, 2) for r in range(2)] == [[(0, 2), (6, 7)], [(7, 10)]]
    # more processes than rows left: some get nothing
    assert [share_of_remaining([(0, 9)], 10, r, 3) for r in range(3)] == [[], [], [(9, 10)]]
    assert share_of_remaining([(0, 10)], 10, 0, 1) == []


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    """Make fct.dist report process ``rank`` of ``world`` (without a process group, the collectives
    stay no-ops): the state a torchrun job leaves behind, made in one process."""
    from fct import dist

    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world_size", lambda: world)


def test_a_two_process_conversion_cut_short_resumes_in_one_process(chain, tmp_path, monkeypatch):
    reg, maps = chain
    x = np.random.default_rng(4).standard_normal((23, 4)).astype(np.float32)
    np.save(tmp_path / "v1.npy", x)
    out_path = tmp_path / "v3.npy"
    real_compose = VersionRegistry.compose
    # rank 0 of 2 (rows 0-10) is stopped at its third chunk of 4: rows 0-7 done
    _as_rank(monkeypatch, 0, 2)
    _interrupt_third_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", out_path, chunk_rows=4, progress=False)
    saved = json.loads((tmp_path / ".v3.npy.progress.rank0.json").read_text())
    assert saved["done"] == [[0, 8]] and not (tmp_path / ".v3.npy.progress.json").exists()
    monkeypatch.undo()

    seen = _record_conversions(monkeypatch, real_compose)
    summary = convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", out_path, chunk_rows=4, progress=False)
    assert summary["resumed_from_row"] == 8 and summary["rows_here"] == 15
    torch.testing.assert_close(torch.cat(seen), torch.from_numpy(x[8:]))  # only the rows no run finished
    np.testing.assert_allclose(np.load(out_path), _expected(maps, x), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".v3")) == []


def test_a_process_that_finishes_alone_does_not_pack_a_partial_output(chain, tmp_path, monkeypatch):
    reg, maps = chain
    x = np.random.default_rng(5).standard_normal((23, 4)).astype(np.float32)
    np.save(tmp_path / "v1.npy", x)
    _as_rank(monkeypatch, 0, 2)  # rank 0 converts rows 0-10; rank 1 never ran
    with pytest.raises(UserError, match="converted 11 of 23 rows; rerun to finish"):
        convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", tmp_path / "v3.npz", chunk_rows=4, progress=False)
    assert not (tmp_path / "v3.npz").exists()
    _as_rank(monkeypatch, 0, 3)  # a rerun with three processes: rank 0 takes rows 11-14 of the 12 left
    with pytest.raises(UserError, match="converted 15 of 23 rows"):
        convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", tmp_path / "v3.npz", chunk_rows=4, progress=False)
    monkeypatch.undo()
    summary = convert_embeddings(reg, "v1", "v3", tmp_path / "v1.npy", tmp_path / "v3.npz", chunk_rows=4,
                                 progress=False)
    assert summary["resumed_from_row"] == 15 and summary["rows_here"] == 8
    with np.load(tmp_path / "v3.npz") as z:
        np.testing.assert_allclose(z["features"], _expected(maps, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_conversion_under_torchrun_equals_one_process(chain, tmp_path):
    from helpers import free_port, run_script

    reg, maps = chain
    x = np.random.default_rng(6).standard_normal((1001, 4)).astype(np.float32)
    labels = np.arange(1001) % 7
    np.savez(tmp_path / "v1.npz", features=x, labels=labels)
    args = ["-m", "fct.compat.convert", "--registry", str(reg.root), "--from", "v1", "--to", "v3",
            "--input", str(tmp_path / "v1.npz"), "--chunk-rows", "100", "--no-progress"]
    one = run_script(*args, "--output", str(tmp_path / "one.npz"))
    two = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                     *args, "--output", str(tmp_path / "two.npz"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("converted 1001 embeddings") == 1  # rank 0 reports
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(b["features"], a["features"])
        np.testing.assert_array_equal(b["labels"], labels)
        np.testing.assert_allclose(b["features"], _expected(maps, x), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
