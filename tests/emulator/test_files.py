"""files.* through the real e2b SDK against the emulator's /files and filesystem service."""

from __future__ import annotations

import io
import os
from typing import Any

import pytest

ALL_BYTES = bytes(range(256)) * 3


def test_write_and_read_bytes_exactly(sbx: Any) -> None:
    info = sbx.files.write("data/blob.bin", ALL_BYTES)
    assert (info.name, info.path) == ("blob.bin", "/home/user/data/blob.bin")
    assert bytes(sbx.files.read("/home/user/data/blob.bin", format="bytes")) == ALL_BYTES
    # The process side sees the same file.
    assert sbx.commands.run("wc -c < data/blob.bin").stdout.strip() == str(len(ALL_BYTES))


def test_text_roundtrip_and_overwrite(sbx: Any) -> None:
    sbx.files.write("note.txt", "one ✓")
    sbx.files.write("note.txt", "two")
    assert sbx.files.read("note.txt") == "two"


def test_octet_stream_and_gzip_uploads(sbx: Any) -> None:
    sbx.files.write("stream.bin", io.BytesIO(ALL_BYTES))  # file-like: octet-stream
    sbx.files.write("gz.bin", ALL_BYTES, gzip=True)  # octet-stream + Content-Encoding: gzip
    assert bytes(sbx.files.read("stream.bin", format="bytes")) == ALL_BYTES
    assert bytes(sbx.files.read("gz.bin", format="bytes")) == ALL_BYTES


def test_write_files_in_one_multipart_request(sbx: Any, emulator: Any) -> None:
    before = emulator.calls["files.write"]
    infos = sbx.files.write_files(
        [{"path": "m/a.txt", "data": "A"}, {"path": "/home/user/m/b.txt", "data": b"B"}]
    )
    assert emulator.calls["files.write"] == before + 1
    assert [info.path for info in infos] == ["/home/user/m/a.txt", "/home/user/m/b.txt"]
    assert sbx.commands.run("cat m/a.txt m/b.txt").stdout == "AB"


def test_missing_file_raises_file_not_found(sbx: Any) -> None:
    from e2b import FileNotFoundException

    with pytest.raises(FileNotFoundException):
        sbx.files.read("nope.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info("nope.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.list("no-such-dir")


def test_exists_get_info_and_list(sbx: Any) -> None:
    sbx.commands.run(
        "mkdir -p tree/inner && printf 12345 > tree/f.txt && touch tree/inner/g "
        "&& ln -s f.txt tree/link && chmod 640 tree/f.txt"
    )
    assert sbx.files.exists("tree/f.txt") is True
    assert sbx.files.exists("tree/missing") is False
    info = sbx.files.get_info("tree/f.txt")
    assert (info.name, info.path, info.size) == ("f.txt", "/home/user/tree/f.txt", 5)
    assert info.type.value == "file"
    assert info.mode == 0o640 and info.permissions == "-rw-r-----"
    assert info.owner and info.group
    assert info.modified_time.year >= 2024
    link = sbx.files.get_info("tree/link")
    # envd reports the resolved absolute target; SDK 2.63 types the link itself a symlink.
    assert (link.type.value, link.symlink_target) == ("symlink", "/home/user/tree/f.txt")
    assert (info.owner, info.group) == ("user", "user")

    shallow = {entry.path for entry in sbx.files.list("tree")}
    assert shallow == {"/home/user/tree/f.txt", "/home/user/tree/inner", "/home/user/tree/link"}
    deep = {entry.path for entry in sbx.files.list("tree", depth=2)}
    assert deep == shallow | {"/home/user/tree/inner/g"}
    kinds = {entry.name: entry.type.value for entry in sbx.files.list("tree")}
    assert kinds == {"f.txt": "file", "inner": "dir", "link": "symlink"}


def test_make_dir_returns_false_when_it_exists(sbx: Any) -> None:
    assert sbx.files.make_dir("made/deep/er") is True
    assert sbx.files.make_dir("made/deep/er") is False
    assert sbx.files.get_info("made/deep").type.value == "dir"


def test_rename_and_remove(sbx: Any) -> None:
    sbx.files.write("old.txt", "x")
    moved = sbx.files.rename("old.txt", "new/place.txt")
    assert moved.path == "/home/user/new/place.txt"
    assert sbx.files.exists("old.txt") is False
    assert sbx.files.read("new/place.txt") == "x"
    sbx.files.remove("new")
    assert sbx.files.exists("new") is False
    # envd removes with os.RemoveAll: removing a missing path is not an error.
    sbx.files.remove("new")


def test_paths_cannot_escape_the_sandbox(sbx: Any) -> None:
    from e2b import SandboxException

    sbx.commands.run("ln -s /etc escape")
    # As on E2B the sandbox's own system files can be read (with bubblewrap the files API sees
    # what commands see); without isolation it stays confined to work_dir. Nothing is written.
    try:
        seen: str | None = sbx.files.read("escape/passwd")
    except SandboxException:
        seen = None
    if seen is not None:
        assert seen == sbx.commands.run("cat /etc/passwd").stdout
    with pytest.raises(SandboxException):
        sbx.files.write("escape/evil", "x")
    assert not os.path.exists("/etc/evil")


def test_signed_download_url_works_without_headers(sbx: Any) -> None:
    import httpx

    sbx.files.write("signed.txt", "via url")
    url = sbx.download_url("/home/user/signed.txt", use_signature_expiration=60)
    assert httpx.get(url).content == b"via url"
    forged = url.replace("signature=v1_", "signature=v1_x")
    assert httpx.get(forged).status_code == 401
