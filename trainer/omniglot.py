"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015, MIT licence): loading, resizing, splits and task sampling.

Sources (`background`: 964 characters, `evaluation`: 659), each set in one of three forms:
  images_<set>.npz   arrays `images` bool [C, 20, 105, 105] (True = white background) and `labels`;
  images_<set>/      the unzipped canonical layout `<Alphabet>/characterNN/XXXX_YY.png` (character id XXXX,
                     drawer YY);
  images_<set>.zip   the canonical archive (size and md5 checked), read without unzipping.
A given `data_dir` is checked up front and is the only source: it must hold both sets (`check_data_dir`),
nothing is downloaded and nothing is taken from elsewhere. Without a `data_dir`, the sets are read from
`cache_dir`, and a missing one is downloaded there (to a temporary file, checked, then renamed, so a partial
download is never used). Character id i (1..1623) is row i - 1 of the combined array.

Preprocessing as in MAML/iMAML: ink is 1 and background 0, each 105x105 image is resized once to
`image_size` (Lanczos, the filter of the MAML scripts' PIL resize) and the result is cached in `cache_dir`,
under a name that carries a hash of the `data_dir` it was made from (`cache_path`), so a cache is only ever
reused for its own source.
Tasks are sampled on device by `sample_task`, a pure function of a key and the image array.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from trainer import config as config_lib

# Omniglot's size, fixed by the data set (checked again when the data are loaded).
OMNIGLOT_BACKGROUND_CLASSES, OMNIGLOT_EVALUATION_CLASSES, OMNIGLOT_DRAWERS = 964, 659, 20

SETS = ("background", "evaluation")
NUM_CLASSES = {"background": OMNIGLOT_BACKGROUND_CLASSES, "evaluation": OMNIGLOT_EVALUATION_CLASSES}
FIRST_ID = {"background": 1, "evaluation": OMNIGLOT_BACKGROUND_CLASSES + 1}
NUM_DRAWERS = OMNIGLOT_DRAWERS
RAW_SIZE = 105
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "imaml_trainer", "omniglot")
_CACHE_VERSION = 1  # Bump when the preprocessing changes, so stale caches are not read.


@dataclasses.dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    size: int


ARCHIVES = {
    "background": Archive(
        "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
        9_464_212,
    ),
    "evaluation": Archive(
        "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
        6_462_886,
    ),
}


class OmniglotError(ValueError):
    """The data are missing, corrupted or not laid out as expected; the message names the path."""


_FORMS = (
    "images_background and images_evaluation, each as an array file images_<set>.npz, an unzipped folder "
    "images_<set>/ or the canonical archive images_<set>.zip"
)


# ---------------------------------------------------------------------------------------------------------
# Archives and downloads


def file_md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(
    path: str,
    archive: Archive,
    name: str | None = None,
    advice: str = "a partial or corrupted file: delete it to download it again",
) -> None:
    """Raises OmniglotError, naming `name` (default: the path), unless `path` has the archive's size, md5."""
    name, source = name or path, f"(the archive {archive.url})"
    size = os.path.getsize(path)
    if size != archive.size:
        raise OmniglotError(f"{name}: {size} bytes, expected {archive.size} {source}; {advice}")
    md5 = file_md5(path)
    if md5 != archive.md5:
        raise OmniglotError(f"{name}: md5 {md5}, expected {archive.md5} {source}; {advice}")


def download(archive: Archive, destination: str, timeout_s: float = 60.0) -> str:
    """Downloads `archive` to `destination` via a temporary file that is checked before it is renamed."""
    directory = os.path.dirname(os.path.abspath(destination))
    os.makedirs(directory, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=os.path.basename(destination) + ".", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(archive.url, timeout=timeout_s) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        verify_archive(
            partial, archive, name=f"download of {archive.url}", advice=f"not saved to {destination}"
        )
        os.replace(partial, destination)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        # URLError and socket timeouts are OSErrors; a connection cut mid-transfer is an HTTPException.
        raise OmniglotError(
            f"could not download {archive.url} to {destination}: {e}. Without network access, set "
            f"tasks.data_dir to a folder holding {_FORMS}, or put that archive at {destination} yourself"
        ) from e
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return destination


# ---------------------------------------------------------------------------------------------------------
# Reading the canonical PNG layout (a folder or a zip archive)

_PNG_NAME = re.compile(r"^(\d{4})_(\d{2})\.png$")
_LAYOUT = "<Alphabet>/characterNN/XXXX_YY.png (character id XXXX, drawer YY = 01..20)"


def read_png(data: bytes | io.BufferedIOBase, where: str) -> np.ndarray:
    """A 105x105 Omniglot PNG as bool [105, 105], True = white background (the npz convention)."""
    from PIL import Image

    try:
        with Image.open(data if not isinstance(data, bytes) else io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("L"))
    except OSError as e:
        raise OmniglotError(f"{where}: not a readable PNG ({e})") from e
    if pixels.shape != (RAW_SIZE, RAW_SIZE):
        raise OmniglotError(f"{where}: image of shape {pixels.shape}, expected ({RAW_SIZE}, {RAW_SIZE})")
    return pixels >= 128


def _read_layout(paths: list[str], read: Callable[[str], bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Characters of a canonical tree given its file paths relative to `images_<set>/` (posix separators)."""
    characters: dict[tuple[str, str], dict[int, str]] = {}
    ids: dict[tuple[str, str], int] = {}
    for path in sorted(paths):
        parts = path.split("/")
        if parts[-1].startswith(".") or not parts[-1].lower().endswith(".png"):
            continue  # .DS_Store and the like
        match = _PNG_NAME.match(parts[-1])
        if len(parts) != 3 or not match:
            raise OmniglotError(f"{where}/{path}: unexpected file, expected the layout {where}/{_LAYOUT}")
        character = (parts[0], parts[1])
        char_id, drawer = int(match.group(1)), int(match.group(2))
        if ids.setdefault(character, char_id) != char_id:
            raise OmniglotError(
                f"{where}/{parts[0]}/{parts[1]}: images of characters {ids[character]} and "
                f"{char_id} in one folder, expected one character per folder"
            )
        characters.setdefault(character, {})[drawer] = path
    if not characters:
        raise OmniglotError(f"{where}: no PNG images, expected the layout {where}/{_LAYOUT}")
    order = sorted(characters, key=lambda c: ids[c])
    images = np.zeros((len(order), NUM_DRAWERS, RAW_SIZE, RAW_SIZE), bool)
    for row, character in enumerate(order):
        drawers = characters[character]
        if sorted(drawers) != list(range(1, NUM_DRAWERS + 1)):
            raise OmniglotError(
                f"{where}/{character[0]}/{character[1]}: drawers {sorted(drawers)}, expected "
                f"the {NUM_DRAWERS} images XXXX_01.png .. XXXX_{NUM_DRAWERS}.png"
            )
        for drawer, path in drawers.items():
            images[row, drawer - 1] = read_png(read(path), f"{where}/{path}")
    char_ids = np.asarray([ids[c] for c in order], np.int32)
    if len(set(char_ids.tolist())) != len(char_ids):
        raise OmniglotError(f"{where}: a character id appears in two folders, expected each id once")
    return images, char_ids


def load_png_folder(root: str) -> tuple[np.ndarray, np.ndarray]:
    """images bool [C, 20, 105, 105] and character ids [C] (sorted) of an unzipped `images_<set>/` folder."""
    if not os.path.isdir(root):
        raise OmniglotError(f"{root}: no such folder, expected {os.path.basename(root) or root}/{_LAYOUT}")
    paths = []
    for directory, _, files in os.walk(root):
        relative = os.path.relpath(directory, root)
        paths += [f if relative == "." else "/".join([*relative.split(os.sep), f]) for f in files]

    def read(path):
        with open(os.path.join(root, *path.split("/")), "rb") as f:
            return f.read()

    return _read_layout(paths, read, root)


def load_png_zip(path: str, archive: Archive | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like `load_png_folder` for a zip of one top folder `images_<set>/...` (checked against `archive`)."""
    if archive is not None:
        verify_archive(path, archive)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")]
            tops = {n.split("/")[0] for n in names}
            if len(tops) != 1:
                raise OmniglotError(
                    f"{path}: top-level entries {sorted(tops)[:5]}, expected one folder "
                    f"images_<set>/{_LAYOUT}"
                )
            top = tops.pop()
            relative = [n[len(top) + 1 :] for n in names]
            return _read_layout(relative, lambda p: zf.read(f"{top}/{p}"), f"{path}:{top}")
    except zipfile.BadZipFile as e:
        raise OmniglotError(f"{path}: not a zip archive ({e})") from e


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """images bool [C, 20, 105, 105] and character ids [C] of one shared `.npz` set."""
    try:
        with np.load(path) as data:
            if "images" not in data:
                raise OmniglotError(f"{path}: no array 'images', expected images bool [C, 20, 105, 105]")
            images = data["images"]
    except OmniglotError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise OmniglotError(f"{path}: not a readable .npz file ({e})") from e
    if images.dtype != bool or images.ndim != 4 or images.shape[1:] != (NUM_DRAWERS, RAW_SIZE, RAW_SIZE):
        raise OmniglotError(
            f"{path}: images {images.dtype} {images.shape}, expected bool "
            f"[C, {NUM_DRAWERS}, {RAW_SIZE}, {RAW_SIZE}]"
        )
    name = os.path.basename(path)
    first = FIRST_ID["evaluation"] if "evaluation" in name else 1
    return images, np.arange(first, first + images.shape[0], dtype=np.int32)


def find_set(directory: str, name: str) -> str | None:
    """The path of set `name` in `directory`, in the first form present (npz, folder, zip); None if absent."""
    stem = os.path.join(directory, f"images_{name}")
    candidates = [(stem + ".npz", os.path.isfile), (stem, os.path.isdir), (stem + ".zip", os.path.isfile)]
    return next((path for path, present in candidates if present(path)), None)


def check_data_dir(data_dir: str, cache_dir: str = DEFAULT_CACHE_DIR) -> dict[str, str]:
    """The path of each set in a given `data_dir`, else one OmniglotError naming it and all it lacks."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.exists(data_dir):
        problem = "does not exist"
    elif not os.path.isdir(data_dir):
        problem = "is not a folder"
    elif not os.access(data_dir, os.R_OK | os.X_OK):
        problem = "cannot be read (permission denied)"
    else:
        found = {name: find_set(data_dir, name) for name in SETS}
        missing = [name for name, path in found.items() if path is None]
        if not missing:
            return found
        problem = "lacks " + " and ".join(
            f"images_{n} (no images_{n}.npz, images_{n}/ or images_{n}.zip)" for n in missing
        )
    raise OmniglotError(
        f"tasks.data_dir {data_dir} {problem}; it must be a folder holding {_FORMS}. Nothing is downloaded "
        f"and no cache is used in its place while tasks.data_dir is set: correct it, or leave it empty to "
        f"download the archives into {os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)}"
    )


def _load_set(name: str, path: str | None, download_dir: str) -> np.ndarray:
    """All characters of one set, bool [C, 20, 105, 105], read from `path` or downloaded to `download_dir`."""
    if path is None:
        path = download(ARCHIVES[name], os.path.join(download_dir, f"images_{name}.zip"))
    if path.endswith(".npz"):
        images, ids = load_npz(path)
    elif path.endswith(".zip"):
        images, ids = load_png_zip(path, ARCHIVES[name])
    else:
        images, ids = load_png_folder(path)
    expected = np.arange(FIRST_ID[name], FIRST_ID[name] + NUM_CLASSES[name])
    if images.shape[0] != NUM_CLASSES[name] or not np.array_equal(ids, expected):
        raise OmniglotError(
            f"{path}: {images.shape[0]} characters (ids {ids[:1]}..{ids[-1:]}), expected the "
            f"{NUM_CLASSES[name]} characters {expected[0]}..{expected[-1]} of images_{name}"
        )
    return images


# ---------------------------------------------------------------------------------------------------------
# Resizing and the cache


def lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PIL's antialiased Lanczos-3 resampling (Resample.c's `precompute_coeffs`)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 3.0 * filter_scale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        x = (np.arange(lo, hi) - center + 0.5) / filter_scale
        w = np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)
        weights[i, lo:hi] = w / w.sum()
    return weights


def resize(images: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """bool [..., 105, 105] (True = background) -> uint8 [..., size, size], ink 255 and background 0.

    PIL's two passes (horizontal, then vertical, each rounded and clipped to 0..255) in float arithmetic,
    where PIL uses fixed point: the results agree within a grey level.
    """
    flat = images.reshape(-1, images.shape[-2], images.shape[-1])
    rows_T = lanczos_matrix(flat.shape[1], size).T.astype(np.float32)  # [in_h, out]
    cols_T = lanczos_matrix(flat.shape[2], size).T.astype(np.float32)  # [in_w, out]
    out = np.empty((flat.shape[0], size, size), np.uint8)
    for start in range(0, flat.shape[0], chunk):
        ink = np.where(flat[start : start + chunk], np.float32(0), np.float32(255))
        n, in_h, in_w = ink.shape
        horizontal = np.clip(np.rint(ink.reshape(n * in_h, in_w) @ cols_T), 0, 255)  # [n * in_h, out_w]
        horizontal = np.ascontiguousarray(horizontal.reshape(n, in_h, size).transpose(1, 0, 2))
        vertical = rows_T.T @ horizontal.reshape(in_h, n * size)  # [out_h, n * out_w]
        vertical = np.clip(np.rint(vertical), 0, 255).reshape(size, n, size)
        out[start : start + chunk] = vertical.transpose(1, 0, 2)
    return out.reshape(*images.shape[:-2], size, size)


def source_id(data_dir: str) -> str:
    """What a resized cache was made from: the real path of `data_dir`, or "" for `cache_dir`'s own sets."""
    return os.path.realpath(os.path.expanduser(data_dir)) if data_dir else ""


def cache_path(cache_dir: str, image_size: int, data_dir: str = "") -> str:
    """The resized cache of `data_dir`'s sets (of the sets in and downloaded into `cache_dir` if empty).

    A given `data_dir` adds a hash of its real path to the name, so that its cache is never read for another
    source, nor another source's cache for it.
    """
    name = f"omniglot_{image_size}px_v{_CACHE_VERSION}"
    if data_dir:
        name += "_" + hashlib.sha256(source_id(data_dir).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), name + ".npz")


def _read_cache(path: str, source: str, expected_shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached images if `path` holds a cache made from `source`, else None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as data:
            stored = str(data["source"]) if "source" in data else ""  # Caches of v1 before sources: "".
            if stored != source:
                return None  # A hash collision: rebuilt (and overwritten) from this source.
            images = data["images"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise OmniglotError(
            f"{path}: not a readable Omniglot cache ({e}); delete the file to rebuild it"
        ) from e
    if images.shape != expected_shape or images.dtype != np.uint8:
        raise OmniglotError(
            f"{path}: cached images {images.dtype} {images.shape}, expected uint8 "
            f"{expected_shape}; delete the file to rebuild it"
        )
    return images


def _write_cache(path: str, images: np.ndarray, source: str) -> None:
    """Writes via a temporary file renamed into place (never a partial cache); a failure is only a warning."""
    directory = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, source=np.asarray(source))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        warnings.warn(f"could not cache the resized Omniglot images in {path}: {e}", stacklevel=3)


def load(
    data_dir: str = "", cache_dir: str = "", image_size: int = 28, allow_download: bool = True
) -> np.ndarray:
    """All 1623 characters resized: uint8 [1623, 20, S, S], row i = character id i + 1 (ink 255).

    A given `data_dir` must hold both sets (`check_data_dir`), even when their resized cache exists; without
    one, the sets come from `cache_dir` or are downloaded there (if `allow_download`). The resized array is
    cached in `cache_dir` under `cache_path`; a cache that cannot be written is only a warning.
    """
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR)
    paths = check_data_dir(data_dir, cache_dir) if data_dir else None  # Up front, cache or not.
    cached, source = cache_path(cache_dir, image_size, data_dir), source_id(data_dir)
    expected_shape = (sum(NUM_CLASSES.values()), NUM_DRAWERS, image_size, image_size)
    images = _read_cache(cached, source, expected_shape)
    if images is not None:
        return images
    if paths is None:
        paths = {name: find_set(cache_dir, name) for name in SETS}
        missing = [f"images_{name}" for name, path in paths.items() if path is None]
        if missing and not allow_download:
            raise OmniglotError(
                f"{cache_dir} lacks {' and '.join(missing)} and downloads are off; expected {_FORMS}"
            )
    images = np.concatenate([resize(_load_set(name, paths[name], cache_dir), image_size) for name in SETS])
    _write_cache(cached, images, source)
    return images


# ---------------------------------------------------------------------------------------------------------
# Splits and task sampling


def omniglot_class_limits(split: str, num_train_classes: int) -> tuple[int, int]:
    """The most (meta-train, meta-test) characters a split can have."""
    if split == "background":
        return OMNIGLOT_BACKGROUND_CLASSES, OMNIGLOT_EVALUATION_CLASSES
    total = OMNIGLOT_BACKGROUND_CLASSES + OMNIGLOT_EVALUATION_CLASSES
    return total - 1, total - num_train_classes


def check_config(config) -> None:
    """What the data set allows of the config's tasks (the omniglot family's `check_config`, run by
    `config.validate`): images per character, and characters per split and per task. Raises ConfigError."""
    t = config.tasks
    shots = t.num_support + t.num_query
    if shots > OMNIGLOT_DRAWERS:
        raise config_lib.ConfigError(
            f"config fields 'tasks.num_support' + 'tasks.num_query' = {shots}: omniglot has "
            f"{OMNIGLOT_DRAWERS} images per character, expected <= {OMNIGLOT_DRAWERS}"
        )
    train_limit, test_limit = omniglot_class_limits(t.split, t.num_train_classes)
    num_test = t.num_test_classes or test_limit
    for name, value, limit in (
        ("num_train_classes", t.num_train_classes, train_limit),
        ("num_test_classes", num_test, test_limit),
    ):
        if value > limit:
            raise config_lib.ConfigError(
                f"config field 'tasks.{name}' = {value} exceeds the {limit} characters "
                f"available with tasks.split = {t.split!r}"
            )
        if t.num_ways > value:
            raise config_lib.ConfigError(
                f"config field 'tasks.num_ways' = {t.num_ways} exceeds "
                f"'tasks.{name}' = {value}: a task needs num_ways distinct characters"
            )


def split_rows(split: str, seed: int, num_train: int, num_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (= character id - 1) of the meta-train and meta-test characters, disjoint and sorted.

    "random": one permutation of all 1623 characters (fixed by `seed`); "background": train from the
    background set, test from the evaluation set. `num_test = 0` takes all remaining characters.
    """
    background = np.arange(NUM_CLASSES["background"])
    evaluation = np.arange(NUM_CLASSES["background"], sum(NUM_CLASSES.values()))
    rng = np.random.RandomState(seed)
    if split == "random":
        order = rng.permutation(np.concatenate([background, evaluation]))
        train_pool, test_pool = order[:num_train], order[num_train:]
    elif split == "background":
        train_pool, test_pool = rng.permutation(background)[:num_train], rng.permutation(evaluation)
    else:
        raise ValueError(f"config field 'tasks.split' = {split!r}: expected one of {list(config_lib.SPLITS)}")
    test = test_pool[:num_test] if num_test else test_pool
    if len(train_pool) < num_train or len(test) < num_test:
        raise ValueError(
            f"split {split!r} has {len(train_pool)} / {len(test_pool)} characters, "
            f"asked for {num_train} / {num_test}"
        )
    return np.sort(train_pool), np.sort(test)


def rotate90(images_NxMxSxS: jax.Array, turns_N: jax.Array) -> jax.Array:
    """Rotates the images of class n counter-clockwise by turns_N[n] quarter turns (traced turns)."""
    rotations = jnp.stack([jnp.rot90(images_NxMxSxS, k, axes=(-2, -1)) for k in range(4)])
    return rotations[turns_N, jnp.arange(images_NxMxSxS.shape[0])]


def sample_task(
    images_CxDxSxS: jax.Array,
    ids_C: jax.Array,
    key: jax.Array,
    *,
    num_ways: int,
    num_support: int,
    num_query: int,
    rotate: bool,
    dtype,
) -> dict[str, jax.Array]:
    """One N-way task: N distinct characters, K support and Q query images per class, all distinct drawers.

    Labels are 0..N-1 in the order the characters were drawn; with `rotate`, each class is turned by a
    random multiple of 90 degrees (the same for its support and query images). Pure and jittable.
    Returns support_x [N*K, S, S, 1], support_y [N*K] int32, query_x [N*Q, S, S, 1], query_y [N*Q], and
    for checks: classes [N] (character ids), drawers [N, K+Q] (0-based) and rotations [N].
    """
    images_CxDxSxS, ids_C = jnp.asarray(images_CxDxSxS), jnp.asarray(ids_C)
    k_classes, k_drawers, k_rotations = jax.random.split(key, 3)
    shots = num_support + num_query
    rows = jax.random.choice(k_classes, images_CxDxSxS.shape[0], (num_ways,), replace=False)
    drawers = jax.vmap(lambda k: jax.random.permutation(k, images_CxDxSxS.shape[1])[:shots])(
        jax.random.split(k_drawers, num_ways)
    )
    images = images_CxDxSxS[rows[:, None], drawers]  # [N, K+Q, S, S]
    turns = (
        jax.random.randint(k_rotations, (num_ways,), 0, 4) if rotate else jnp.zeros((num_ways,), jnp.int32)
    )
    images = rotate90(images, turns).astype(dtype)[..., None] / 255.0
    size = images.shape[2]
    labels = jnp.broadcast_to(jnp.arange(num_ways, dtype=jnp.int32)[:, None], (num_ways, shots))
    return dict(
        support_x=images[:, :num_support].reshape(num_ways * num_support, size, size, 1),
        support_y=labels[:, :num_support].reshape(-1),
        query_x=images[:, num_support:].reshape(num_ways * num_query, size, size, 1),
        query_y=labels[:, num_support:].reshape(-1),
        classes=ids_C[rows],
        drawers=drawers,
        rotations=turns,
    )


# ---------------------------------------------------------------------------------------------------------
# Lake et al.'s 20 one-shot classification runs (all_runs.zip)


def load_one_shot_runs(path: str, image_size: int = 28) -> dict[str, np.ndarray]:
    """The official 20-way within-alphabet one-shot runs.

    Returns train uint8 [R, 20, S, S] (one image per class, class c = training/classNN with NN = c + 1),
    test uint8 [R, 20, S, S] (test/itemNN) and test_labels int32 [R, 20]: the class of each test item,
    from each run's class_labels.txt ("runNN/test/itemMM.png runNN/training/classKK.png").
    """
    if not os.path.isfile(path):
        raise OmniglotError(
            f"{path}: no such file, expected all_runs.zip (runNN/training, runNN/test, "
            "runNN/class_labels.txt)"
        )
    runs: dict[str, dict] = {}
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        for run in sorted({n.split("/")[0] for n in names if re.fullmatch(r"run\d\d/class_labels\.txt", n)}):
            lines = zf.read(f"{run}/class_labels.txt").decode().split()
            if len(lines) % 2:
                raise OmniglotError(
                    f"{path}:{run}/class_labels.txt: expected pairs 'test/itemMM.png training/classKK.png'"
                )
            pairs = sorted(zip(lines[0::2], lines[1::2], strict=True))
            num_classes = len(pairs)
            train = [f"{run}/training/class{c:02d}.png" for c in range(1, num_classes + 1)]
            test = [f"{run}/test/item{c:02d}.png" for c in range(1, num_classes + 1)]
            labels = []
            for item, (test_name, train_name) in zip(test, pairs, strict=True):
                if not item.endswith(test_name.split("/", 1)[-1]) or train_name.split("/", 1)[-1] not in {
                    t.split("/", 1)[-1] for t in train
                }:
                    raise OmniglotError(
                        f"{path}:{run}/class_labels.txt: unexpected pair {test_name} {train_name}"
                    )
                labels.append(int(re.search(r"class(\d+)\.png$", train_name).group(1)) - 1)
            missing = sorted(set(train + test) - names)
            if missing:
                raise OmniglotError(f"{path}: missing {missing[:3]}")
            runs[run] = dict(
                train=[read_png(zf.read(n), f"{path}:{n}") for n in train],
                test=[read_png(zf.read(n), f"{path}:{n}") for n in test],
                labels=labels,
            )
    if not runs:
        raise OmniglotError(f"{path}: no runNN/class_labels.txt, expected the official all_runs.zip")
    order = sorted(runs)
    return dict(
        train=resize(np.stack([runs[r]["train"] for r in order]), image_size),
        test=resize(np.stack([runs[r]["test"] for r in order]), image_size),
        test_labels=np.asarray([runs[r]["labels"] for r in order], np.int32),
    )
