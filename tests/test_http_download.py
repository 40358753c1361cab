"""avg.datasets.http against a local HTTP server that can drop connections and ignore Range."""
from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from avg.datasets import http
from avg.errors import UserError

BLOB = bytes(range(256)) * 40  # 10,240 bytes, every offset distinguishable mod 256


class FlakyServer:
    """Serves ``files`` ({url path: bytes}); records each request's headers.

    ``drops``: how many of the next requests are cut after ``drop_after`` body bytes.
    ``ignore_range``: answer 200 with the whole body even when asked for a range.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[dict] = []
        self.drops = 0
        self.drop_after = 3000
        self.ignore_range = False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start, asked = 0, self.headers.get("Range")
                if asked and not owner.ignore_range:
                    start = int(re.match(r"bytes=(\d+)-", asked).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if owner.drops > 0:
                    owner.drops -= 1
                    self.wfile.write(payload[: owner.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FlakyServer({"/blob.bin": BLOB}) as srv:
        yield srv


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    server.drops = 1
    dest = tmp_path / "blob.bin"
    got = http.fetch(f"{server.url}/blob.bin", dest, sha256=sha(BLOB), chunk=1024, retries=2, backoff=0,
                     progress=False)
    assert dest.read_bytes() == BLOB
    assert not dest.with_name("blob.bin.part").exists()
    assert len(server.requests) == 2
    assert "range" not in server.requests[0]
    offset = int(re.match(r"bytes=(\d+)-$", server.requests[1]["range"]).group(1))
    assert 0 < offset <= server.drop_after
    assert got.resumed and got.verified and got.sha256 == sha(BLOB)


def test_partial_file_survives_a_failed_run_and_the_next_run_resumes(server, tmp_path):
    server.drops = 1
    dest = tmp_path / "blob.bin"
    part = tmp_path / "blob.bin.part"
    with pytest.raises(http.DownloadError, match="resume") as err:
        http.fetch(f"{server.url}/blob.bin", dest, chunk=1024, retries=0, progress=False)
    assert f"{server.url}/blob.bin" in str(err.value)
    kept = part.stat().st_size
    assert 0 < kept < len(BLOB) and not dest.exists()
    assert part.read_bytes() == BLOB[:kept]

    http.fetch(f"{server.url}/blob.bin", dest, sha256=sha(BLOB), chunk=1024, progress=False)
    assert server.requests[-1]["range"] == f"bytes={kept}-"
    assert dest.read_bytes() == BLOB and not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(b"\xff" * 1500)  # a stale part that must not be kept
    got = http.fetch(f"{server.url}/blob.bin", dest, sha256=sha(BLOB), chunk=1024, progress=False)
    assert server.requests[0]["range"] == "bytes=1500-"
    assert dest.read_bytes() == BLOB
    assert not got.resumed and got.bytes_downloaded == len(BLOB)


def test_dropped_transfer_on_range_ignoring_server_still_completes(server, tmp_path):
    server.ignore_range, server.drops = True, 1
    dest = tmp_path / "blob.bin"
    http.fetch(f"{server.url}/blob.bin", dest, sha256=sha(BLOB), chunk=1024, retries=1, backoff=0,
                  progress=False)
    assert dest.read_bytes() == BLOB


def test_complete_part_is_finished_without_refetching(server, tmp_path):
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(BLOB)  # killed between the last byte and the rename
    http.fetch(f"{server.url}/blob.bin", dest, sha256=sha(BLOB), progress=False)
    assert dest.read_bytes() == BLOB


def test_checksum_mismatch_deletes_the_download_and_names_the_key(server, tmp_path):
    dest = tmp_path / "blob.bin"
    url = f"{server.url}/blob.bin"
    wrong = "0" * 64
    with pytest.raises(http.ChecksumError) as err:
        http.fetch(url, dest, sha256=wrong, progress=False, key="data.coco.images_url[1]")
    msg = str(err.value)
    assert url in msg and wrong in msg and sha(BLOB) in msg and "data.coco.images_sha256[1]" in msg
    assert not dest.exists() and not (tmp_path / "blob.bin.part").exists()

    with pytest.raises(http.ChecksumError, match="data.flickr30k.annotations_md5"):
        http.fetch(url, dest, md5="f" * 32, progress=False, key="data.flickr30k.annotations_url")


def test_existing_file_is_used_without_a_request_and_checked(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(BLOB)
    got = http.fetch(f"{server.url}/blob.bin", dest, md5=hashlib.md5(BLOB).hexdigest(), progress=False)
    assert got.cached and got.verified and got.bytes_downloaded == 0 and got.sha256 == sha(BLOB)
    assert server.requests == []
    # a hand-placed file that does not match is kept (it may be the user's only copy) but refused
    with pytest.raises(http.ChecksumError, match="Delete"):
        http.fetch(f"{server.url}/blob.bin", dest, sha256="1" * 64, progress=False)
    assert dest.read_bytes() == BLOB


def test_hash_cache_follows_file_changes(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"one")
    assert http.file_hashes(path)["sha256"] == sha(b"one")
    path.write_bytes(b"two!")  # different size: the remembered hash must not be reused
    assert http.file_hashes(path)["sha256"] == sha(b"two!")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_source_fails_fast_with_advice(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/caption_datasets.zip"
    dest = tmp_path / "caption_datasets.zip"
    start = time.monotonic()
    with pytest.raises(http.SourceUnavailableError) as err:
        http.fetch(url, dest, retries=3, timeout=5, progress=False, key="data.coco.annotations_url")
    assert time.monotonic() - start < 3  # refused connections are not retried
    msg = str(err.value)
    assert url in msg and "offline" in msg and str(dest) in msg and "data.coco.annotations_url" in msg
    assert "refused" in msg.lower()
    assert isinstance(err.value, UserError)


def test_http_error_status_is_reported(server, tmp_path):
    with pytest.raises(http.SourceUnavailableError, match="HTTP 404"):
        http.fetch(f"{server.url}/missing.zip", tmp_path / "missing.zip", progress=False)


def test_local_path_and_file_url_are_copied(tmp_path):
    src = tmp_path / "src" / "archive.zip"
    src.parent.mkdir()
    src.write_bytes(BLOB)
    for i, url in enumerate([str(src), src.as_uri()]):
        dest = tmp_path / f"cache{i}" / "archive.zip"
        got = http.fetch(url, dest, sha256=sha(BLOB), progress=False)
        assert dest.read_bytes() == BLOB and got.bytes_downloaded == len(BLOB)
    with pytest.raises(http.SourceUnavailableError, match="does not exist"):
        http.fetch(str(tmp_path / "nope.zip"), tmp_path / "c" / "nope.zip", progress=False)


# --- extraction -------------------------------------------------------------------------------------

def make_zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: dict[str, bytes], mode="w:gz", links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar"])
def test_extract_with_select(tmp_path, kind):
    members = {"top/a.jpg": b"A" * 100, "top/sub/b.jpg": b"B" * 50, "top/notes.txt": b"skip me"}
    data = make_zip(members) if kind == "zip" else make_tar(members, "w:gz" if kind == "tar.gz" else "w")
    archive = tmp_path / f"x.{kind}"
    archive.write_bytes(data)
    out = tmp_path / "out"
    written = http.extract(archive, out, lambda n: n.rsplit("/", 1)[-1] if n.endswith(".jpg") else None)
    assert sorted(written) == ["a.jpg", "b.jpg"]
    assert (out / "a.jpg").read_bytes() == b"A" * 100 and (out / "b.jpg").read_bytes() == b"B" * 50
    assert not (out / "notes.txt").exists()


def test_truncated_zip_is_rejected_with_delete_advice(tmp_path):
    data = make_zip({f"d/{i}.jpg": bytes([i]) * 2000 for i in range(5)})
    archive = tmp_path / "flickr30k-images.zip"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(http.ArchiveError) as err:
        http.extract(archive, tmp_path / "out")
    assert str(archive) in str(err.value) and "Delete it" in str(err.value)


def test_crc_error_in_zip_is_rejected(tmp_path):
    payload = b"0123456789" * 100
    data = bytearray(make_zip({"d/a.jpg": payload}, zipfile.ZIP_STORED))
    at = data.find(payload)
    data[at + 10] ^= 0xFF  # flip a byte of the stored data; the directory stays valid
    archive = tmp_path / "a.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(http.ArchiveError, match="CRC"):
        http.extract(archive, tmp_path / "out")


def test_truncated_tar_gz_is_rejected(tmp_path):
    import os

    data = make_tar({f"d/{i}.jpg": os.urandom(5000) for i in range(4)})
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(http.ArchiveError, match="corrupt or truncated"):
        http.extract(archive, tmp_path / "out")


def test_not_an_archive(tmp_path):
    archive = tmp_path / "images.zip"
    archive.write_bytes(b"<html>login page</html>")
    with pytest.raises(http.ArchiveError, match="corrupt or truncated"):
        http.extract(archive, tmp_path / "out")


@pytest.mark.parametrize("member", ["../evil.jpg", "ok/../../evil.jpg", "/tmp/evil.jpg"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_path_traversal_members_are_refused(tmp_path, member, kind):
    members = {"good.jpg": b"fine", member: b"evil"}
    archive = tmp_path / "box" / f"bad.{kind}"
    archive.parent.mkdir()
    archive.write_bytes(make_zip(members) if kind == "zip" else make_tar(members))
    out = tmp_path / "box" / "out"
    with pytest.raises(http.UnsafeArchiveError, match="outside"):
        http.extract(archive, out)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "box" / "evil.jpg").exists()
    if kind == "zip":  # refused before anything is written (a streamed tar may have written earlier members;
        assert not (out / "good.jpg").exists()  # the dataset sources extract into a temp folder for that)


def test_tar_symlink_out_of_the_folder_is_refused(tmp_path):
    archive = tmp_path / "links.tar"
    archive.write_bytes(make_tar({"a.jpg": b"x"}, "w", links={"d/link.jpg": "../../etc/passwd"}))
    with pytest.raises(http.UnsafeArchiveError):
        http.extract(archive, tmp_path / "out")
    inside = tmp_path / "inside.tar"  # a link that stays inside is skipped, not an error
    inside.write_bytes(make_tar({"d/a.jpg": b"x"}, "w", links={"d/b.jpg": "a.jpg"}))
    assert http.extract(inside, tmp_path / "out2") == ["d/a.jpg"]


def test_select_cannot_escape_either(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"a.jpg": b"x"}))
    with pytest.raises(http.UnsafeArchiveError):
        http.extract(archive, tmp_path / "out", lambda n: "../" + n)
