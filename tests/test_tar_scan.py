"""TarScan (os.pread over 512-byte blocks) against the tarfile scan it replaced, on clean tars of every format
and on every kind of damage: the same members, or a ShardError from both."""

from __future__ import annotations

import io
import random
import tarfile

import pytest

from neuclip.data import tar_reference
from neuclip.data.index import build_index
from neuclip.data.shards import ShardError, TarScan, scan_members, write_tar


def _outcome(scan, path):
    try:
        return list(scan(path))
    except ShardError:
        return "ShardError"


def _index(path, scanner):
    try:
        index = build_index(path, scanner)
    except ShardError:
        return "ShardError"
    arrays = [getattr(index, k).tolist() for k in ("keys", "ids", "image", "image_ext", "text")]
    return arrays, index.problems


def _same(path):
    """The same members and the same index (problems included) as the tarfile scan, or a ShardError from both."""
    ours, reference = _outcome(scan_members, path), _outcome(tar_reference.scan_members, path)
    assert ours == reference, path
    assert _index(path, TarScan) == _index(path, tar_reference.TarfileScan), path
    return ours


def _tar(path, fmt, members):
    """A tar in `fmt` holding `members`: (name, bytes) for files, (name, "dir"/"symlink") for the others."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif data == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _members(n=6, long=False):
    out = [("folder", "dir"), ("README", b"no extension: ignored")]
    for i in range(n):
        key = f"{'deep/' * 30 if long and i % 2 else ''}{i:09d}"
        out += [(f"{key}.jpg", bytes([i]) * (700 + 300 * i)), (f"{key}.txt", f"caption {i}".encode()),
                (f"{key}.json", b'{"key": "%09d"}' % i)]
    out += [("link.jpg", "symlink"), ("ünïcode.txt", "naïve".encode())]
    return out


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_tars_of_every_format_give_the_same_members(tmp_path, fmt):
    long = fmt != "ustar"  # GNU long names ('L' members) and pax path records; ustar splits into its prefix
    members = _members(long=long) if long else _members() + [("p/" * 60 + "000000077.txt", b"ustar prefix")]
    path = _tar(tmp_path / f"{fmt}.tar", FORMATS[fmt], members)
    found = _same(path)
    assert len(found) == 3 * 6 + 1 + (0 if long else 1)
    assert any(key.startswith("deep/") for key, *_ in found) == long


def test_pax_global_header_and_size_records(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as tf:
        for i in range(3):
            info = tarfile.TarInfo(f"{i:09d}.txt")
            info.pax_headers = {"path": f"renamed{i}.txt"}
            info.size = 5
            tf.addfile(info, io.BytesIO(b"hello"))
    assert [m[0] for m in _same(path)] == ["renamed0", "renamed1", "renamed2"]


def _damaged(tmp_path, data: bytes, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_truncation_and_header_byte_flip_gets_the_same_verdict(tmp_path, fmt):
    clean = _tar(tmp_path / "clean.tar", FORMATS[fmt], _members(long=fmt != "ustar")).read_bytes()
    cuts = list(range(0, len(clean), 97)) + [len(clean) - k for k in (1, 511, 512, 513, 1024, 1025)]
    marker_end = -(-len(clean.rstrip(b"\0")) // 512) * 512 + 1024  # tarfile pads with zeros beyond it
    for cut in cuts:
        verdict = _same(_damaged(tmp_path, clean[:cut], "cut.tar"))
        assert (verdict == "ShardError") == (cut < marker_end), cut  # a cut before it loses a member or the marker
    rng = random.Random(0)
    headers = [i for i in range(0, len(clean), 512) if clean[i + 257 : i + 262] == b"ustar"]
    for _ in range(200):  # one byte changed in a header (where a change can alter the verdict)
        at = rng.choice(headers) + rng.randrange(512)
        data = bytearray(clean)
        data[at] = rng.choice([0, 32, 48, 55, 128, 255, data[at] ^ 1])
        _same(_damaged(tmp_path, bytes(data), "flip.tar"))


def test_odd_files(tmp_path):
    cases = {"empty": b"", "short": b"x" * 100, "not-a-tar": b"this is not a tar" * 100, "zeros": b"\0" * 1024,
             "one-zero-block": b"\0" * 512, "zeros-then-junk": b"\0" * 512 + b"junk" * 128}
    for name, data in cases.items():
        _same(_damaged(tmp_path, data, f"{name}.tar"))
    with pytest.raises(ShardError, match="file not found"):
        list(scan_members(tmp_path / "absent.tar"))


def test_a_zero_block_in_the_middle_ends_the_tar_early(tmp_path):
    clean = write_tar(tmp_path / "a.tar", [(f"{i:09d}", {"txt": b"x" * 600, "json": b"{}"}) for i in range(4)])
    assert clean == 4
    data = (tmp_path / "a.tar").read_bytes()
    _same(_damaged(tmp_path, data[:2048] + b"\0" * 512 + data[2048:], "mid-zero.tar"))


def test_large_members_beyond_the_read_window(tmp_path):
    big = bytes(range(256)) * 1024  # 256 KiB: larger than one pread window
    write_tar(tmp_path / "big.tar", [(f"{i:09d}", {"jpg": big, "txt": b"a big one", "json": b'{"key": %d}' % i})
                                     for i in range(3)])
    assert len(_same(tmp_path / "big.tar")) == 9
    index = build_index(tmp_path / "big.tar")
    assert index.ids.tolist() == [0, 1, 2] and not index.problems
