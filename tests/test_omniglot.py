"""Omniglot loader, splits, cache, errors and the episode sampler."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metattn.builders  # noqa: F401  (registers the built-in kinds)
import metattn.data.omniglot as om
from metattn.data.omniglot import OmniglotTasks, load_omniglot
from metattn.errors import ConfigError, DataError, TaskError
from metattn.registry import build


def _real_root() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    candidates = [here.parent / "shared" / "data" / "omniglot"]
    if os.environ.get("METATTN_DATA"):
        candidates.append(Path(os.environ["METATTN_DATA"]) / "omniglot")
    return next((c for c in candidates if c.is_dir()), None)


# the tiny fake releases below are deliberately incomplete
pytestmark = pytest.mark.filterwarnings("ignore:Omniglot.*holds .* characters:UserWarning")

REAL = _real_root()
needs_data = pytest.mark.skipif(REAL is None, reason="Omniglot data folder not found")


@pytest.fixture(scope="module")
def real() -> om.Omniglot:
    """Both real splits, through the user cache (cold once: ~15 s, then well under 1 s)."""
    return load_omniglot(REAL)


# ---------------------------------------------------------------- tiny fake release
def _png(seed: int) -> bytes:
    """A 105x105 1-bit PNG: white page with a black bar whose place depends on ``seed``."""
    a = np.ones((105, 105), dtype=bool)
    r = 10 + (seed * 7) % 60
    a[r:r + 30, 20:40] = False  # black ink
    buf = io.BytesIO()
    Image.fromarray(a).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path: Path, split: str = "background", chars: dict[str, int] | None = None,
             drawings: int = 20, top: str | None = None) -> Path:
    """An official-layout zip: ``{alphabet: n_characters}``, ``drawings`` PNGs each."""
    chars = chars or {"Alpha": 2, "Beta": 1}
    top = top or f"images_{split}"
    k = 0
    with zipfile.ZipFile(path, "w") as zf:
        for alphabet, n in chars.items():
            for c in range(1, n + 1):
                for d in range(1, drawings + 1):
                    k += 1
                    zf.writestr(f"{top}/{alphabet}/character{c:02d}/{k:04d}_{d:02d}.png", _png(k))
    return path


@pytest.fixture
def tiny_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    make_zip(root / "images_background.zip", "background", {"Alpha": 2, "Beta": 1})
    make_zip(root / "images_evaluation.zip", "evaluation", {"Gamma": 2})
    monkeypatch.setenv("METATTN_CACHE", str(tmp_path / "cache"))
    return root


# ---------------------------------------------------------------- real data
@needs_data
def test_real_counts_and_preprocessing(real: om.Omniglot) -> None:
    assert real.images.shape == (1623, 20, 28, 28) and real.images.dtype == np.uint8
    bg = [i for i, s in enumerate(real.splits) if s == "background"]
    ev = [i for i, s in enumerate(real.splits) if s == "evaluation"]
    assert len(bg) == 964 and len(ev) == 659
    assert bg == list(range(964))  # background first, then evaluation
    assert len({real.alphabets[i] for i in bg}) == 30
    assert len({real.alphabets[i] for i in ev}) == 20
    assert real.alphabets[0] == "Alphabet_of_the_Magi" and real.names[0] == "character01"
    f = real.as_float()
    assert f.min() == 0.0 and f.max() == 1.0
    # ink = 1 on a background of 0: strokes cover a small part of the page
    assert 0.02 < f.mean() < 0.3
    assert (f[:, :, 0, :] < 0.5).mean() > 0.95  # the border row is background


@needs_data
def test_real_protocol_splits(real: om.Omniglot) -> None:
    tr = OmniglotTasks("train", data=real)
    te = OmniglotTasks("test", data=real)
    assert len(tr.characters) == 1200 and len(te.characters) == 423
    assert tr.num_classes == 4800 and te.num_classes == 1692
    assert set(te.characters.splits) == {"evaluation"}
    # the test characters are the last 423 of the sorted order, disjoint from training
    train_ids = {(a, n) for a, n in zip(tr.characters.alphabets, tr.characters.names,
                                        strict=True)}
    test_ids = {(a, n) for a, n in zip(te.characters.alphabets, te.characters.names,
                                       strict=True)}
    assert not train_ids & test_ids and len(train_ids | test_ids) == 1623
    bg = OmniglotTasks("train", protocol="background", rotations=False, data=real)
    ev = OmniglotTasks("test", protocol="background", rotations=False, data=real)
    assert (bg.num_classes, ev.num_classes) == (964, 659)
    assert set(bg.characters.splits) == {"background"}
    assert OmniglotTasks("test", protocol="background", data=real).num_classes == 4 * 659
    # the split does not depend on the order of the data it is given
    shuffled = real.subset(np.random.default_rng(0).permutation(len(real)))
    te2 = OmniglotTasks("test", data=shuffled)
    assert te2.characters.names == te.characters.names
    assert np.array_equal(te2.characters.images, te.characters.images)


@needs_data
def test_rotation_classes_are_rotated(real: om.Omniglot) -> None:
    tr = OmniglotTasks("train", data=real)
    base = tr.characters.images
    for c in (0, 517, 1199):
        for r in range(4):
            np.testing.assert_array_equal(tr.images[4 * c + r].numpy(),
                                          np.rot90(base[c], r, axes=(1, 2)))
    assert not np.array_equal(tr.images[1].numpy(), base[0])  # rotation 90 differs
    # sampled episodes carry the rotated images of the classes they name
    b = tr.sample(4, torch.Generator().manual_seed(3))
    cls = b.info["classes"]
    for t in range(4):
        for j in range(5):
            c, r = divmod(int(cls[t, j]), 4)
            img = (b.support_x[t, j, 0] * 255).round().to(torch.uint8).numpy()
            cands = np.rot90(base[c], r, axes=(1, 2))
            assert any(np.array_equal(img, d) for d in cands)


@needs_data
def test_real_episodes_shapes_labels_and_seed(real: om.Omniglot) -> None:
    s = OmniglotTasks("train", n_way=5, k_shot=1, k_query=15, data=real)
    b = s.sample(32, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (32, 5, 1, 28, 28) and b.query_x.shape == (32, 75, 1, 28, 28)
    assert b.support_x.dtype == torch.float32 and b.support_y.dtype == torch.long
    assert 0.0 <= float(b.support_x.min()) and float(b.query_x.max()) <= 1.0
    assert b.n_way == 5 and b.k_shot == 1 and b.info["classes"].shape == (32, 5)
    assert (b.support_y.sort(1).values == torch.arange(5)).all()
    assert (torch.bincount(b.query_y[0], minlength=5) == 15).all()
    assert int(b.query_y.max()) == 4 and int(b.query_y.min()) == 0
    for t in range(32):
        assert len(set(b.info["classes"][t].tolist())) == 5
        # k_shot + k_query distinct drawings: no query image equals its support image
        for j in range(5):
            q = b.query_x[t, b.query_y[t] == j]
            assert not (q == b.support_x[t, j]).flatten(1).all(1).any()
    b2 = s.sample(32, torch.Generator().manual_seed(0))
    b3 = s.sample(32, torch.Generator().manual_seed(1))
    assert torch.equal(b.support_x, b2.support_x) and torch.equal(b.query_x, b2.query_x)
    assert torch.equal(b.info["classes"], b2.info["classes"])
    assert not torch.equal(b.info["classes"], b3.info["classes"])


# ---------------------------------------------------------------- tiny zips: always run
def test_tiny_zip_loads_inverted_and_sorted(tiny_root: Path) -> None:
    d = load_omniglot(tiny_root)
    assert d.images.shape == (5, 20, 28, 28)
    assert d.alphabets == ["Alpha", "Alpha", "Beta", "Gamma", "Gamma"]
    assert d.names == ["character01", "character02", "character01", "character01",
                       "character02"]
    assert d.splits == ["background"] * 3 + ["evaluation"] * 2
    img = d.images[0, 0]  # black bar on white -> bright bar on 0
    assert img.max() == 255 and img[0, 0] == 0
    # drawing order follows the file names: drawing 2 has the bar 7 px lower
    rows0 = np.nonzero(d.images[0, 0].max(1) > 128)[0]
    rows1 = np.nonzero(d.images[0, 1].max(1) > 128)[0]
    assert rows1.mean() > rows0.mean()


def test_cache_goes_to_cache_dir_not_data_and_is_invalidated(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(p.name for p in tiny_root.iterdir())
    d1 = load_omniglot(tiny_root)
    cache = tmp_path / "cache" / "omniglot"
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 2  # one per split
    assert sorted(p.name for p in tiny_root.iterdir()) == before  # nothing in the data folder

    def boom(*a, **k):
        raise AssertionError("the zip was decoded again despite a warm cache")

    monkeypatch.setattr(om, "read_zip", boom)
    # the key is the zip's content, not its mtime: a re-mounted or copied zip reuses the cache
    for z in tiny_root.glob("*.zip"):
        os.utime(z, ns=(1_000_000_000, 1_000_000_000))
    d2 = load_omniglot(tiny_root)
    np.testing.assert_array_equal(d1.images, d2.images)
    assert d2.alphabets == d1.alphabets and d2.names == d1.names
    monkeypatch.undo()
    monkeypatch.setenv("METATTN_CACHE", str(tmp_path / "cache"))
    # a changed zip (other size and mtime) must not be served from the old cache
    make_zip(tiny_root / "images_background.zip", "background", {"Alpha": 1})
    d3 = load_omniglot(tiny_root, splits=["background"])
    assert d3.images.shape[0] == 1


def test_missing_zip_names_path_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_omniglot(tmp_path, cache_dir=False)
    msg = str(e.value)
    assert str(tmp_path / "images_background.zip") in msg
    assert "github" in msg.lower() and "download" in msg


def test_default_root_missing_is_a_clear_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METATTN_DATA", raising=False)
    monkeypatch.setattr(om, "CHECKOUT_DATA", tmp_path / "no" / "such")
    with pytest.raises(DataError, match="METATTN_DATA"):
        om.default_root()
    # the folder beside the checkout is found from any working directory
    beside = tmp_path / "shared" / "data" / "omniglot"
    beside.mkdir(parents=True)
    monkeypatch.setattr(om, "CHECKOUT_DATA", beside)
    assert om.default_root() == beside
    # METATTN_DATA, when set, wins
    monkeypatch.setenv("METATTN_DATA", str(tmp_path / "elsewhere"))
    assert om.default_root() == tmp_path / "elsewhere" / "omniglot"


def test_empty_cache_file_is_rebuilt(tiny_root: Path, tmp_path: Path) -> None:
    """A 0-byte cache file (a crash between create and write) is rebuilt, not an error."""
    d1 = load_omniglot(tiny_root, splits=["background"])
    (cache,) = (tmp_path / "cache" / "omniglot").glob("*.npz")
    cache.write_bytes(b"")
    d2 = load_omniglot(tiny_root, splits=["background"])
    np.testing.assert_array_equal(d1.images, d2.images)
    assert cache.stat().st_size > 0


def test_incomplete_release_warns(tmp_path: Path) -> None:
    make_zip(tmp_path / "images_background.zip", "background", {"Alpha": 2})
    with pytest.warns(UserWarning, match="holds 2 characters; the official background"):
        load_omniglot(tmp_path, splits=["background"], cache_dir=False)


@needs_data
def test_verify_checks_the_extracted_contents(tmp_path: Path) -> None:
    """The real zips match the official content digest; one flipped byte in a member does
    not (the zip's CRC catches it) and a zip with a file removed does not."""
    om.verify(REAL / "images_evaluation.zip", "evaluation")
    with pytest.raises(DataError, match="official background"):
        om.verify(REAL / "images_evaluation.zip", "background")
    src = zipfile.ZipFile(REAL / "images_evaluation.zip")
    short = tmp_path / "short.zip"
    with zipfile.ZipFile(short, "w") as out:
        for info in src.infolist()[:-1]:
            out.writestr(info, src.read(info))
    with pytest.raises(DataError, match="content sha256"):
        om.verify(short, "evaluation")
    data = bytearray((REAL / "images_evaluation.zip").read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped = tmp_path / "flipped.zip"
    flipped.write_bytes(bytes(data))
    with pytest.raises(DataError, match="download it again"):
        om.verify(flipped, "evaluation")


def test_corrupt_zip_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "images_background.zip").write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(DataError, match="images_background.zip"):
        load_omniglot(tmp_path, splits=["background"], cache_dir=False)


def test_corrupt_zip_is_a_data_error_with_the_cache_on(tmp_path: Path) -> None:
    """The default path (cache on) and a flipped byte inside a member's compressed data."""
    (tmp_path / "images_background.zip").write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(DataError, match="images_background.zip"):
        load_omniglot(tmp_path, splits=["background"], cache_dir=tmp_path / "cache")
    good = tmp_path / "good"
    good.mkdir()
    path = make_zip(good / "images_background.zip", "background", {"Alpha": 1})
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[3]
    data = bytearray(path.read_bytes())
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="download it again|images_background.zip"):
        load_omniglot(good, splits=["background"], cache_dir=tmp_path / "cache2")


@needs_data
def test_cache_matches_a_fresh_read_of_the_zip(real: om.Omniglot) -> None:
    """The real-data tests read the user cache; this one re-reads a zip with the current
    loader, so a loader change cannot hide behind a stale cache."""
    fresh = om.read_zip(REAL / "images_evaluation.zip", "evaluation")
    cached = real.subset([i for i, s in enumerate(real.splits) if s == "evaluation"])
    assert fresh.names == cached.names and fresh.alphabets == cached.alphabets
    assert np.array_equal(fresh.images, cached.images)


def test_corrupt_png_is_a_data_error(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "images_background.zip", "background", {"Alpha": 1})
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    bad = sorted(entries)[3]
    entries[bad] = b"\x89PNG garbage"
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in entries.items():
            zf.writestr(n, data)
    with pytest.raises(DataError) as e:
        load_omniglot(tmp_path, splits=["background"], cache_dir=False)
    assert bad in str(e.value) and "images_background.zip" in str(e.value)


def test_wrong_layout_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pictures/a.png", _png(0))
    with pytest.raises(DataError, match=r"images_background/<Alphabet>/<character>"):
        load_omniglot(tmp_path, splits=["background"], cache_dir=False)
    make_zip(path, "background", {"Alpha": 1}, top="images_evaluation")  # wrong top folder
    with pytest.raises(DataError, match="expected layout"):
        load_omniglot(tmp_path, splits=["background"], cache_dir=False)
    make_zip(path, "background", {"Alpha": 1}, drawings=19)
    with pytest.raises(DataError, match=r"19 drawings.*exactly 20"):
        load_omniglot(tmp_path, splits=["background"], cache_dir=False)


def test_task_errors_name_field_value_and_limit(tiny_root: Path) -> None:
    data = load_omniglot(tiny_root)
    with pytest.raises(TaskError, match=r"k_shot \+ k_query.*<= 20"):
        OmniglotTasks("train", k_shot=5, k_query=16, data=data)
    with pytest.raises(TaskError, match=r"n_way=4 .*only 3 classes"):
        OmniglotTasks("train", n_way=4, protocol="background", rotations=False, data=data)
    # with rotations the same 3 characters make 12 classes
    s = OmniglotTasks("train", n_way=12, k_shot=2, k_query=3, protocol="background",
                      data=data)
    b = s.sample(2, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (2, 24, 1, 28, 28) and b.query_x.shape == (2, 36, 1, 28, 28)
    assert sorted(b.info["classes"][0].tolist()) == list(range(12))


def test_builder_schema(tiny_root: Path) -> None:
    spec = {"kind": "omniglot", "protocol": "background", "root": str(tiny_root),
            "rotations": False, "n_way": 2, "k_shot": 1, "k_query": 3}
    s = build("task", spec, "test")
    assert isinstance(s, OmniglotTasks) and s.num_classes == 2
    b = s.sample(3, torch.Generator().manual_seed(0))
    assert b.query_x.shape == (3, 6, 1, 28, 28)
    with pytest.raises(ConfigError, match="protocol"):
        build("task", {**spec, "protocol": "lake"}, "test")
    with pytest.raises(ConfigError, match="k_shots"):
        build("task", {**spec, "k_shots": 1}, "test")


def test_sampler_skips_only_the_label_read_back(tiny_root: Path, monkeypatch) -> None:
    """Episodes' labels are 0..n-1 by construction: the sampler does not read them back (a
    host sync per step on a GPU); shapes are still checked."""
    from metattn.data.tasks import TaskBatch

    calls: list[bool] = []
    real = TaskBatch.validate

    def spy(self, labels: bool = True) -> None:
        calls.append(labels)
        real(self, labels)

    monkeypatch.setattr(TaskBatch, "validate", spy)
    tasks = OmniglotTasks("train", n_way=3, k_shot=1, k_query=2, protocol="background",
                          root=tiny_root)
    batch = tasks.sample(2, torch.Generator().manual_seed(0))
    assert calls == [False]
    assert batch.support_y.tolist() == [[0, 1, 2]] * 2


def test_shift_translates_training_images_only(tiny_root: Path) -> None:
    """task.shift: each training image moved by a seeded random (dy, dx) in [-s, s]^2 with a
    blank border; the same classes and drawings as without it; test episodes untouched."""
    data = load_omniglot(tiny_root)
    plain = OmniglotTasks("train", n_way=3, k_shot=1, k_query=2, protocol="background",
                          data=data)
    moved = OmniglotTasks("train", n_way=3, k_shot=1, k_query=2, protocol="background",
                          data=data, shift=3)
    a = plain.sample(16, torch.Generator().manual_seed(0))
    b = moved.sample(16, torch.Generator().manual_seed(0))
    c = moved.sample(16, torch.Generator().manual_seed(0))
    assert torch.equal(a.info["classes"], b.info["classes"])
    assert torch.equal(b.support_x, c.support_x) and torch.equal(b.query_x, c.query_x)
    offsets = []
    for moved_x, plain_x in ((b.support_x, a.support_x), (b.query_x, a.query_x)):
        padded = torch.nn.functional.pad(plain_x, (3, 3, 3, 3))
        for img, ref in zip(moved_x.flatten(0, 1), padded.flatten(0, 1)):
            # (the fake drawings are bars: a move along x and one along y never coincide)
            found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                     if torch.equal(img, ref[..., 3 - dy:31 - dy, 3 - dx:31 - dx])]
            assert len(found) == 1, "not one translation of the unshifted image"
            offsets.append(found[0])
    dys, dxs = {o[0] for o in offsets}, {o[1] for o in offsets}
    assert dys == dxs == set(range(-3, 4))  # the whole range, on both axes
    assert sum(o != (0, 0) for o in offsets[:48]) > 30  # support images move too
    with pytest.raises(TaskError, match="shift"):
        OmniglotTasks("train", protocol="background", data=data, shift=14)
    spec = {"kind": "omniglot", "n_way": 3, "k_shot": 1, "k_query": 2,
            "protocol": "background", "root": str(tiny_root), "shift": 3}
    assert build("task", spec, "train").shift == 3
    assert build("task", spec, "test").shift == 0
