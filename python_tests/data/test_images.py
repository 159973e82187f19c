"""Few-shot image task families (amaml_ext.data.images): Omniglot and Mini-ImageNet readers on tiny
fixtures written in the original formats, N-way K-shot sampling, errors; plus one test on the real
Omniglot zips when $AMAML_DATA_ROOT holds them."""

import io
import os
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from amaml_ext.data.images import MiniImageNet, Omniglot, sources
from amaml_ext.train import confidence_interval
from amaml_ext.models import Conv4

from helpers import DRAWINGS, make_omniglot

# ------------------------------------------------------------------------------------------------
# fixtures (make_omniglot is in helpers.py: the command's tests use it too)

def _jpeg(color, size=(100, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, tuple(int(c) for c in color)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


MINI_CLASSES = {"train": ["n01000001", "n01000002", "n01000003"], "val": ["n02000001", "n02000002"],
                "test": ["n03000001", "n03000002"]}
MINI_PER_CLASS = 5


def make_mini(root, subfolders=False, per_class=MINI_PER_CLASS, classes=MINI_CLASSES):
    """Write ``root/miniimagenet/{train,val,test}.csv`` and ``images/`` with solid-colour JPEGs
    (100x90, so they must be resized). Returns ``{filename: rgb colour}``."""
    folder = os.path.join(root, "miniimagenet")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    colors, k = {}, 0
    for split, labels in classes.items():
        lines = ["filename,label"]
        for lab in labels:
            for j in range(per_class):
                k += 1
                fname = f"{lab}{j + 1:08d}.jpg"
                color = ((37 * k) % 256, (91 * k + 40) % 256, (13 * k + 200) % 256)
                colors[fname] = np.array(color)
                d = os.path.join(folder, "images", lab) if subfolders else os.path.join(folder, "images")
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, fname), "wb") as f:
                    f.write(_jpeg(color))
                lines.append(f"{fname},{lab}")
        with open(os.path.join(folder, f"{split}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return colors


@pytest.fixture
def omni(tmp_path):
    truth = make_omniglot(tmp_path, zipped=True)
    return Omniglot(tmp_path, n_train=5), truth


@pytest.fixture
def mini(tmp_path):
    colors = make_mini(tmp_path)
    return MiniImageNet(tmp_path), colors


def _char(class_name):
    return class_name.rsplit("/", 1)[0]


# ------------------------------------------------------------------------------------------------
# Omniglot


@pytest.mark.parametrize("zipped", [True, False])
def test_omniglot_counts(tmp_path, zipped):
    truth = make_omniglot(tmp_path, zipped=zipped)
    om = Omniglot(tmp_path, n_train=5)
    assert om.sources == dict.fromkeys(["images_background", "images_evaluation"], "zip" if zipped else "folder")
    assert om.num_characters == 8 and om.characters == sorted(truth)
    assert om.source_characters == {"images_background": 5, "images_evaluation": 3}
    assert om.images_per_class == DRAWINGS
    assert om.num_classes == 8 * 4
    assert om.splits == ("train", "test")
    assert om.split_characters == {"train": 5, "test": 3}
    assert om.split_classes == {"train": 20, "test": 12}
    assert om.num_tasks("train", 5) == 15504  # comb(20, 5)
    assert om.raw_images.shape == (8, DRAWINGS, 28, 28) and om.raw_images.dtype == torch.uint8
    assert om.image_shape == (1, 28, 28)
    assert "characters=8" in repr(om)


def test_omniglot_zip_and_folder_read_the_same(tmp_path):
    make_omniglot(tmp_path / "z", zipped=True)
    make_omniglot(tmp_path / "d", zipped=False)
    a, b = Omniglot(tmp_path / "z", n_train=5), Omniglot(tmp_path / "d", n_train=5)
    assert a.characters == b.characters
    assert torch.equal(a.raw_images, b.raw_images)
    assert a.class_names("test") == b.class_names("test")


def test_omniglot_nested_unzip_folder(tmp_path):
    """A folder unzipped one level too deep (images_background/images_background/...) is found."""
    make_omniglot(tmp_path, zipped=False)
    for src in ("images_background", "images_evaluation"):
        d = tmp_path / "omniglot" / src
        os.remove(d / ".DS_Store")
        os.rename(d, tmp_path / "omniglot" / "tmp")
        os.makedirs(d)
        os.rename(tmp_path / "omniglot" / "tmp", d / src)
    om = Omniglot(tmp_path, n_train=5)
    assert om.num_characters == 8


@pytest.mark.parametrize("invert", [True, False])
def test_omniglot_pixels_and_rotations_are_exact(tmp_path, invert):
    """28x28 sources are not resampled: every class image is the drawing (inverted: strokes 1),
    rotated by the class's rotation (counter-clockwise, as PIL's ROTATE_90/180/270)."""
    truth = make_omniglot(tmp_path, src=28)
    om = Omniglot(tmp_path, n_train=5, invert=invert)
    seen = set()
    for split in om.splits:
        for j, name in enumerate(om.class_names(split)):
            char, rot = _char(name), int(name.rsplit("/rot", 1)[1])
            x = om.class_images(split, j)
            assert x.shape == (DRAWINGS, 1, 28, 28) and x.dtype == torch.float32
            ink = torch.from_numpy(truth[char]).float()
            want = torch.rot90(ink if invert else 1 - ink, rot // 90, dims=(-2, -1))
            assert torch.equal(x[:, 0], want), name
            # independent check of the direction with Pillow
            pil = {0: None, 90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                   270: Image.Transpose.ROTATE_270}[rot]
            im = Image.fromarray(np.where(truth[char][0], 0, 255).astype(np.uint8))
            if pil is not None:
                im = im.transpose(pil)
            ref = torch.from_numpy(np.asarray(im) / 255.0).float()
            assert torch.equal(x[0, 0], 1 - ref if invert else ref), name
            seen.add((char, rot))
    assert len(seen) == 32  # 8 characters x 4 rotations, each a class of its own
    # rotated classes really differ from the unrotated one
    x0, x90 = om.class_images("train", 0), om.class_images("train", 1)
    n0, n1 = om.class_names("train")[:2]
    assert n0.endswith("/rot0") and n1 == n0[: -len("rot0")] + "rot90"
    assert not torch.equal(x0, x90)


def test_omniglot_resize_and_scale(tmp_path):
    """105x105 drawings (like the real ones) are resized to 28x28 floats in [0, 1]: a stroke filling
    the top-left quadrant is ~1 there and ~0 elsewhere after inversion."""
    def pattern(cid, j):
        ink = np.zeros((105, 105), bool)
        ink[: 52 + j, : 52 + cid] = True
        return ink
    make_omniglot(tmp_path, src=105, pattern=pattern)
    om = Omniglot(tmp_path, n_train=5, rotations=(0,))
    assert om.raw_images.shape == (8, DRAWINGS, 28, 28)
    x = om.class_images("train", 0)
    assert x.shape == (DRAWINGS, 1, 28, 28)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[:, 0, :10, :10], torch.ones(()), atol=0.02)
    assert torch.allclose(x[:, 0, 20:, 20:], torch.zeros(()), atol=0.02)
    assert len(torch.unique(x)) > 2  # anti-aliased grey levels at the edge (lanczos)
    nearest = Omniglot(tmp_path, n_train=5, rotations=(0,), resample="nearest")
    assert set(torch.unique(nearest.class_images("train", 0)).tolist()) <= {0.0, 1.0}
    small = Omniglot(tmp_path, n_train=5, rotations=(0,), image_size=20)
    assert small.class_images("test", 0).shape == (DRAWINGS, 1, 20, 20)
    assert small.sample("test", 2, ways=3, shots=1, query_shots=1, seed=0).support[0].shape == (2, 3, 1, 20, 20)


def test_omniglot_splits(tmp_path):
    make_omniglot(tmp_path)
    om = Omniglot(tmp_path, n_train=5)
    train = {_char(n) for n in om.class_names("train")}
    test = {_char(n) for n in om.class_names("test")}
    assert len(train) == 5 and len(test) == 3 and not train & test  # split by character
    assert train | test == set(om.characters)
    # the shuffle is seeded: same seed, same split; another seed, (here) another split
    assert Omniglot(tmp_path, n_train=5).class_names("test") == om.class_names("test")
    others = [{_char(n) for n in Omniglot(tmp_path, n_train=5, split_seed=s).class_names("test")} for s in range(2, 8)]
    assert any(o != test for o in others)
    # validation characters come out of the n_train ones
    v = Omniglot(tmp_path, n_train=5, n_val=2)
    assert v.splits == ("train", "val", "test") and v.split_characters == {"train": 3, "val": 2, "test": 3}
    assert {_char(n) for n in v.class_names("test")} == test
    assert {_char(n) for n in v.class_names("train") + v.class_names("val")} == train
    # Lake's background / evaluation split
    bg = Omniglot(tmp_path, class_split="background")
    assert {_char(n) for n in bg.class_names("train")} == {c for c in bg.characters if c.startswith("images_background/")}
    assert {_char(n) for n in bg.class_names("test")} == {c for c in bg.characters if c.startswith("images_evaluation/")}
    assert bg.split_classes == {"train": 20, "test": 12}
    # no augmentation
    assert Omniglot(tmp_path, n_train=5, rotations=(0,)).split_classes == {"train": 5, "test": 3}


# ------------------------------------------------------------------------------------------------
# sampling (both datasets)


def _check_batch(ds, split, n_tasks, ways, shots, query_shots, seed):
    batch, idx = ds.sample(split, n_tasks, ways, shots, query_shots, seed=seed, return_index=True)
    (xs, ys), (xq, yq) = batch.support, batch.query
    shape = ds.image_shape
    assert xs.shape == (n_tasks, ways * shots, *shape) and xq.shape == (n_tasks, ways * query_shots, *shape)
    assert xs.dtype == xq.dtype == torch.float32 and ys.dtype == yq.dtype == torch.int64
    assert ys.shape == (n_tasks, ways * shots) and yq.shape == (n_tasks, ways * query_shots)
    assert idx.classes.shape == (n_tasks, ways)
    assert idx.support.shape == (n_tasks, ways, shots) and idx.query.shape == (n_tasks, ways, query_shots)
    for b in range(n_tasks):
        # labels 0..N-1, each exactly K (Q) times; query labels are the support's
        assert torch.equal(torch.bincount(ys[b], minlength=ways), torch.full((ways,), shots))
        assert torch.equal(torch.bincount(yq[b], minlength=ways), torch.full((ways,), query_shots))
        assert len(set(idx.classes[b].tolist())) == ways  # distinct classes
        assert idx.classes[b].min() >= 0 and idx.classes[b].max() < ds.split_classes[split]
        for i, c in enumerate(idx.classes[b].tolist()):
            s, q = idx.support[b, i].tolist(), idx.query[b, i].tolist()
            assert len(set(s)) == shots and len(set(q)) == query_shots and not set(s) & set(q)
            imgs = ds.class_images(split, c)
            # the images with label i are the class's images at those indices, in that order
            assert torch.equal(xs[b][ys[b] == i], imgs[s])
            assert torch.equal(xq[b][yq[b] == i], imgs[q])
        # by content too: no query image is a support image (the fixture images are all distinct)
        flat_s, flat_q = xs[b].flatten(1), xq[b].flatten(1)
        assert not (flat_s[:, None] == flat_q[None]).all(-1).any()
    return batch, idx


@pytest.mark.parametrize("split", ["train", "test"])
def test_omniglot_n_way_k_shot(omni, split):
    om, _ = omni
    batch, idx = _check_batch(om, split, n_tasks=6, ways=5, shots=2, query_shots=2, seed=1)
    assert batch.size == 6
    # the class sets of a split stay in that split's characters
    names = om.class_names(split)
    other = {_char(n) for s in om.splits if s != split for n in om.class_names(s)}
    assert not {_char(names[c]) for c in idx.classes.flatten().tolist()} & other
    # ways = all classes, shots + query = all drawings
    _check_batch(om, split, n_tasks=2, ways=om.split_classes[split], shots=1, query_shots=DRAWINGS - 1, seed=2)


def test_mini_n_way_k_shot(mini):
    ds, _ = mini
    _check_batch(ds, "train", n_tasks=4, ways=3, shots=2, query_shots=3, seed=0)
    _check_batch(ds, "val", n_tasks=2, ways=2, shots=1, query_shots=4, seed=0)
    _check_batch(ds, "test", n_tasks=2, ways=2, shots=1, query_shots=1, seed=0)


def test_labels_are_permuted_per_task(omni):
    om, _ = omni
    _, idx = om.sample("train", 50, ways=4, shots=1, query_shots=1, seed=0, return_index=True)
    # label 0 is not always the smallest class index, and the class sets vary
    assert not (idx.classes.argsort(1) == torch.arange(4)).all()
    assert len({tuple(sorted(r)) for r in idx.classes.tolist()}) > 10
    assert len(set(idx.classes[:, 0].tolist())) > 5


def test_same_seed_same_tasks(omni):
    om, _ = omni
    a = om.sample("train", 4, 5, 1, 2, seed=7)
    b = om.sample("train", 4, 5, 1, 2, seed=7)
    c = om.sample("train", 4, 5, 1, 2, generator=torch.Generator().manual_seed(7))
    d = om.sample("train", 4, 5, 1, 2, seed=8)
    for t in (b, c):
        assert all(torch.equal(u, v) for u, v in zip(a.support + a.query, t.support + t.query))
    assert not torch.equal(a.support[0], d.support[0])
    # a generator advances: two draws from one generator differ
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(om.sample("train", 2, seed=None, generator=g).support[0],
                           om.sample("train", 2, generator=g).support[0])


def test_sample_defaults_dtype_device_and_conv4(omni, mini):
    om, _ = omni
    b = om.sample("train", 2, ways=8, seed=0)  # Omniglot defaults: 1 shot, 1 query
    assert b.support[0].shape == (2, 8, 1, 28, 28) and b.query[0].shape == (2, 8, 1, 28, 28)
    b64 = om.sample("train", 2, ways=8, seed=0, dtype=torch.float64, device="cpu")
    assert b64.support[0].dtype == torch.float64 and b64.support[1].dtype == torch.int64
    assert torch.allclose(b64.support[0].float(), b.support[0])
    assert b.to(dtype=torch.float64).support[1].dtype == torch.int64
    net = Conv4(ways=8, in_channels=1, channels=8, image_size=28)
    assert net(b.task(0).support[0]).shape == (8, 8)
    ds, _ = mini
    m = ds.sample("train", 1, ways=3, shots=1, query_shots=4, seed=0)
    assert Conv4(ways=3, in_channels=3, channels=8, image_size=84)(m.task(0).support[0]).shape == (3, 3)


# ------------------------------------------------------------------------------------------------
# Mini-ImageNet


@pytest.mark.parametrize("subfolders", [False, True])
def test_mini_counts_and_pixels(tmp_path, subfolders):
    colors = make_mini(tmp_path, subfolders=subfolders)
    ds = MiniImageNet(tmp_path)
    assert ds.split_classes == {"train": 3, "val": 2, "test": 2}
    assert ds.num_classes == 7 and ds.images_per_class == MINI_PER_CLASS
    assert ds.labels == MINI_CLASSES and ds.class_names("val") == MINI_CLASSES["val"]
    assert ds.image_shape == (3, 84, 84)
    for split, labels in MINI_CLASSES.items():
        for c, lab in enumerate(labels):
            x = ds.class_images(split, c)
            assert x.shape == (MINI_PER_CLASS, 3, 84, 84) and x.dtype == torch.float32
            assert x.min() >= 0 and x.max() <= 1
            for j in range(MINI_PER_CLASS):
                want = torch.tensor(colors[f"{lab}{j + 1:08d}.jpg"] / 255.0, dtype=torch.float32)
                assert torch.allclose(x[j], want[:, None, None], atol=4 / 255), (lab, j)
    assert "split_classes" in repr(ds)


def test_mini_lazy_preload_and_cache(tmp_path, monkeypatch):
    make_mini(tmp_path)
    lazy = MiniImageNet(tmp_path, image_size=32)
    assert lazy._data == {}
    lazy.sample("test", 1, 2, 1, 1, seed=0)
    assert set(lazy._data) == {"test"}
    cache = tmp_path / "cache"
    eager = MiniImageNet(tmp_path, image_size=32, preload=True, cache_dir=cache)
    assert set(eager._data) == {"train", "val", "test"} and len(os.listdir(cache)) == 3
    monkeypatch.setattr(sources, "decode", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    again = MiniImageNet(tmp_path, image_size=32, preload=True, cache_dir=cache)
    for s in again.splits:
        assert torch.equal(again._data[s], eager._data[s])
    assert torch.equal(again._data["test"], lazy._data["test"])


# ------------------------------------------------------------------------------------------------
# cache


def test_omniglot_cache(tmp_path, monkeypatch):
    make_omniglot(tmp_path)
    cache = tmp_path / "cache"
    a = Omniglot(tmp_path, n_train=5, cache_dir=cache)
    assert os.path.isfile(a.cache_file) and os.path.dirname(a.cache_file) == str(cache)
    real_decode = sources.decode
    monkeypatch.setattr(sources, "decode", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    b = Omniglot(tmp_path, n_train=5, cache_dir=cache)
    assert torch.equal(a.raw_images, b.raw_images) and a.characters == b.characters
    # other preprocessing settings: another cache file
    monkeypatch.setattr(sources, "decode", real_decode)
    c = Omniglot(tmp_path, n_train=5, cache_dir=cache, image_size=20)
    assert c.cache_file != a.cache_file and len(os.listdir(cache)) == 2
    # a corrupt cache is ignored with a warning and rewritten
    with open(a.cache_file, "wb") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="ignoring unreadable image cache"):
        d = Omniglot(tmp_path, n_train=5, cache_dir=cache)
    assert torch.equal(d.raw_images, a.raw_images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Omniglot(tmp_path, n_train=5, cache_dir=cache)  # rewritten: no warning now


# ------------------------------------------------------------------------------------------------
# root and errors


def test_root_from_environment(tmp_path, monkeypatch):
    make_omniglot(tmp_path)
    monkeypatch.setenv("AMAML_DATA_ROOT", str(tmp_path))
    assert Omniglot(n_train=5).root == str(tmp_path)
    monkeypatch.delenv("AMAML_DATA_ROOT")
    with pytest.raises(ValueError, match="'root' was not given.*AMAML_DATA_ROOT is not set"):
        Omniglot(n_train=5)
    with pytest.raises(ValueError, match="AMAML_DATA_ROOT is not set"):
        MiniImageNet()
    monkeypatch.setenv("AMAML_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="AMAML_DATA_ROOT=.*nowhere.*does not exist"):
        Omniglot()


def test_missing_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Omniglot(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a folder"):
        (tmp_path / "file").write_text("x")
        Omniglot(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match=r"Omniglot folder .*omniglot.* does not exist"):
        Omniglot(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Mini-ImageNet folder .*miniimagenet.* does not exist"):
        MiniImageNet(tmp_path)
    make_omniglot(tmp_path)
    os.remove(tmp_path / "omniglot" / "images_evaluation.zip")
    with pytest.raises(FileNotFoundError, match=r"images_evaluation is missing: expected the zip .*images_evaluation"
                                                r"\.zip' or the unpacked folder .*images_evaluation'"):
        Omniglot(tmp_path, n_train=5)


def _rezip(path, edit):
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    members = edit(members)
    with zipfile.ZipFile(path, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)


def test_malformed_omniglot_errors(tmp_path):
    make_omniglot(tmp_path)
    bg = tmp_path / "omniglot" / "images_background.zip"
    good = bg.read_bytes()
    bg.write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match="not a readable zip file.*images_background.zip"):
        Omniglot(tmp_path, n_train=5)
    # members without the images_background/ prefix
    bg.write_bytes(good)
    _rezip(bg, lambda m: {k.split("/", 1)[1]: v for k, v in m.items() if "/" in k.rstrip("/")})
    with pytest.raises(ValueError, match=r"no PNGs at images_background/<Alphabet>/<character>/<file>\.png"):
        Omniglot(tmp_path, n_train=5)
    # a PNG at the wrong depth
    bg.write_bytes(good)
    _rezip(bg, lambda m: {**m, "images_background/Alpha/stray.png": b""})
    with pytest.raises(ValueError, match="unexpected member 'images_background/Alpha/stray.png'"):
        Omniglot(tmp_path, n_train=5)
    # a corrupt PNG: named in the error
    bg.write_bytes(good)
    _rezip(bg, lambda m: {**m, "images_background/Alpha/character01/0001_01.png": b"not a png"})
    with pytest.raises(ValueError, match="cannot decode image 'images_background/Alpha/character01/0001_01.png'"):
        Omniglot(tmp_path, n_train=5)
    # a character with a missing drawing
    bg.write_bytes(good)
    _rezip(bg, lambda m: {k: v for k, v in m.items() if k != "images_background/Beta/character02/0005_04.png"})
    with pytest.raises(ValueError, match=r"same number of drawings; found 3 \(e.g. 'images_background/Beta/character02'\)"):
        Omniglot(tmp_path, n_train=5)


def test_malformed_omniglot_folder_errors(tmp_path):
    make_omniglot(tmp_path, zipped=False)
    char = tmp_path / "omniglot" / "images_evaluation" / "Gamma" / "character02"
    for f in os.listdir(char):
        os.remove(char / f)
    with pytest.raises(ValueError, match="character 'images_evaluation/Gamma/character02'.*holds no PNG"):
        Omniglot(tmp_path, n_train=5)
    os.rmdir(char)
    (tmp_path / "omniglot" / "images_evaluation" / "Gamma" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="unexpected PNG .*x.png"):
        Omniglot(tmp_path, n_train=5)
    os.remove(tmp_path / "omniglot" / "images_evaluation" / "Gamma" / "x.png")
    os.makedirs(tmp_path / "omniglot" / "images_evaluation" / "Empty")
    with pytest.raises(ValueError, match="alphabet folder .*Empty.* holds no character folders"):
        Omniglot(tmp_path, n_train=5)


def test_malformed_mini_errors(tmp_path):
    make_mini(tmp_path)
    folder = tmp_path / "miniimagenet"
    val = (folder / "val.csv").read_text()
    os.remove(folder / "val.csv")
    with pytest.raises(FileNotFoundError, match=r"split file .*val\.csv.* does not exist"):
        MiniImageNet(tmp_path)
    (folder / "val.csv").write_text("file,class\n" + val.split("\n", 1)[1])
    with pytest.raises(ValueError, match="must start with the header 'filename,label', got 'file,class'"):
        MiniImageNet(tmp_path)
    (folder / "val.csv").write_text(val + "n02000001onlyone\n")
    with pytest.raises(ValueError, match=r"val\.csv' line 12: expected 'filename,label'"):
        MiniImageNet(tmp_path)
    (folder / "val.csv").write_text(val + "n09999999.jpg,n02000001\n")
    with pytest.raises(FileNotFoundError, match=r"image 'n09999999\.jpg' \(class 'n02000001'.*not found"):
        MiniImageNet(tmp_path)
    (folder / "val.csv").write_text(val.replace("n02000002", "n01000001"))
    with pytest.raises(ValueError, match="class 'n01000001' is in both train.csv and val.csv"):
        MiniImageNet(tmp_path)
    (folder / "val.csv").write_text("\n".join(val.splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"same number of images; found 4 \(e.g. 'n02000002' in val.csv\), 5"):
        MiniImageNet(tmp_path)
    (folder / "val.csv").write_text(val)
    name = "n03000001" + f"{1:08d}.jpg"
    (folder / "images" / name).write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"cannot decode image .*{name}"):
        MiniImageNet(tmp_path, preload=True)
    os.rename(folder / "images", folder / "imgs")
    with pytest.raises(FileNotFoundError, match="image folder .*images.* does not exist"):
        MiniImageNet(tmp_path)


def test_argument_errors(omni, mini, tmp_path):
    om, _ = omni
    ds, _ = mini
    root = om.root
    for kwargs, msg in [
        (dict(n_train=8), r"'n_train' must be less than the number of characters \(8\).*got 8"),
        (dict(n_train=0), "'n_train' must be a positive int, got 0"),
        (dict(n_train=5, n_val=5), r"'n_val' must be less than the number of training characters \(5\), got 5"),
        (dict(n_train=5, rotations=(0, 45)), r"'rotations' must be .* multiples of 90.*got \(0, 45\)"),
        (dict(n_train=5, rotations=(0, 360)), "'rotations' must be a non-empty list of distinct"),
        (dict(n_train=5, rotations=()), "'rotations'"),
        (dict(n_train=5, class_split="lake"), "'class_split' must be 'shuffled' or 'background', got 'lake'"),
        (dict(n_train=5, class_split="background"), "'n_train' must be None with class_split='background'"),
        (dict(n_train=5, image_size=0), "'image_size' must be a positive int, got 0"),
        (dict(n_train=5, resample="cubic"), "'resample' must be one of .*got 'cubic'"),
        (dict(n_train=5, invert=1), "'invert' must be a bool, got 1"),
        (dict(n_train=5, split_seed="1"), "'split_seed' must be an int"),
        (dict(n_train=5, cache_dir=3), "'cache_dir' must be a path"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Omniglot(root, **kwargs)
    with pytest.raises(ValueError, match="'root' must be a path"):
        Omniglot(5)
    for kwargs, msg in [
        (dict(split="val"), r"'split' must be one of \['train', 'test'\], got 'val'"),
        (dict(n_tasks=0), "'n_tasks' must be a positive int, got 0"),
        (dict(ways=21), r"'ways' must be at most the number of classes of split 'train' \(20\), got 21"),
        (dict(ways=True), "'ways' must be a positive int, got True"),
        (dict(shots=0), "'shots' must be a positive int, got 0"),
        (dict(ways=2, shots=2, query_shots=3), r"'shots' \+ 'query_shots' must be at most images_per_class \(4\), got 2 \+ 3"),
        (dict(ways=2, query_shots=-1), "'query_shots' must be an int >= 0, got -1"),
        (dict(ways=2, seed=1, generator=torch.Generator()), "at most one of the arguments 'seed' and 'generator'"),
        (dict(ways=2, seed=1.5), "'seed' must be an int, got 1.5"),
        (dict(ways=2, generator=0), "'generator' must be a CPU torch.Generator, got 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            om.sample(**kwargs)
    with pytest.raises(ValueError, match=r"'index' must be an int in \[0, 12\).*got 12"):
        om.class_images("test", 12)
    with pytest.raises(ValueError, match="'ways' must be a positive int"):
        om.num_tasks("train", 0)
    with pytest.raises(ValueError, match=r"'split' must be one of \['train', 'val', 'test'\], got 'dev'"):
        ds.sample("dev")
    with pytest.raises(ValueError, match="'ways' must be at most the number of classes of split 'val' \\(2\\), got 5"):
        ds.sample("val")  # default 5-way
    with pytest.raises(ValueError, match="'preload' must be a bool"):
        MiniImageNet(ds.root, preload="yes")


# ------------------------------------------------------------------------------------------------
# confidence interval


def test_confidence_interval():
    acc = [0.5, 0.7, 0.9, 0.7]
    mean, half = confidence_interval(acc)
    assert mean == pytest.approx(0.7)
    assert half == pytest.approx(1.96 * np.std(acc) / 2)
    m2, h2 = confidence_interval(torch.tensor(acc))
    assert (m2, h2) == pytest.approx((mean, half))
    assert confidence_interval(np.array(acc), z=1.0)[1] == pytest.approx(np.std(acc) / 2)
    assert confidence_interval([0.8]) == (0.8, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        confidence_interval([])
    with pytest.raises(ValueError, match="must be finite"):
        confidence_interval([0.5, float("nan")])
    with pytest.raises(ValueError, match="sequence of numbers"):
        confidence_interval(["a"])
    with pytest.raises(ValueError, match="'z' must be a positive finite number"):
        confidence_interval(acc, z=0)


# ------------------------------------------------------------------------------------------------
# the real Omniglot (optional; $AMAML_DATA_ROOT/omniglot/images_{background,evaluation}.zip)

_REAL = os.environ.get("AMAML_DATA_ROOT")
_HAS_REAL_OMNIGLOT = bool(_REAL) and all(
    os.path.isfile(os.path.join(_REAL, "omniglot", f"{s}.zip")) for s in ("images_background", "images_evaluation"))


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_REAL_OMNIGLOT, reason="AMAML_DATA_ROOT does not hold omniglot/images_background.zip "
                                                   "and omniglot/images_evaluation.zip")
def test_real_omniglot(tmp_path):
    om = Omniglot(cache_dir=tmp_path)  # root from $AMAML_DATA_ROOT; decodes all 32,460 PNGs (~10 s)
    assert om.sources == {"images_background": "zip", "images_evaluation": "zip"}
    assert om.num_characters == 1623 and om.images_per_class == 20
    assert om.source_characters == {"images_background": 964, "images_evaluation": 659}
    assert len({c.split("/")[1] for c in om.characters}) == 50  # alphabets
    assert om.characters[0] == "images_background/Alphabet_of_the_Magi/character01"
    assert om.raw_images.shape == (1623, 20, 28, 28)
    assert om.num_classes == 6492
    assert om.split_characters == {"train": 1200, "test": 423}
    assert om.split_classes == {"train": 4800, "test": 1692}
    # inverted: sparse strokes near 1 on a background of 0
    x = om.class_images("test", 0)
    assert 0.02 < x.mean() < 0.3 and x.max() > 0.9 and x.min() == 0
    assert torch.equal(om.class_images("test", 1), torch.rot90(x, 1, dims=(-2, -1)))
    b = om.sample("train", 16, ways=20, shots=1, query_shots=1, seed=0)
    assert b.support[0].shape == (16, 20, 1, 28, 28) and b.query[0].shape == (16, 20, 1, 28, 28)
    assert torch.equal(b.support[1], torch.arange(20).expand(16, 20))
    # the background/evaluation split, read from the cache written above
    bg = Omniglot(class_split="background", cache_dir=tmp_path)
    assert bg.cache_file == om.cache_file and os.path.isfile(bg.cache_file)
    assert torch.equal(bg.raw_images, om.raw_images)
    assert bg.split_characters == {"train": 964, "test": 659}
