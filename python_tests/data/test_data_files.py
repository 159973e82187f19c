"""Damaged data files (issue 23, item 17): a corrupt or truncated zip member, bytes that are not
UTF-8, an image that does not decode, a file with the wrong columns. Each raises DataFileError
(a ValueError) naming the file, the member and what is wrong, and the command shows it without a
traceback (exit status 2). The fixtures are the small files of test_ratings.py, test_images.py and
helpers.py, damaged here."""

import os
import struct
import zipfile

import pytest

from amaml_ext.cli import main
from amaml_ext.data import DataFileError
from amaml_ext.data.images import MiniImageNet, Omniglot
from amaml_ext.data.ratings import Jester, MovieLens1M, MovieLens100K

from helpers import make_omniglot
from test_images import make_mini
from test_ratings import _write_jester_csv, _write_jester_zip, _write_ml1m, _write_ml100k

DAMAGE = ["deflate", "crc", "header", "truncated"]


def damage(path, member, how):
    """Damage the zip ``path``: ``deflate`` garbles ``member``'s compressed stream (zlib.error),
    ``crc`` flips one byte of it stored uncompressed (only the CRC sees it), ``header`` breaks its
    local header, ``truncated`` cuts the archive in half (its central directory is lost)."""
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        return
    if how == "crc":
        with zipfile.ZipFile(path) as z:
            members = [(info, z.read(info)) for info in z.infolist()]
        with zipfile.ZipFile(path, "w") as z:
            for info, data in members:
                info.compress_type = zipfile.ZIP_STORED
                z.writestr(info, data)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    start = info.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[start + 26:start + 30])
    data = start + 30 + name_len + extra_len
    if how == "header":
        raw[start:start + 4] = b"XXXX"
    elif how == "crc":
        raw[data + info.compress_size // 2] ^= 0xFF
    else:
        for k in range(data + 2, data + min(info.compress_size, 40)):
            raw[k] ^= 0x5A
    path.write_bytes(bytes(raw))


def expected(how, zip_name, member):
    """The message of a damaged archive: a named member, or the archive itself."""
    if how == "truncated":
        return rf"{zip_name}' is not a (valid|readable) zip file \(File is not a zip file\)"
    kind = {"deflate": r"(zlib\.error|zipfile\.BadZipFile)", "crc": r"zipfile\.BadZipFile: Bad CRC-32",
            "header": r"zipfile\.BadZipFile: Bad magic number"}[how]
    return rf"{zip_name}': member '{member}' is damaged and cannot be read \({kind}"


def test_data_file_error_is_a_value_error():
    assert issubclass(DataFileError, ValueError)


# ------------------------------------------------------------------------------------------------
# ratings


@pytest.mark.parametrize("how", DAMAGE)
def test_jester_zip_with_a_damaged_member(tmp_path, how):
    damage(_write_jester_zip(tmp_path), "jester-data-1.csv", how)
    with pytest.raises(DataFileError, match=expected(how, "jester-data-1.zip", "jester-data-1.csv")) as e:
        Jester(tmp_path, num_test=4)
    assert "99 = not rated" in str(e.value)


def test_rating_files_with_bytes_that_are_not_utf8(tmp_path):
    path = _write_ml100k(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[5] = lines[5].replace(b"\t", b"\t\xff", 1)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFileError, match=r"u\.data' is not UTF-8 text: byte b'\\xff' at line 6 \(invalid start "
                                            r"byte\); expected the movielens-100k ratings file"):
        MovieLens100K(tmp_path)
    path = _write_ml1m(tmp_path)
    path.write_bytes(path.read_bytes().replace(b"::", b"::\xe9", 1))
    with pytest.raises(DataFileError, match=r"ratings\.dat' is not UTF-8 text: byte b'\\xe9' at line 1"):
        MovieLens1M(tmp_path)
    path = _write_jester_csv(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"\x80" + lines[2]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFileError, match=r"jester-data-1\.csv' is not UTF-8 text: byte b'\\x80' at line 3"):
        Jester(tmp_path, num_test=4)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace(b"\t", b",", 40), r"is malformed: .*Expected 1 fields in line 14, saw 3"),
    (lambda t: t.replace(b"\t", b"  "), r"has 1 column\(s\), not 4"),
    (lambda t: b"\n".join(line + b"\t7" for line in t.split(b"\n") if line), r"has 5 column\(s\), not 4"),
])
def test_u_data_with_the_wrong_columns(tmp_path, edit, match):
    path = _write_ml100k(tmp_path)
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(DataFileError, match=match) as e:
        MovieLens100K(tmp_path)
    assert "u.data" in str(e.value) and "tab-separated user id, item id, rating" in str(e.value)


def test_a_folder_where_u_data_should_be(tmp_path):
    os.makedirs(tmp_path / "ml-100k" / "u.data")
    with pytest.raises(DataFileError, match=r"u\.data' is a folder, not a file; expected the movielens-100k"):
        MovieLens100K(tmp_path)


# ------------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("how", DAMAGE)
def test_omniglot_zip_with_a_damaged_member(tmp_path, how):
    make_omniglot(tmp_path)
    member = "images_background/Beta/character02/0005_03.png"
    damage(tmp_path / "omniglot" / "images_background.zip", member, how)
    with pytest.raises(DataFileError, match=expected(how, "images_background.zip", member)):
        Omniglot(tmp_path, n_train=5)


@pytest.mark.parametrize("zipped", [True, False])
def test_omniglot_png_that_does_not_decode(tmp_path, zipped):
    make_omniglot(tmp_path, zipped=zipped)
    member = "images_evaluation/Gamma/character03/0008_02.png"
    if zipped:
        path = tmp_path / "omniglot" / "images_evaluation.zip"
        with zipfile.ZipFile(path) as z:
            members = {i.filename: z.read(i) for i in z.infolist()}
        members[member] = members[member][:40]           # a valid PNG signature, then nothing
        with zipfile.ZipFile(path, "w") as z:
            for k, v in members.items():
                z.writestr(k, v)
        where = rf"'{member}' in '.*images_evaluation\.zip'"
    else:
        path = tmp_path / "omniglot" / member
        path.write_bytes(path.read_bytes()[:40])
        where = rf"'.*{member}'"
    with pytest.raises(DataFileError, match=rf"cannot decode image {where}: "):
        Omniglot(tmp_path, n_train=5)


def test_mini_imagenet_split_csv_that_is_not_utf8(tmp_path):
    make_mini(tmp_path)
    path = tmp_path / "miniimagenet" / "val.csv"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"n02", b"n\xe9", 1)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFileError, match=r"val\.csv' is not UTF-8 text: byte b'\\xe9' at line 3 \(invalid "
                                            r"continuation byte\); expected the Ravi & Larochelle CSV"):
        MiniImageNet(tmp_path)
    # a byte-order mark is still accepted
    make_mini(tmp_path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert MiniImageNet(tmp_path).split_classes["val"] == 2


def test_mini_imagenet_jpeg_that_does_not_decode(tmp_path):
    make_mini(tmp_path)
    name = "n03000002" + f"{3:08d}.jpg"
    path = tmp_path / "miniimagenet" / "images" / name
    path.write_bytes(path.read_bytes()[:300])       # a truncated JPEG
    ds = MiniImageNet(tmp_path)
    ds.load("train")                               # the other splits decode
    with pytest.raises(DataFileError, match=rf"cannot decode image '.*{name}': OSError"):
        ds.load("test")


# ------------------------------------------------------------------------------------------------
# the command: the message, no traceback


def _command_error(argv, capsys):
    """``amaml-ext argv``'s message: one line on stderr (no traceback) and exit status 2."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, (e.value.code, err)
    assert str(e.value) in err
    return str(e.value)


def test_command_reports_damaged_data_files(tmp_path, capsys):
    run = ["--method", "maml", "--meta-steps", "1", "--quiet"]
    root = tmp_path / "data"
    damage(_write_jester_zip(root), "jester-data-1.csv", "deflate")
    msg = _command_error(["train", "--task", "jester", "--data-root", str(root), "--out", str(tmp_path / "j")] + run,
                         capsys)
    assert msg.startswith("amaml-ext: --task jester: ") and "member 'jester-data-1.csv' is damaged" in msg, msg

    make_omniglot(root)
    member = "images_background/Alpha/character01/0001_01.png"
    damage(root / "omniglot" / "images_background.zip", member, "crc")
    msg = _command_error(["train", "--task", "omniglot", "--data-root", str(root), "--out", str(tmp_path / "o")] + run,
                         capsys)
    assert msg.startswith("amaml-ext: --task omniglot: ") and f"member '{member}' is damaged" in msg, msg

    make_mini(root)
    csv = root / "miniimagenet" / "test.csv"
    csv.write_bytes(csv.read_bytes().replace(b"n03", b"n\xff", 1))
    msg = _command_error(["train", "--task", "miniimagenet", "--data-root", str(root), "--out", str(tmp_path / "m")]
                         + run, capsys)
    assert msg.startswith("amaml-ext: --task miniimagenet: ") and "test.csv' is not UTF-8 text" in msg, msg


def test_ids_past_2_to_the_53_are_refused(tmp_path):
    """A float id past 2^53 is not exact and wrapped to a negative int64 (second trial)."""
    path = _write_ml100k(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"\t".join([b"100000000000000000000"] + lines[2].split(b"\t")[1:])
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFileError, match=r"user id 1e\+20 in row 3, column 1 is not a positive integer up to 2\^53"):
        MovieLens100K(tmp_path)
