"""Omniglot: the loader's sources (PNG folders, zip archives, npz arrays, downloads), resizing, the cache, the
splits, the N-way K-shot sampler and the official one-shot runs.

Real data come from ../shared/data/omniglot (relative to the repository root) and those tests skip when it is
absent; everything else runs on small arrays built here (the data set's sizes are patched down).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import omniglot as omniglot_configs
from tests import helpers
from trainer import config as config_lib
from trainer import evaluation, families, parallel
from trainer import model as model_lib
from trainer import omniglot as omniglot_lib

SHARED = os.path.normpath(os.path.join(helpers.REPO, "..", "shared", "data", "omniglot"))
needs_shared = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED, "images_background.npz")),
    reason=f"the shared Omniglot data are not at {SHARED}",
)
# The resized arrays of the real data, kept between test sessions (rebuilt in ~15 s when absent).
REAL_CACHE = os.environ.get(
    "IMAML_TEST_OMNIGLOT_CACHE", os.path.join(tempfile.gettempdir(), "imaml-test-omniglot-cache")
)


# ---------------------------------------------------------------------------------------------------------
# A miniature data set in the canonical layouts


def _strokes(rng: np.random.RandomState, count: int) -> np.ndarray:
    """Random bool images [count, 105, 105] shaped like characters: True background, a few thick strokes."""
    images = np.ones((count, 105, 105), bool)
    yy, xx = np.mgrid[:105, :105]
    for image in images:
        for _ in range(2):
            (y0, x0), (y1, x1) = rng.randint(15, 90, (2, 2))
            for t in np.linspace(0, 1, 12):
                image[(yy - (y0 + t * (y1 - y0))) ** 2 + (xx - (x0 + t * (x1 - x0))) ** 2 < 25] = False
    return images


def _png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).convert("1").save(out, format="PNG")  # 1-bit, like the originals
    return out.getvalue()


def _write_layout(images: np.ndarray, first_id: int, write) -> None:
    """images bool [C, 20, 105, 105] as <Alphabet>/characterNN/XXXX_YY.png via write(relative_path, bytes)."""
    for c, character in enumerate(images):
        for d, image in enumerate(character):
            write(
                f"Alphabet_{c % 2}/character{c // 2 + 1:02d}/{first_id + c:04d}_{d + 1:02d}.png",
                _png_bytes(image),
            )


@pytest.fixture(scope="module")
def _tiny_images():
    rng = np.random.RandomState(0)
    return {
        name: _strokes(rng, count * 20).reshape(count, 20, 105, 105)
        for name, count in (("background", 3), ("evaluation", 2))
    }


@pytest.fixture
def tiny_sets(_tiny_images, monkeypatch):
    """Omniglot shrunk to 3 background and 2 evaluation characters: {set: images bool [C, 20, 105, 105]}."""
    monkeypatch.setattr(omniglot_lib, "NUM_CLASSES", {"background": 3, "evaluation": 2})
    monkeypatch.setattr(omniglot_lib, "FIRST_ID", {"background": 1, "evaluation": 4})
    return {name: images.copy() for name, images in _tiny_images.items()}


def _write_npz(directory, sets):
    for name, images in sets.items():
        np.savez(
            os.path.join(directory, f"images_{name}.npz"),
            images=images,
            labels=np.repeat(np.arange(len(images))[:, None], 20, 1),
        )


def _write_folders(directory, sets):
    for name, images in sets.items():
        root = os.path.join(directory, f"images_{name}")

        def write(path, data, root=root):
            os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
            with open(os.path.join(root, path), "wb") as f:
                f.write(data)

        _write_layout(images, omniglot_lib.FIRST_ID[name], write)


def _write_zip(path, top, images, first_id):
    with zipfile.ZipFile(path, "w") as zf:
        _write_layout(images, first_id, lambda p, data: zf.writestr(f"{top}/{p}", data))
    with open(path, "rb") as f:
        content = f.read()
    return omniglot_lib.Archive(
        url="file://" + os.path.abspath(path), md5=hashlib.md5(content).hexdigest(), size=len(content)
    )


def _expected(sets, size):
    return np.concatenate([omniglot_lib.resize(sets[name], size) for name in omniglot_lib.SETS])


# ---------------------------------------------------------------------------------------------------------
# Sources and the cache


def test_npz_folders_and_archives_give_identical_arrays(tiny_sets, tmp_path, monkeypatch):
    for kind in ("npz", "folders", "zips"):
        (tmp_path / kind).mkdir()
    _write_npz(str(tmp_path / "npz"), tiny_sets)
    _write_folders(str(tmp_path / "folders"), tiny_sets)
    archives = {
        name: _write_zip(
            str(tmp_path / "zips" / f"images_{name}.zip"),
            f"images_{name}",
            images,
            omniglot_lib.FIRST_ID[name],
        )
        for name, images in tiny_sets.items()
    }
    monkeypatch.setattr(omniglot_lib, "ARCHIVES", archives)
    expected = _expected(tiny_sets, 12)
    for kind in ("npz", "folders", "zips"):
        loaded = omniglot_lib.load(str(tmp_path / kind), str(tmp_path / f"cache_{kind}"), image_size=12)
        assert loaded.dtype == np.uint8 and loaded.shape == (5, 20, 12, 12), kind
        np.testing.assert_array_equal(loaded, expected, err_msg=kind)
    # Ink is high: a mostly white character becomes a mostly dark array.
    assert expected.mean() < 80 and expected.max() == 255


def test_resized_arrays_are_cached_and_reused(tiny_sets, tmp_path, monkeypatch):
    _write_npz(str(tmp_path), tiny_sets)
    cache = tmp_path / "cache"
    first = omniglot_lib.load(str(tmp_path), str(cache), image_size=10)
    assert os.listdir(cache) == [os.path.basename(omniglot_lib.cache_path(str(cache), 10, str(tmp_path)))]
    with monkeypatch.context() as m:  # The cache alone is read now.
        m.setattr(omniglot_lib, "_load_set", lambda *a: pytest.fail("read the source despite its cache"))
        np.testing.assert_array_equal(omniglot_lib.load(str(tmp_path), str(cache), image_size=10), first)
    np.testing.assert_array_equal(  # Another size: from the source, with its own cache.
        omniglot_lib.load(str(tmp_path), str(cache), image_size=14), _expected(tiny_sets, 14)
    )
    assert len(os.listdir(cache)) == 2
    for name in omniglot_lib.SETS:  # The data_dir is checked even though its caches exist.
        os.remove(tmp_path / f"images_{name}.npz")
    with pytest.raises(omniglot_lib.OmniglotError, match="lacks images_background"):
        omniglot_lib.load(str(tmp_path), str(cache), image_size=10)


def _no_download(monkeypatch):
    monkeypatch.setattr(omniglot_lib, "download", lambda *a, **k: pytest.fail(f"download attempted: {a}"))


def _error(call) -> str:
    """The message of the OmniglotError that `call()` raises, checked to be a single line."""
    with pytest.raises(omniglot_lib.OmniglotError) as e:
        call()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_a_missing_data_dir_is_an_error_even_beside_a_cache(tiny_sets, tmp_path, monkeypatch):
    """Issue 17: a nonexistent tasks.data_dir was ignored when a resized cache existed (training ran on the
    cache), and without a cache a download was attempted. Now it is one message naming the folder."""
    cache, missing = tmp_path / "cache", tmp_path / "no" / "such" / "omniglot"
    cache.mkdir()
    np.savez(omniglot_lib.cache_path(str(cache), 6), images=np.zeros((5, 20, 6, 6), np.uint8))
    _no_download(monkeypatch)
    config = _omniglot_config(**{"tasks.data_dir": str(missing), "tasks.cache_dir": str(cache)})
    message = _error(lambda: families.get_family(config).load_data(config))
    assert message.startswith(f"tasks.data_dir {missing} does not exist; it must be a folder holding ")
    for form in ("images_<set>.npz", "images_<set>/", "images_<set>.zip"):
        assert form in message
    assert "images_background and images_evaluation" in message
    empty = tmp_path / "empty_cache"  # Without a cache: the same error, no download, nothing written.
    message = _error(lambda: omniglot_lib.load(str(missing), str(empty), image_size=6))
    assert f"tasks.data_dir {missing} does not exist" in message and not empty.exists()
    (tmp_path / "a_file").write_bytes(b"")
    message = _error(lambda: omniglot_lib.load(str(tmp_path / "a_file"), str(cache), image_size=6))
    assert f"tasks.data_dir {tmp_path / 'a_file'} is not a folder" in message
    monkeypatch.chdir(tmp_path)  # A relative data_dir is named by its absolute path.
    message = _error(lambda: omniglot_lib.load("relative/omniglot", str(cache), image_size=6))
    assert f"tasks.data_dir {tmp_path / 'relative' / 'omniglot'} does not exist" in message


def test_a_data_dir_with_one_set_names_the_missing_one(tiny_sets, tmp_path, monkeypatch):
    """The other set is never taken from the cache folder (it was, before) nor downloaded."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    cache.mkdir()
    _write_npz(str(data), {"background": tiny_sets["background"]})
    _write_npz(str(cache), {"evaluation": tiny_sets["evaluation"]})
    _no_download(monkeypatch)
    message = _error(lambda: omniglot_lib.load(str(data), str(cache), image_size=6))
    assert message.startswith(
        f"tasks.data_dir {data} lacks images_evaluation (no images_evaluation.npz, images_evaluation/ or "
        "images_evaluation.zip); it must be a folder holding images_background and images_evaluation"
    )
    assert "lacks images_background" not in message and f"download the archives into {cache}" in message
    assert sorted(os.listdir(cache)) == ["images_evaluation.npz"]  # No cache was written.
    os.remove(data / "images_background.npz")
    message = _error(lambda: omniglot_lib.load(str(data), str(cache), image_size=6))
    assert "lacks images_background (no images_background.npz, " in message
    assert "and images_evaluation (no images_evaluation.npz, " in message
    (data / "images_background").mkdir()  # Each set in any form: an (empty) folder counts as present here
    (data / "images_evaluation.zip").write_bytes(b"")  # and fails later, naming its own path.
    assert omniglot_lib.check_data_dir(str(data)) == {
        "background": str(data / "images_background"),
        "evaluation": str(data / "images_evaluation.zip"),
    }
    message = _error(lambda: omniglot_lib.load(str(data), str(cache), image_size=6))
    assert message.startswith(f"{data / 'images_background'}: no PNG images")


def test_a_data_dir_has_its_own_cache(tiny_sets, tmp_path, monkeypatch):
    """Caches of different sources share cache_dir without ever standing in for one another."""
    cache = tmp_path / "cache"
    cache.mkdir()
    default = np.zeros((5, 20, 8, 8), np.uint8)  # The cache of the default source (cache_dir's own sets).
    np.savez(omniglot_lib.cache_path(str(cache), 8), images=default)
    sets = {"a": tiny_sets, "b": {name: images[:, ::-1] for name, images in tiny_sets.items()}}
    for name, source in sets.items():
        (tmp_path / name).mkdir()
        _write_npz(str(tmp_path / name), source)
    expected = {name: _expected(source, 8) for name, source in sets.items()}
    assert not np.array_equal(expected["a"], expected["b"])
    for name in sets:
        loaded = omniglot_lib.load(str(tmp_path / name), str(cache), image_size=8)
        np.testing.assert_array_equal(loaded, expected[name], err_msg=name)
    paths = {name: omniglot_lib.cache_path(str(cache), 8, str(tmp_path / name)) for name in sets}
    paths[""] = omniglot_lib.cache_path(str(cache), 8)
    assert sorted(os.listdir(cache)) == sorted({os.path.basename(p) for p in paths.values()})
    assert len(os.listdir(cache)) == 3
    assert re.fullmatch(r"omniglot_8px_v\d+_[0-9a-f]{12}\.npz", os.path.basename(paths["a"]))
    # Each source reads back its own cache; a symlink or a relative path to a folder is that folder.
    monkeypatch.setattr(omniglot_lib, "_load_set", lambda *a: pytest.fail("read a source despite its cache"))
    (tmp_path / "link").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    for data_dir, name in (
        (str(tmp_path / "a"), "a"),
        (str(tmp_path / "b"), "b"),
        (str(tmp_path / "link"), "a"),
        ("b", "b"),
    ):
        loaded = omniglot_lib.load(data_dir, str(cache), image_size=8)
        np.testing.assert_array_equal(loaded, expected[name], err_msg=data_dir)
    np.testing.assert_array_equal(omniglot_lib.load("", str(cache), image_size=8), default)
    assert len(os.listdir(cache)) == 3


def test_a_cache_that_cannot_be_written_is_a_warning_and_leaves_no_file(tiny_sets, tmp_path, monkeypatch):
    _write_npz(str(tmp_path), tiny_sets)
    cache = tmp_path / "cache"

    def full_disk(file, **arrays):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(omniglot_lib.np, "savez", full_disk)
    with pytest.warns(UserWarning, match=r"could not cache the resized Omniglot images in .*No space left"):
        loaded = omniglot_lib.load(str(tmp_path), str(cache), image_size=8)
    np.testing.assert_array_equal(loaded, _expected(tiny_sets, 8))
    assert os.listdir(cache) == []


def test_download_is_checked_before_it_is_used(tiny_sets, tmp_path, monkeypatch):
    """file:// stands in for the network: a good archive is downloaded and read; a bad one leaves nothing."""
    source = tmp_path / "server"
    source.mkdir()
    archives = {
        name: _write_zip(
            str(source / f"images_{name}.zip"), f"images_{name}", images, omniglot_lib.FIRST_ID[name]
        )
        for name, images in tiny_sets.items()
    }
    cache = tmp_path / "cache"
    bad = dict(
        archives,
        evaluation=omniglot_lib.Archive(archives["evaluation"].url, "0" * 32, archives["evaluation"].size),
    )
    monkeypatch.setattr(omniglot_lib, "ARCHIVES", bad)
    with pytest.raises(
        omniglot_lib.OmniglotError,
        match=r"download of file://.*images_evaluation\.zip: md5 .*expected 0{32}.*not saved",
    ):
        omniglot_lib.load("", str(cache), image_size=8)
    assert sorted(os.listdir(cache)) == ["images_background.zip"]  # No partial or corrupted file kept.

    monkeypatch.setattr(omniglot_lib, "ARCHIVES", archives)
    np.testing.assert_array_equal(omniglot_lib.load("", str(cache), image_size=8), _expected(tiny_sets, 8))
    assert "images_evaluation.zip" in os.listdir(cache)

    missing = dict(
        archives, background=omniglot_lib.Archive("file:///nonexistent/images_background.zip", "0" * 32, 1)
    )
    monkeypatch.setattr(omniglot_lib, "ARCHIVES", missing)
    with pytest.raises(omniglot_lib.OmniglotError, match=r"could not download .*tasks\.data_dir"):
        omniglot_lib.load("", str(tmp_path / "empty_cache"), image_size=8)
    assert os.listdir(tmp_path / "empty_cache") == []


def test_a_download_cut_mid_transfer_is_one_message_and_leaves_nothing(tmp_path, monkeypatch):
    class CutResponse(io.BytesIO):
        def read(self, size=-1):
            raise http.client.IncompleteRead(b"x" * 10, 1000)

    monkeypatch.setattr(omniglot_lib.urllib.request, "urlopen", lambda url, timeout: CutResponse())
    url = omniglot_lib.ARCHIVES["background"].url
    message = _error(lambda: omniglot_lib.load("", str(tmp_path / "cache"), image_size=8))
    assert message.startswith(f"could not download {url} to {tmp_path / 'cache' / 'images_background.zip'}")
    assert "Without network access, set tasks.data_dir to a folder holding images_background" in message
    assert os.listdir(tmp_path / "cache") == []  # The partial download was removed.


def test_corrupted_or_truncated_archive_fails_its_checksum(tiny_sets, tmp_path, monkeypatch):
    path = str(tmp_path / "images_background.zip")
    archive = _write_zip(path, "images_background", tiny_sets["background"], 1)
    _write_npz(str(tmp_path), {"evaluation": tiny_sets["evaluation"]})  # A data_dir holds both sets.
    monkeypatch.setattr(omniglot_lib, "ARCHIVES", dict(omniglot_lib.ARCHIVES, background=archive))
    omniglot_lib.verify_archive(path, archive)
    with open(path, "r+b") as f:  # Same size, one byte changed.
        f.seek(archive.size // 2)
        byte = f.read(1)
        f.seek(archive.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(
        omniglot_lib.OmniglotError, match=rf"{re.escape(path)}: md5 [0-9a-f]{{32}}, expected {archive.md5}"
    ):
        omniglot_lib.load(str(tmp_path), str(tmp_path / "cache"), image_size=8)
    with open(path, "r+b") as f:
        f.truncate(archive.size - 10)
    with pytest.raises(
        omniglot_lib.OmniglotError,
        match=rf"{re.escape(path)}: {archive.size - 10} bytes, expected {archive.size}",
    ):
        omniglot_lib.verify_archive(path, archive)


@needs_shared
def test_real_archive_with_a_flipped_byte_fails_its_checksum(tmp_path):
    original = os.path.join(SHARED, "images_background_small1.zip")
    with open(original, "rb") as f:
        content = bytearray(f.read())
    archive = omniglot_lib.Archive("file://" + original, hashlib.md5(content).hexdigest(), len(content))
    omniglot_lib.verify_archive(original, archive)
    content[len(content) // 3] ^= 0x01
    corrupted = tmp_path / "images_background_small1.zip"
    corrupted.write_bytes(bytes(content))
    with pytest.raises(omniglot_lib.OmniglotError, match=f"md5 .*expected {archive.md5}"):
        omniglot_lib.load_png_zip(str(corrupted), archive)


def test_folders_of_the_wrong_shape_are_clear_errors(tiny_sets, tmp_path):
    _write_folders(str(tmp_path), tiny_sets)
    root = tmp_path / "images_background"
    os.remove(root / "Alphabet_0" / "character01" / "0001_07.png")
    with pytest.raises(omniglot_lib.OmniglotError, match=r"character01: drawers \[1, .*expected the 20"):
        omniglot_lib.load_png_folder(str(root))
    (root / "Alphabet_0" / "stray.png").write_bytes(b"")
    with pytest.raises(omniglot_lib.OmniglotError, match=r"Alphabet_0/stray\.png: unexpected file"):
        omniglot_lib.load_png_folder(str(root))
    os.remove(root / "Alphabet_0" / "stray.png")
    (root / "Alphabet_0" / "character01" / "0001_07.png").write_bytes(_png_bytes(np.ones((50, 50), bool)))
    with pytest.raises(omniglot_lib.OmniglotError, match=r"0001_07\.png: image of shape \(50, 50\)"):
        omniglot_lib.load_png_folder(str(root))
    with pytest.raises(omniglot_lib.OmniglotError, match="no such folder"):
        omniglot_lib.load_png_folder(str(tmp_path / "missing"))
    shutil.rmtree(tmp_path / "images_evaluation" / "Alphabet_1")  # A set with a character missing.
    (root / "Alphabet_0" / "character01" / "0001_07.png").write_bytes(
        _png_bytes(tiny_sets["background"][0, 6])
    )
    with pytest.raises(omniglot_lib.OmniglotError, match=r"images_evaluation: 1 characters .*expected the 2"):
        omniglot_lib.load(str(tmp_path), str(tmp_path / "cache"), image_size=8, allow_download=False)


def test_resize_matches_pil_lanczos(tiny_sets):
    images = tiny_sets["background"][:2].reshape(-1, 105, 105)
    for size in (28, 14):
        ours = omniglot_lib.resize(images, size).astype(int)
        pil = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.where(im, 0, 255).astype(np.uint8), "L").resize(
                        (size, size), Image.LANCZOS
                    )
                )
                for im in images
            ]
        ).astype(int)
        assert np.abs(ours - pil).max() <= 1, size  # PIL's fixed-point arithmetic rounds differently.
        assert np.mean(ours != pil) < 1e-3, size


@needs_shared
def test_png_folder_and_npz_give_identical_characters(tmp_path):
    with zipfile.ZipFile(os.path.join(SHARED, "images_background_small1.zip")) as zf:
        zf.extractall(tmp_path)
    images, ids = omniglot_lib.load_png_folder(str(tmp_path / "images_background_small1"))
    background, background_ids = omniglot_lib.load_npz(os.path.join(SHARED, "images_background.npz"))
    assert background.shape == (964, 20, 105, 105) and background_ids[0] == 1
    assert len(ids) > 100 and np.all(np.diff(ids) > 0) and ids.max() <= 964
    np.testing.assert_array_equal(images, background[ids - 1])
    zipped, zipped_ids = omniglot_lib.load_png_zip(os.path.join(SHARED, "images_background_small1.zip"))
    np.testing.assert_array_equal(zipped_ids, ids)
    np.testing.assert_array_equal(zipped, images)


# ---------------------------------------------------------------------------------------------------------
# Splits and sampling


def test_splits_are_fixed_disjoint_and_of_the_asked_sizes():
    train, test = omniglot_lib.split_rows("random", 0, 1200, 0)
    assert len(train) == 1200 and len(test) == 423 and not set(train) & set(test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1623))
    again, _ = omniglot_lib.split_rows("random", 0, 1200, 0)
    np.testing.assert_array_equal(train, again)
    other, _ = omniglot_lib.split_rows("random", 1, 1200, 0)
    assert not np.array_equal(train, other)
    # Both background and evaluation characters are in each part of the random split.
    assert (train < 964).any() and (train >= 964).any() and (test < 964).any() and (test >= 964).any()
    few_train, few_test = omniglot_lib.split_rows("random", 0, 300, 100)
    assert len(few_train) == 300 and len(few_test) == 100 and not set(few_train) & set(few_test)
    train, test = omniglot_lib.split_rows("background", 0, 964, 0)
    np.testing.assert_array_equal(train, np.arange(964))
    np.testing.assert_array_equal(test, np.arange(964, 1623))


def _coded_images(num_classes: int, size: int = 6) -> np.ndarray:
    """uint8 [C, 20, S, S] whose every image is distinct and asymmetric (no rotation maps it to another)."""
    rng = np.random.RandomState(1)
    return rng.randint(0, 256, (num_classes, 20, size, size)).astype(np.uint8)


def _omniglot_config(**overrides):
    c = omniglot_configs.get_config("ways=4,shots=2")
    c.tasks.num_query = 3
    c.model.conv_width = 4
    c.model.conv_blocks = 2
    c.tasks.image_size = 6
    c.parallel.task_mapping = "map"
    # The family's tests use L-BFGS, per-image statistics and the exact implicit gradient (the configs' iMAML-GD
    # with batch statistics and a damped solve is trained in RESULTS.md).
    c.inner.solver, c.model.normalization, c.meta_grad.damping = "lbfgs", "layer", 0.0
    return config_lib.with_fields(c, overrides)


@pytest.mark.parametrize("rotate", [True, False])
def test_sampled_tasks_have_the_right_shapes_labels_and_images(rotate):
    config = _omniglot_config(**{"tasks.rotate": rotate})
    family = families.get_family(config)
    ids = np.arange(100, 130, dtype=np.int32)
    data = dict(images=_coded_images(30), ids=ids)
    sample = jax.jit(lambda data, key, step, indices: family.sample(data, key, step, indices, jnp.float64))
    batch = jax.tree.map(np.asarray, sample(data, jax.random.PRNGKey(0), 3, jnp.arange(64)))
    n, k, q = 4, 2, 3
    assert batch["support_x"].shape == (64, n * k, 6, 6, 1) and batch["query_x"].shape == (64, n * q, 6, 6, 1)
    assert batch["support_x"].dtype == np.float64 and batch["support_y"].dtype == np.int32
    np.testing.assert_array_equal(batch["support_y"], np.tile(np.repeat(np.arange(n), k), (64, 1)))
    np.testing.assert_array_equal(batch["query_y"], np.tile(np.repeat(np.arange(n), q), (64, 1)))
    for t in range(64):
        classes, drawers, turns = batch["classes"][t], batch["drawers"][t], batch["rotations"][t]
        assert len(set(classes)) == n and set(classes) <= set(ids)
        for c in range(n):
            assert len(set(drawers[c])) == k + q  # Support and query images are distinct drawings.
            expected = np.rot90(data["images"][classes[c] - 100, drawers[c]], turns[c], axes=(-2, -1))
            grey = lambda x: np.rint(x[..., 0] * 255)  # Back to the stored grey levels (x = level / 255).
            np.testing.assert_array_equal(grey(batch["support_x"][t, c * k : (c + 1) * k]), expected[:k])
            np.testing.assert_array_equal(grey(batch["query_x"][t, c * q : (c + 1) * q]), expected[k:])
    if rotate:
        assert set(batch["rotations"].ravel()) == {0, 1, 2, 3}
    else:
        assert not batch["rotations"].any()
    # Tasks depend only on (step, global index): slices, as devices sample them, give the same tasks.
    part = jax.tree.map(np.asarray, sample(data, jax.random.PRNGKey(0), 3, jnp.arange(16, 32)))
    np.testing.assert_array_equal(part["support_x"], batch["support_x"][16:32])
    other = jax.tree.map(np.asarray, sample(data, jax.random.PRNGKey(0), 4, jnp.arange(16, 32)))
    assert not np.array_equal(other["classes"], part["classes"])


def test_backends_sample_from_device_data_like_the_family():
    """The image array is an argument placed once on every device (not a compile-time constant): the sharded
    sampler over 4 devices gives the family's tasks."""
    config = _omniglot_config(
        **{"train.meta_batch_size": 8, "parallel.num_devices": 4, "parallel.backend": "shard_map"}
    )
    family = families.get_family(config)
    data = dict(images=_coded_images(12), ids=np.arange(1, 13, dtype=np.int32))
    backend = parallel.make_backend(config, local_step=lambda *args, **kwargs: None, family=family, data=data)
    sharded = backend.sample_tasks(jax.random.PRNGKey(5), 2)
    assert len(backend.data["images"].sharding.device_set) == 4
    direct = family.sample(data, jax.random.PRNGKey(5), 2, jnp.arange(8), jnp.float32)
    for name in direct:
        np.testing.assert_array_equal(np.asarray(sharded[name]), np.asarray(direct[name]), err_msg=name)
    lowered = backend._sample_jit.lower(
        backend.data, jax.random.PRNGKey(5), jnp.int32(2), backend.task_indices
    )
    assert len(jax.tree.leaves(lowered.args_info)) == 5  # images, ids, key, step, indices: data are inputs.


@needs_shared
def test_real_split_and_tasks_use_only_their_characters():
    config = omniglot_configs.get_config("ways=5,shots=1")
    config.tasks.data_dir, config.tasks.cache_dir = SHARED, REAL_CACHE
    family = families.get_family(config)
    data = family.load_data(config)
    assert data.train["images"].shape == (1200, 20, 28, 28) and data.test["images"].shape == (423, 20, 28, 28)
    assert not set(data.train["ids"]) & set(data.test["ids"])
    background, _ = omniglot_lib.load_npz(os.path.join(SHARED, "images_background.npz"))
    row = int(data.train["ids"][0]) - 1  # The cached arrays are the resized npz images.
    np.testing.assert_array_equal(data.train["images"][0], omniglot_lib.resize(background[row], 28))
    train = family.sample(data.train, jax.random.PRNGKey(0), 0, jnp.arange(32), jnp.float32)
    held = family.heldout(data.test, jax.random.PRNGKey(1), jnp.arange(32), jnp.float32)
    assert set(np.asarray(train["classes"]).ravel()) <= set(data.train["ids"])
    assert set(np.asarray(held["classes"]).ravel()) <= set(data.test["ids"])
    assert train["support_x"].shape == (32, 5, 28, 28, 1)
    assert 0.05 < float(jnp.mean(train["support_x"])) < 0.4  # Ink (1) on a background (0).


def test_config_refuses_impossible_omniglot_tasks():
    for overrides, field in (
        ({"tasks.num_support": 12, "tasks.num_query": 9}, "tasks.num_support"),
        ({"tasks.num_ways": 50, "tasks.num_train_classes": 40}, "tasks.num_ways"),
        ({"tasks.num_train_classes": 1623}, "tasks.num_train_classes"),
        ({"tasks.split": "background", "tasks.num_train_classes": 1000}, "tasks.num_train_classes"),
        ({"tasks.data_dir": None}, "tasks.data_dir"),
        ({"model.normalization": "running_batch"}, "model.normalization"),
    ):
        with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
            _omniglot_config(**overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"tasks.num_support": 12, "tasks.num_query": 9},
            "config fields 'tasks.num_support' + 'tasks.num_query' = 21: omniglot has 20 images per character, "
            "expected <= 20",
        ),
        (
            {"tasks.num_ways": 50, "tasks.num_train_classes": 40},
            "config field 'tasks.num_ways' = 50 exceeds 'tasks.num_train_classes' = 40: a task needs num_ways "
            "distinct characters",
        ),
        (
            {"tasks.num_train_classes": 1623},
            "config field 'tasks.num_train_classes' = 1623 exceeds the 1622 characters available with "
            "tasks.split = 'random'",
        ),
        (
            {"tasks.split": "background"},
            "config field 'tasks.num_train_classes' = 1200 exceeds the 964 characters available with "
            "tasks.split = 'background'",
        ),
        (
            {"tasks.num_ways": 30, "tasks.num_train_classes": 1600},
            "config field 'tasks.num_ways' = 30 exceeds 'tasks.num_test_classes' = 23: a task needs num_ways "
            "distinct characters",
        ),
    ],
)
def test_omniglot_limits_are_the_familys_check_config_with_its_own_message(overrides, message):
    """validate runs the omniglot family's check_config as it runs an imported family's, without the
    imported family's "tasks.family = ..." prefix: the message is the whole error."""
    config = omniglot_configs.get_config("ways=5,shots=1")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.with_fields(config, overrides)
    assert str(error.value) == message
    with config.unlocked():
        for name, value in overrides.items():
            config.tasks[name.split(".")[1]] = value
    with pytest.raises(config_lib.ConfigError) as direct:
        families.Omniglot.check_config(config)
    assert str(direct.value) == message


# The paper configs' fields that differ from default_config(), as trainer/config.py:omniglot_config(ways,
# shots) gave them before configs/omniglot.py replaced it and the four files configs/omniglot_<N>way<K>shot.py
# (RESULTS.md's commands used those files, and must still run the same experiments).
_PAPER_FIELDS = {
    "checkpoint.every_steps": 1000,
    "eval.batch_size": 100,
    "eval.every_steps": 1000,
    "eval.num_tasks": 600,
    "inner.l2reg": 0.5,
    "inner.solver": "gd",
    "inner.tol": 0.0001,
    "logging.every_steps": 50,
    "meta_grad.damping": 5.0,
    "meta_grad.drop_tasks": "nonfinite",
    "meta_grad.solver_maxiter": 5,
    "model.activation": "relu",
    "model.conv_impl": "patches",
    "model.dtype": "float32",
    "model.normalization": "batch",
    "tasks.family": "omniglot",
    "train.num_steps": 20000,
}
_PAPER_ROWS = {
    "ways=5,shots=1": {"inner.maxiter": 16, "tasks.num_query": 1, "tasks.num_support": 1},
    "ways=5,shots=5": {"inner.maxiter": 16, "tasks.num_query": 5, "tasks.num_support": 5},
    "ways=20,shots=1": {
        "inner.maxiter": 25,
        "tasks.num_query": 1,
        "tasks.num_support": 1,
        "tasks.num_ways": 20,
    },
    "ways=20,shots=5": {
        "inner.maxiter": 25,
        "tasks.num_query": 5,
        "tasks.num_support": 5,
        "tasks.num_ways": 20,
    },
}


@pytest.mark.parametrize("arg", sorted(_PAPER_ROWS))
def test_paper_configs_are_the_old_files_field_for_field(arg):
    expected = {
        **config_lib.flatten(config_lib.default_config(), keep=("tasks.options",)),
        **_PAPER_FIELDS,
        **_PAPER_ROWS[arg],
    }
    flat = config_lib.flatten(config_lib.validate(omniglot_configs.get_config(arg)), keep=("tasks.options",))
    kinds = lambda d: {k: (type(v).__name__, v) for k, v in d.items()}  # 5.0 is not 5.
    assert kinds(flat) == kinds(expected)
    assert f"--config=configs/omniglot.py:{arg} " in omniglot_configs.__doc__


@pytest.mark.parametrize(
    "arg,expected",
    [
        ("", {"ways": 5, "shots": 1}),
        ("ways=20", {"ways": 20, "shots": 1}),
        ("shots=5", {"ways": 5, "shots": 5}),
        ("shots=5, ways=20", {"ways": 20, "shots": 5}),
    ],
)
def test_omniglot_config_argument_defaults_to_5_way_1_shot(arg, expected):
    assert omniglot_configs.parse_argument(arg) == expected
    c = omniglot_configs.get_config(arg)
    assert (c.tasks.num_ways, c.tasks.num_support, c.tasks.num_query) == (
        expected["ways"],
        expected["shots"],
        expected["shots"],
    )
    assert omniglot_configs.get_config().to_dict() == omniglot_configs.get_config("ways=5,shots=1").to_dict()


@pytest.mark.parametrize(
    "arg,expected",
    [
        ("ways=x", "config argument 'ways' = 'x' is invalid: expected an integer >= 2"),
        ("ways=1", "config argument 'ways' = '1' is invalid: expected an integer >= 2"),
        ("shots=0", "config argument 'shots' = '0' is invalid: expected an integer >= 1"),
        ("shots=-1", "config argument 'shots' = '-1' is invalid: expected an integer >= 1"),
        ("shots=2.5", "config argument 'shots' = '2.5' is invalid: expected an integer >= 1"),
        ("way=5", "unknown config argument 'way=5' in 'way=5': expected keys ['shots', 'ways']"),
        ("ways=5,5", "unknown config argument '5' in 'ways=5,5': expected keys ['shots', 'ways']"),
        ("ways=5,ways=20", "config argument 'ways' is given twice"),
    ],
)
def test_omniglot_config_argument_errors_name_the_key(arg, expected):
    with pytest.raises(config_lib.ConfigError) as error:
        omniglot_configs.get_config(arg)
    assert str(error.value).startswith(expected) and "configs/omniglot.py:ways=N,shots=K" in str(error.value)


def _run(module, args):
    env = {**os.environ, "PYTHONPATH": helpers.REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=helpers.REPO, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("module", ["trainer.main", "trainer.sweep"])
def test_cli_passes_the_argument_and_reports_a_bad_one_in_one_line(tmp_path, module):
    """The argument reaches get_config: 20 ways need more than 10 characters, 5 + 16 images more than 20 (each a
    validation error before any work); a bad argument is one line and exit status 2."""
    args = [f"--workdir={tmp_path}/w"] + (["--values=0.5,1"] if module == "trainer.sweep" else [])
    for overrides, expected in (
        (
            ["--config=configs/omniglot.py:ways=20,shots=5", "--config.tasks.num_train_classes=10"],
            "config field 'tasks.num_ways' = 20 exceeds 'tasks.num_train_classes' = 10",
        ),
        (
            ["--config=configs/omniglot.py:ways=20,shots=5", "--config.tasks.num_query=16"],
            "config fields 'tasks.num_support' + 'tasks.num_query' = 21",
        ),
        (
            ["--config=configs/omniglot.py:ways=x"],
            "error: invalid config configs/omniglot.py:ways=x: config argument 'ways' = 'x' is invalid: "
            "expected an integer >= 2",
        ),
    ):
        proc = _run(module, [*overrides, *args])
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------------
# Lake et al.'s one-shot runs


@needs_shared
def test_one_shot_runs_load_with_correct_labels():
    runs = omniglot_lib.load_one_shot_runs(os.path.join(SHARED, "all_runs.zip"), image_size=28)
    assert runs["train"].shape == (20, 20, 28, 28) and runs["test"].shape == (20, 20, 28, 28)
    for labels in runs["test_labels"]:
        np.testing.assert_array_equal(np.sort(labels), np.arange(20))
    # A pixel-distance nearest neighbour is far above chance (5%) only if the labels are read right.
    train = runs["train"].reshape(20, 20, -1).astype(float)
    test = runs["test"].reshape(20, 20, -1).astype(float)
    distances = ((test[:, :, None] - train[:, None]) ** 2).sum(-1)
    accuracy = np.mean(distances.argmin(-1) == runs["test_labels"])
    assert accuracy > 0.2, accuracy
    with pytest.raises(omniglot_lib.OmniglotError, match="no such file"):
        omniglot_lib.load_one_shot_runs(os.path.join(SHARED, "missing.zip"))


def test_one_shot_runs_accuracy_adapts_per_run():
    """Runs whose test images are their training images (shuffled): an adapted net classifies them all."""
    config = _omniglot_config(
        **{
            "tasks.num_ways": 5,
            "inner.l2reg": 1e-3,
            "inner.maxiter": 150,
            "inner.tol": 1e-6,
            "model.dtype": "float64",
            "model.conv_width": 8,
        }
    )
    rng = np.random.RandomState(0)
    train = _coded_images(3 * 5).reshape(3, 5, 20, 6, 6)[:, :, 0]  # 3 runs of 5 classes
    labels = np.stack([rng.permutation(5) for _ in range(3)]).astype(np.int32)
    runs = dict(train=train, test=train[np.arange(3)[:, None], labels], test_labels=labels)
    model = model_lib.make_model(config)
    theta = model_lib.init_params(model, jax.random.PRNGKey(0))
    result = evaluation.one_shot_runs_accuracy(config, model, theta, runs, families.get_family(config), "map")
    np.testing.assert_array_equal(result["per_run_acc"], np.ones(3))
    assert result["one_shot_runs/acc"] == 1.0 and result["one_shot_runs/error_rate"] == 0.0
    with pytest.raises(config_lib.ConfigError, match="tasks.num_ways"):
        evaluation.one_shot_runs_accuracy(
            _omniglot_config(), model, theta, runs, families.get_family(config), "map"
        )
