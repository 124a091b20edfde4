"""Omniglot (Lake et al. 2015): loader for the official release zips and an episode sampler.

Data
----
The official release has two zips, ``images_background.zip`` (30 alphabets, 964 characters)
and ``images_evaluation.zip`` (20 alphabets, 659 characters). Each character was drawn by 20
people; the files are ``images_<split>/<Alphabet>/characterNN/<id>_NN.png``, 105x105, 1-bit,
black ink on white.

Preprocessing: each PNG is read straight from the zip with PIL, converted to 8-bit
greyscale, resized to 28x28 with ``PIL.Image.LANCZOS`` (antialiased, so thin strokes survive
the 105 -> 28 reduction) and INVERTED, so that ink is bright: stored as ``uint8`` with
ink = 255 and background = 0, which :class:`OmniglotTasks` turns into float32 in ``[0, 1]``
with ink = 1. The preprocessed array is
cached as ``.npz`` in ``$METATTN_CACHE/omniglot`` (default ``~/.cache/metattn/omniglot``),
never next to the data; the cache file name holds a digest of the zip's file list and CRCs (and
the preprocessing version and image size), so a changed zip is re-read. This departs from
the MAML reference code (cbfinn/maml ``resize_images.py``), which asks for LANCZOS on the 1-bit
PNG directly: Pillow then falls back to nearest-neighbour, so its 28x28 images are binary
(here about 20% of the pixels of the first 200 drawings are grey; mean absolute difference
0.026 on the [0, 1] scale). A cold load decodes
32,460 PNGs (about 10-15 s on one core); a warm load reads the cache (well under a second).

Characters are ordered by split (background, then evaluation), then alphabet, then character
folder, all sorted by name; the 20 drawings of a character are sorted by file name.

Splits (``protocol``)
---------------------
``"maml"``: the protocol of Vinyals et al. (2016) used by Finn et al. (2017, MAML): all 1623
characters in the order above; the first 1200 are meta-training characters and the remaining
423 are meta-test characters. Each character rotated by 0, 90, 180 and 270 degrees
(counter-clockwise, ``np.rot90``) is a NEW class, so meta-training has 4800 classes and
meta-test 1692. Class id ``4 * c + r`` is character ``c`` of the split rotated by ``r * 90``
degrees. (The MAML code shuffles the character folders with ``random.seed(1)`` before taking
the first 1200, an order that depends on ``os.listdir``; we use the deterministic sorted order
instead, so the 1200 training characters are the 964 background characters plus the first 236
evaluation characters, and the 423 test characters are the rest of the evaluation alphabets.)

``"background"``: Lake et al.'s split: meta-training = the 964 background characters,
meta-test = the 659 evaluation characters (disjoint alphabets). Rotations are optional
(``rotations=True`` makes 3856 / 2636 classes, as above).

Episodes
--------
:class:`OmniglotTasks` keeps its split in memory as one ``uint8`` tensor
``[n_classes, 20, 28, 28]`` (with rotations the four rotated copies are made once, 4x the
memory: 75 MB for the MAML training split) and samples with tensor ops only: ``n_way``
distinct classes per task (top-k of uniform noise), ``k_shot + k_query`` distinct drawings
per class (argsort of uniform noise), then ONE row gather of whole images and one cast to
float32. Support and query are class-major (``[c0, c0, ..., c1, ...]``); labels
``0..n_way-1`` follow the random order in which the classes were drawn. Two rotations of one
character may appear in the same task, since they are different classes.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from metattn.data.paths import CHECKOUT_SHARED, cache_dir, find_data_root
from metattn.data.tasks import TaskBatch
from metattn.errors import DataError, TaskError

SPLITS = ("background", "evaluation")
EXPECTED_CHARACTERS = {"background": 964, "evaluation": 659}
DRAWINGS = 20
MAML_TRAIN_CHARACTERS = 1200
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_{split}.zip"
# The shared data folder beside a source checkout (``<checkout>/../shared/data/omniglot``).
CHECKOUT_DATA = CHECKOUT_SHARED / "data" / "omniglot"
# sha256 of the extracted files (``sha256sum`` lines "<hex>  <path>", sorted by path), as the
# data README gives it: it holds for any zip of the official PNGs, rebuilt or not.
CONTENT_SHA256 = {
    "background": "deaa02f758afda524b3a045c7af40311f2d9ded3e2a39f715ece8470d474bc6a",
    "evaluation": "3d5e035f27423c362bf9a181af649b43cda64c1008f842177ddc5203269c901e",
}
# Bump when the preprocessing changes: old cache files are then ignored.
_CACHE_VERSION = 1
_PNG = re.compile(r"^images_(?P<split>[^/]+)/(?P<alphabet>[^/]+)/(?P<char>[^/]+)/(?P<file>[^/]+)$")

Protocol = Literal["maml", "background"]


@dataclass
class Omniglot:
    """Preprocessed Omniglot characters.

    ``images`` is ``uint8 [n_chars, 20, size, size]`` with ink = 255 (background = 0);
    ``alphabets[i]``, ``names[i]`` (character folder, e.g. ``"character07"``) and
    ``splits[i]`` (``"background"``/``"evaluation"``) describe character ``i``.
    """

    images: np.ndarray
    alphabets: list[str]
    names: list[str]
    splits: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def as_float(self) -> np.ndarray:
        """Images as float32 in ``[0, 1]`` with ink = 1."""
        return self.images.astype(np.float32) / 255.0

    def subset(self, index: Sequence[int] | np.ndarray | slice) -> Omniglot:
        """The characters at ``index`` (in that order)."""
        idx = np.arange(len(self))[index]
        return Omniglot(
            images=self.images[idx],
            alphabets=[self.alphabets[i] for i in idx],
            names=[self.names[i] for i in idx],
            splits=[self.splits[i] for i in idx],
        )

    @staticmethod
    def cat(parts: Sequence[Omniglot]) -> Omniglot:
        """Characters of ``parts`` one after another."""
        return Omniglot(
            images=np.concatenate([p.images for p in parts]),
            alphabets=[a for p in parts for a in p.alphabets],
            names=[n for p in parts for n in p.names],
            splits=[s for p in parts for s in p.splits],
        )


# ------------------------------------------------------------------ locations
def default_root() -> Path:
    """Where the zips are: ``$METATTN_DATA/omniglot`` when METATTN_DATA is set, else
    ``shared/data/omniglot`` beside the source checkout, else ``../shared/data/omniglot``
    from the current folder."""
    return find_data_root(
        "omniglot", CHECKOUT_DATA,
        "pass root=<folder with images_background.zip and images_evaluation.zip>, set "
        "METATTN_DATA=<folder containing omniglot/>, or fetch the zips with "
        "metattn.data.omniglot.download(root)")


def default_cache_dir() -> Path:
    """``$METATTN_CACHE/omniglot`` if METATTN_CACHE is set, else ``~/.cache/metattn/omniglot``."""
    return cache_dir("omniglot")


def _zip_path(root: Path, split: str) -> Path:
    return root / f"images_{split}.zip"


def _missing(path: Path) -> DataError:
    return DataError(
        f"Omniglot: {path} not found. Get the official zip from "
        f"{URL.format(split=path.stem.removeprefix('images_'))} (or call "
        f"metattn.data.omniglot.download({str(path.parent)!r})) and put it there, or pass "
        "root=<folder that holds it>"
    )


# ------------------------------------------------------------------ reading
def _list_characters(zf: zipfile.ZipFile, path: Path, split: str) -> dict[tuple[str, str],
                                                                          list[str]]:
    """``(alphabet, character) -> sorted PNG entry names``, checking the layout."""
    chars: dict[tuple[str, str], list[str]] = {}
    other_tops: set[str] = set()
    for name in zf.namelist():
        if name.endswith("/") or not name.lower().endswith(".png"):
            continue
        m = _PNG.match(name)
        if m is None or m["split"] != split:
            other_tops.add(name.split("/", 1)[0])
            continue
        chars.setdefault((m["alphabet"], m["char"]), []).append(name)
    expected = f"images_{split}/<Alphabet>/<character>/<id>_NN.png"
    if not chars:
        found = f"; found top-level entries {sorted(other_tops)[:5]}" if other_tops else \
            "; it holds no PNG files"
        raise DataError(
            f"Omniglot: {path} does not have the expected layout {expected}{found}. Use the "
            "official release zip"
        )
    for (alphabet, char), files in chars.items():
        if len(files) != DRAWINGS:
            raise DataError(
                f"Omniglot: {path}: character {alphabet}/{char} has {len(files)} drawings; "
                f"expected exactly {DRAWINGS} PNGs per character ({expected}). The zip is "
                "incomplete or not the official release"
            )
        files.sort()
    return dict(sorted(chars.items()))


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L").resize((size, size), Image.LANCZOS)
        return 255 - np.asarray(im, dtype=np.uint8)


def read_zip(path: str | os.PathLike, split: str, image_size: int = 28) -> Omniglot:
    """Read and preprocess one official zip (no cache): LANCZOS resize, ink = 255."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(
            f"Omniglot: {path} is not a readable zip ({e}); download it again"
        ) from e
    with zf:
        chars = _list_characters(zf, path, split)
        if len(chars) != EXPECTED_CHARACTERS.get(split, len(chars)):
            warnings.warn(
                f"Omniglot: {path} holds {len(chars)} characters; the official {split} "
                f"release has {EXPECTED_CHARACTERS[split]}. The 'maml' protocol's split (the "
                "first 1200 characters) then differs from everyone else's; check the zip "
                "with metattn.data.omniglot.verify(path, split)",
                stacklevel=3,
            )
        images = np.empty((len(chars), DRAWINGS, image_size, image_size), dtype=np.uint8)
        for i, files in enumerate(chars.values()):
            for j, name in enumerate(files):
                try:
                    images[i, j] = _decode(zf.read(name), image_size)
                except (zipfile.BadZipFile, OSError, ValueError, zlib.error, EOFError) as e:
                    raise DataError(
                        f"Omniglot: {path}: cannot read {name} ({e}); the zip is corrupt, "
                        "download it again"
                    ) from e
    return Omniglot(
        images=images,
        alphabets=[a for a, _ in chars],
        names=[c for _, c in chars],
        splits=[split] * len(chars),
    )


def _cache_file(path: Path, split: str, image_size: int, cache_dir: Path) -> Path:
    """Cache name keyed by the zip's CONTENT (its directory: names, CRC-32s and sizes), not
    its modification time, so re-mounted or copied zips reuse the cache; a corrupt zip here
    is reported as such."""
    h = zlib.crc32(b"")
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                h = zlib.crc32(f"{info.filename}:{info.CRC}:{info.file_size};".encode(), h)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"Omniglot: {path} is not a readable zip ({e}); re-download it "
                        "(metattn.data.omniglot.download) or copy it again") from e
    key = f"v{_CACHE_VERSION}_{split}_{image_size}px_lanczos_{path.stat().st_size}_{h:08x}"
    return cache_dir / f"omniglot_{key}.npz"


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _load_split(path: Path, split: str, image_size: int, cache_dir: Path | None) -> Omniglot:
    if not path.is_file():
        raise _missing(path)
    if cache_dir is None:
        return read_zip(path, split, image_size)
    cache = _cache_file(path, split, image_size, cache_dir)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                cached = Omniglot(
                    images=z["images"],
                    alphabets=[str(a) for a in z["alphabets"]],
                    names=[str(n) for n in z["names"]],
                    splits=[split] * len(z["names"]),
                )
            n = len(cached.names)
            if cached.images.shape == (n, DRAWINGS, image_size, image_size) \
                    and len(cached.alphabets) == n and n > 0:
                return cached
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a broken or empty cache file is rebuilt below
    data = read_zip(path, split, image_size)
    if _inside(cache_dir, path.parent):
        warnings.warn(
            f"Omniglot: cache folder {cache_dir} is inside the data folder {path.parent}; "
            "not writing a cache there (set METATTN_CACHE elsewhere)",
            stacklevel=3,
        )
        return data
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=data.images, alphabets=np.array(data.alphabets),
                     names=np.array(data.names))
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves no empty file
        os.chmod(tmp, 0o644)
        os.replace(tmp, cache)  # atomic: concurrent loaders never see a half-written file
        tmp = None
    except OSError as e:
        warnings.warn(f"Omniglot: could not write the cache {cache} ({e})", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return data


def load_omniglot(
    root: str | os.PathLike | None = None,
    splits: Sequence[str] = SPLITS,
    image_size: int = 28,
    cache_dir: str | os.PathLike | None | Literal[False] = None,
) -> Omniglot:
    """Load the official splits (default both, background first) as 28x28 uint8, ink = 255.

    ``root`` holds ``images_background.zip``/``images_evaluation.zip`` (default:
    :func:`default_root`). ``cache_dir`` defaults to :func:`default_cache_dir`; ``False``
    disables the cache.
    """
    root_p = Path(root).expanduser() if root is not None else default_root()
    if cache_dir is False:
        cdir = None
    else:
        cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    parts = []
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"Omniglot: split={split!r}; choose from {list(SPLITS)}")
        parts.append(_load_split(_zip_path(root_p, split), split, image_size, cdir))
    return Omniglot.cat(parts)


def split_characters(data: Omniglot, protocol: Protocol, split: str) -> Omniglot:
    """The characters of a meta-``split`` ("train"/"test") under ``protocol`` (module doc)."""
    if split not in ("train", "test"):
        raise TaskError(f"Omniglot: split={split!r}; choose 'train' or 'test'")
    if protocol == "maml":
        n = MAML_TRAIN_CHARACTERS
        if len(data) <= n:
            raise DataError(
                f"Omniglot: the 'maml' protocol needs more than {n} characters (1623 in the "
                f"official release) but the zips hold {len(data)}"
            )
        # the canonical order (split, alphabet, character), whatever order ``data`` is in:
        # otherwise a reordered dataset would give another split, overlapping this one's
        order = sorted(range(len(data)), key=lambda i: (
            SPLITS.index(data.splits[i]) if data.splits[i] in SPLITS else len(SPLITS),
            data.splits[i], data.alphabets[i], data.names[i]))
        return data.subset(order[:n] if split == "train" else order[n:])
    if protocol == "background":
        want = "background" if split == "train" else "evaluation"
        return data.subset([i for i, s in enumerate(data.splits) if s == want])
    raise TaskError(f"Omniglot: protocol={protocol!r}; choose 'maml' or 'background'")


# ------------------------------------------------------------------ download
def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a zip's extracted files, computed as ``find DIR -type f -exec sha256sum {} +
    | LC_ALL=C sort -k2 | sha256sum`` would on the extracted folder (reads every member, so
    a corrupt member raises ``zipfile.BadZipFile``)."""
    import hashlib

    with zipfile.ZipFile(path) as zf:
        lines = sorted(
            ((i.filename, hashlib.sha256(zf.read(i)).hexdigest())
             for i in zf.infolist() if not i.is_dir()),
            key=lambda t: t[0].encode(),
        )
    return hashlib.sha256("".join(f"{d}  {n}\n" for n, d in lines).encode()).hexdigest()


def verify(path: str | os.PathLike, split: str) -> None:
    """Check that ``path`` holds exactly the official ``split`` PNGs (:data:`CONTENT_SHA256`);
    a :class:`DataError` names the file otherwise."""
    try:
        got = content_digest(path)
    except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as e:
        raise DataError(f"Omniglot: {path} is not a readable zip ({e}); download it again") \
            from e
    if got != CONTENT_SHA256[split]:
        raise DataError(
            f"Omniglot: the files in {path} have content sha256 {got}, the official {split} "
            f"release {CONTENT_SHA256[split]}; download it again (download(root, force=True))"
        )


def download(root: str | os.PathLike, force: bool = False) -> Path:
    """Fetch the official zips from GitHub into ``root`` and verify what they contain.

    The check is on the extracted files (:func:`verify`, the content sha256 of every PNG),
    so a rebuilt copy of the official zip passes too. A zip already in ``root`` is verified
    instead of fetched again (``force=True`` fetches anyway).
    """
    root_p = Path(root).expanduser()
    root_p.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        dest = _zip_path(root_p, split)
        if dest.is_file() and not force:
            verify(dest, split)
            continue
        url = URL.format(split=split)
        fd, tmp = tempfile.mkstemp(dir=root_p, suffix=".zip.part")
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
                shutil.copyfileobj(r, f)
            verify(tmp, split)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return root_p


# ------------------------------------------------------------------ episodes
class OmniglotTasks:
    """Seeded N-way K-shot Omniglot episodes (see the module docstring for the protocols).

    ``sample(T, generator)`` returns a :class:`TaskBatch` with ``support_x``
    ``[T, n_way * k_shot, 1, 28, 28]`` float32 in ``[0, 1]`` (ink = 1), ``query_x``
    ``[T, n_way * k_query, 1, 28, 28]``, integer labels in ``[0, n_way)`` and
    ``info["classes"]`` ``[T, n_way]``: the split's class ids (``4 * char + rotation`` with
    rotations, else the character index in the split). ``data`` skips loading (tests, reuse).
    ``shift > 0`` translates every image by a random whole number of pixels in
    ``[-shift, shift]`` along each axis (blank border filled in): augmentation, for training
    episodes only (the recipe's builder passes it to the train split alone).
    """

    def __init__(
        self,
        split: str = "train",
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        protocol: Protocol = "maml",
        root: str | os.PathLike | None = None,
        rotations: bool = True,
        data: Omniglot | None = None,
        shift: int = 0,
    ):
        if not 0 <= int(shift) < 14:
            raise TaskError(f"OmniglotTasks.shift={shift}; use 0 (off) to 13 pixels")
        if k_shot < 1:
            raise TaskError(f"OmniglotTasks.k_shot={k_shot}; it must be >= 1")
        if k_query < 1:
            raise TaskError(f"OmniglotTasks.k_query={k_query}; it must be >= 1")
        if k_shot + k_query > DRAWINGS:
            raise TaskError(
                f"OmniglotTasks: k_shot + k_query = {k_shot} + {k_query} = {k_shot + k_query}; "
                f"each character has only {DRAWINGS} drawings, so k_shot + k_query must be "
                f"<= {DRAWINGS}"
            )
        if n_way < 1:
            raise TaskError(f"OmniglotTasks.n_way={n_way}; it must be >= 1")
        if data is None:
            data = load_omniglot(root)
        chars = split_characters(data, protocol, split)
        self.split = split
        self.protocol = protocol
        self.n_way = int(n_way)
        self.k_shot = int(k_shot)
        self.k_query = int(k_query)
        self.rotations = bool(rotations)
        self.shift = int(shift)
        self.characters = chars
        images = torch.from_numpy(np.ascontiguousarray(chars.images))  # uint8 [C, 20, H, W]
        if self.rotations:
            # Class 4c + r = character c rotated by r * 90 degrees: precomputed once (uint8,
            # 4x the split's size) so that sampling is a single row gather.
            images = torch.stack([torch.rot90(images, r, dims=(-2, -1)) for r in range(4)], 1)
            images = images.flatten(0, 1)
        self.images = images.contiguous()  # uint8 [num_classes, 20, H, W], ink = 255
        self.num_classes = int(self.images.shape[0])
        if self.n_way > self.num_classes:
            raise TaskError(
                f"OmniglotTasks.n_way={n_way} but the {protocol!r} {split} split has only "
                f"{self.num_classes} classes; use n_way <= {self.num_classes}"
            )

    def to(self, device: torch.device | str) -> OmniglotTasks:
        """Keep the images on ``device`` (e.g. the GPU) so that ``sample`` gathers there.

        Indices are still drawn on the CPU generator (same episodes on any device); only the
        gather and the cast run on ``device``, which removes the host-side copy per step."""
        self.images = self.images.to(device)
        return self

    def class_name(self, class_id: int) -> str:
        """``"Alphabet/characterNN"`` plus the rotation, for plots and logs."""
        c, r = divmod(int(class_id), 4) if self.rotations else (int(class_id), 0)
        name = f"{self.characters.alphabets[c]}/{self.characters.names[c]}"
        return name + (f"@rot{90 * r}" if self.rotations else "")

    def _shifted(self, x: torch.Tensor, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """``x`` [N, h * w] (uint8) with each image moved by (dy, dx) ~ U{-s..s}^2: one
        gather from the zero-padded images (drawn on the CPU generator: same on any device)."""
        s, N = self.shift, x.shape[0]
        d = torch.randint(-s, s + 1, (2, N, 1, 1), generator=g).to(x.device, non_blocking=True)
        pad = torch.nn.functional.pad(x.view(N, h, w), (s, s, s, s))  # blank = 0 (no ink)
        rows = torch.arange(h, device=x.device).view(1, h, 1) + s - d[0]
        cols = torch.arange(w, device=x.device).view(1, 1, w) + s - d[1]
        idx = (rows * (w + 2 * s) + cols).view(N, h * w)
        return pad.view(N, -1).gather(1, idx)

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``num_tasks`` episodes (vectorised; the same generator state gives the same)."""
        T, n, k, q = int(num_tasks), self.n_way, self.k_shot, self.k_query
        if T < 1:
            raise TaskError(f"OmniglotTasks.sample: num_tasks={num_tasks}; it must be >= 1")
        g = generator
        classes = torch.rand(T, self.num_classes, generator=g).topk(n, dim=1).indices  # [T, n]
        draws = torch.rand(T, n, DRAWINGS, generator=g).argsort(-1)[..., : k + q]  # [T, n, k+q]
        # (non_blocking: a pageable host-to-GPU copy is staged without waiting for the GPU's
        # queued work, which a blocking copy would)
        rows = (classes.unsqueeze(-1) * DRAWINGS + draws).flatten().to(self.images.device,
                                                                        non_blocking=True)
        h, w = self.images.shape[-2:]
        x = self.images.view(-1, h * w).index_select(0, rows)  # one gather of whole images
        if self.shift:
            x = self._shifted(x, h, w, g)
        x = x.to(torch.float32).mul_(1.0 / 255.0).view(T, n, k + q, 1, h, w)
        y = torch.arange(n, device=x.device).view(1, n, 1)
        sy = y.expand(T, n, k).reshape(T, n * k)
        qy = y.expand(T, n, q).reshape(T, n * q)
        return TaskBatch(
            support_x=x[:, :, :k].flatten(1, 2),
            support_y=sy,
            query_x=x[:, :, k:].flatten(1, 2),
            query_y=qy,
            n_way=n,
            k_shot=k,
            info={"classes": classes},
            check_labels=False,  # 0..n-1 by construction; checking would sync with a GPU
        )
