"""Fetch and unpack dataset archives: resumable HTTP, checksums, safe extraction.

Archives are large (COCO's train2014.zip is 13 GB) and connections drop, so a transfer writes to
``<dest>.part`` and a later call continues it with an HTTP Range request; a server that ignores Range
(answers 200, not 206) makes us start the part over rather than append a second copy. The finished file
is checked against the pinned hash, then renamed onto ``dest`` so a file at ``dest`` is always whole.

A file already at ``dest`` is used as is (after the checksum, when one is pinned): that is how a user on
an offline machine supplies an archive fetched elsewhere. ``file://`` URLs and plain paths are copied.

Every failure a user can fix raises a :class:`avg.errors.UserError` subclass whose message names the
URL, what happened and what to do.
"""
from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import posixpath
import re
import shutil
import socket
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from avg.errors import UserError

logger = logging.getLogger(__name__)


class DownloadError(UserError):
    """A transfer failed (interrupted past the retries, bad server answer)."""


class SourceUnavailableError(DownloadError):
    """The URL could not be reached or answered with an HTTP error."""


class ChecksumError(DownloadError):
    """The file does not match its pinned hash."""


class ArchiveError(UserError):
    """An archive is corrupt, truncated or of an unknown format."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would land outside the output folder."""


@dataclass
class Fetched:
    """What :func:`fetch` did; goes into the download step's stats."""

    url: str
    path: str
    size: int
    sha256: str
    md5: str
    verified: bool  # a pinned hash was checked
    cached: bool  # the file was already there; nothing transferred
    resumed: bool  # continued a partial transfer
    bytes_downloaded: int

    def as_dict(self) -> dict:
        return asdict(self)


def fetch(url: str, dest: Path, sha256: str | None = None, md5: str | None = None, chunk: int = 1 << 20,
          timeout: float = 60, retries: int = 3, *, key: str | None = None, backoff: float = 1.0,
          progress: bool = True) -> Fetched:
    """Make ``dest`` hold the file at ``url``, verified, and say what that took.

    ``key`` is the params key the URL came from (e.g. ``data.coco.images_url``); error messages name it
    and its ``_sha256``/``_md5`` siblings so the user knows what to edit. ``retries`` counts further
    attempts after a dropped or timed-out transfer (each resumes where the last stopped), ``backoff``
    the seconds before the first of them (doubling). A refused connection or failed DNS lookup is not
    retried: it will not heal in seconds, and the user should hear at once.
    """
    dest = Path(dest)
    sha256 = _norm_hash(sha256, 64, "sha256", key)
    md5 = _norm_hash(md5, 32, "md5", key)
    if dest.exists():
        hashes = file_hashes(dest)
        _verify(dest, hashes, sha256, md5, url, key, downloaded=False)
        logger.info("using %s (already there%s)", dest, ", checksum ok" if sha256 or md5 else "")
        return Fetched(url, str(dest), dest.stat().st_size, hashes["sha256"], hashes["md5"],
                       bool(sha256 or md5), cached=True, resumed=False, bytes_downloaded=0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    source = local_source(url)
    if source is not None:
        got, resumed = _copy_local(source, part, chunk, key, progress), False
    else:
        got, resumed = _http_to_part(url, part, chunk, timeout, retries, backoff, key, progress)
    hashes = _hash_file(part)
    try:
        _verify(part, hashes, sha256, md5, url, key, downloaded=True)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    _write_hash_cache(dest, hashes)
    return Fetched(url, str(dest), dest.stat().st_size, hashes["sha256"], hashes["md5"], bool(sha256 or md5),
                   cached=False, resumed=resumed, bytes_downloaded=got)


def local_source(url: str) -> Path | None:
    """The local file a ``file://`` URL or plain path names; None for http(s)."""
    parsed = urlparse(str(url))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise DownloadError(f"unsupported URL scheme {parsed.scheme!r} in {url}: use http(s)://, file:// "
                            "or a local path")
    return Path(str(url)).expanduser()


def archive_name(url: str) -> str:
    """The file name a URL or path ends in (what the cached copy is called)."""
    name = PurePosixPath(unquote(urlparse(str(url)).path)).name
    if not name:
        raise DownloadError(f"cannot tell a file name from {url!r}: the URL must end in the archive's name")
    return name


# --- HTTP -------------------------------------------------------------------------------------------

def _http_to_part(url: str, part: Path, chunk: int, timeout: float, retries: int, backoff: float,
                  key: str | None, progress: bool) -> tuple[int, bool]:
    """Transfer ``url`` into ``part``, resuming it; returns (bytes transferred now, resumed?)."""
    transferred, resumed, attempt = 0, False, 0
    with requests.Session() as session:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            try:
                got, done, continued = _one_request(session, url, part, offset, chunk, timeout, progress, key)
                transferred += got
                resumed = resumed or continued
                if done:
                    return transferred, resumed
                problem = "the server closed the connection early"
            except _Transient as exc:
                problem = str(exc)
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise DownloadError(
                    f"downloading {url} failed after {retries + 1} attempt(s): {problem}. {have:,} bytes are kept "
                    f"in {part}; run the step again to resume from there. If this machine is offline, fetch the "
                    f"file elsewhere and put it at {part.with_suffix('')}{_key_hint(key)}")
            wait = backoff * 2 ** (attempt - 1)
            logger.warning("download of %s interrupted (%s) at %s bytes; retry %d/%d in %.0fs",
                           url, problem, f"{have:,}", attempt, retries, wait)
            time.sleep(wait)


class _Transient(Exception):
    """A failure worth retrying (dropped or stalled transfer, 5xx)."""


def _one_request(session: requests.Session, url: str, part: Path, offset: int, chunk: int, timeout: float,
                 progress: bool, key: str | None) -> tuple[int, bool, bool]:
    """One GET, appending to ``part`` from ``offset``; returns (bytes written, complete?, resumed?)."""
    # identity: a gzip-encoded body would make byte offsets meaningless for Range
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    except requests.exceptions.ConnectTimeout:
        # an unanswered connect is how a firewalled, offline machine looks: say so now, don't retry
        raise _unreachable(url, part, f"no answer to the connection attempt within {timeout}s", key) from None
    except requests.exceptions.ReadTimeout:
        raise _Transient(f"the server did not answer within {timeout}s") from None
    except requests.exceptions.ConnectionError as exc:
        raise _unreachable(url, part, f"could not connect ({_root_cause(exc)})", key) from None
    except requests.exceptions.RequestException as exc:
        raise _unreachable(url, part, f"request failed ({_root_cause(exc)})", key) from None
    with resp:
        if resp.status_code == 416 and offset:
            total = _total_from_content_range(resp.headers.get("Content-Range"))
            if total == offset:  # the part was already complete when the last run stopped
                return 0, True, True
            logger.warning("server refused to resume %s at byte %s; starting over", url, f"{offset:,}")
            part.unlink(missing_ok=True)
            raise _Transient("the server refused the resume request (416)")
        if resp.status_code >= 500:
            raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code >= 400:
            raise _unreachable(url, part, f"the server answered HTTP {resp.status_code} {resp.reason}", key)
        if offset and resp.status_code == 206:
            start = _start_from_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                logger.warning("server resumed %s at byte %s, not %s; starting over", url, start, offset)
                part.unlink(missing_ok=True)
                raise _Transient("the server resumed at the wrong offset")
            total = _total_from_content_range(resp.headers.get("Content-Range"))
            mode, resumed = "ab", True
        else:
            if offset:
                logger.info("server ignores Range for %s (HTTP %s): downloading from the start",
                            url, resp.status_code)
            offset, mode, resumed = 0, "wb", False
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        written = 0
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=archive_name(url)[:30], disable=not progress, mininterval=1.0)
        try:
            with open(part, mode) as fh:
                for block in resp.iter_content(chunk_size=chunk):
                    fh.write(block)
                    written += len(block)
                    bar.update(len(block))
                fh.flush()
                os.fsync(fh.fileno())
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
                requests.exceptions.Timeout, socket.timeout) as exc:
            raise _Transient(f"transfer interrupted ({_root_cause(exc)})") from None
        finally:
            bar.close()
    complete = total is None or offset + written >= total
    return written, complete, resumed


def _unreachable(url: str, part: Path, what: str, key: str | None) -> SourceUnavailableError:
    dest = part.with_name(part.name[: -len(".part")])
    return SourceUnavailableError(
        f"cannot download {url}: {what}. This machine may be offline or unable to reach that host. "
        f"Download the file by hand (on a machine with access) and put it at {dest}; the downloader uses a "
        f"file found there{_key_hint(key, also='or point')}")


def _key_hint(key: str | None, also: str = "or set") -> str:
    if not key:
        return ""
    return f" ({also} {key} in the params at a local path or file:// URL)"


def _root_cause(exc: BaseException) -> str:
    """The innermost reason (``Connection refused``, ``Name or service not known``) without urllib3's noise."""
    seen, visited = exc, {id(exc)}
    while (nxt := seen.__cause__ or seen.__context__) is not None and id(nxt) not in visited:
        visited.add(id(nxt))
        seen = nxt
    for candidate in (exc, seen):
        text = str(candidate)
        match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
        if match:
            return match.group(1).strip()
    text = str(seen) or type(seen).__name__
    return text if len(text) < 200 else text[:200] + "..."


_RANGE = re.compile(r"bytes\s+(\d+|\*)(?:-(\d+))?/(\d+|\*)")


def _start_from_content_range(value: str | None) -> int | None:
    match = _RANGE.match(value or "")
    return int(match.group(1)) if match and match.group(1) != "*" else None


def _total_from_content_range(value: str | None) -> int | None:
    match = _RANGE.match(value or "")
    return int(match.group(3)) if match and match.group(3) != "*" else None


# --- local copies -----------------------------------------------------------------------------------

def _copy_local(source: Path, part: Path, chunk: int, key: str | None, progress: bool) -> int:
    if not source.is_file():
        raise SourceUnavailableError(
            f"{source} does not exist or is not a file{' (set in ' + key + ')' if key else ''}: "
            "point it at the downloaded archive")
    total = source.stat().st_size
    with open(source, "rb") as src, open(part, "wb") as dst, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=source.name[:30],
                 disable=not progress, mininterval=1.0) as bar:
        while block := src.read(chunk):
            dst.write(block)
            bar.update(len(block))
        dst.flush()
        os.fsync(dst.fileno())
    return total


# --- checksums --------------------------------------------------------------------------------------

def _norm_hash(value: str | None, length: int, kind: str, key: str | None) -> str | None:
    if value is None or value == "":
        return None
    value = str(value).strip().lower()
    if not re.fullmatch(rf"[0-9a-f]{{{length}}}", value):
        where = f" ({_hash_key(key, kind)})" if key else ""
        raise UserError(f"{kind} {value!r}{where} is not {length} hex digits")
    return value


def _hash_key(key: str | None, kind: str) -> str:
    """``data.coco.images_url[1]`` -> ``data.coco.images_sha256[1]``."""
    if not key:
        return kind
    return re.sub(r"_url\b|_path\b", f"_{kind}", key) if re.search(r"_url\b|_path\b", key) else f"{key}.{kind}"


def _verify(path: Path, hashes: dict, sha256: str | None, md5: str | None, url: str, key: str | None,
            downloaded: bool) -> None:
    for kind, expected in (("sha256", sha256), ("md5", md5)):
        if expected and hashes[kind] != expected:
            if downloaded:
                fix = (f"The download was deleted. If the file at {url} changed on purpose, set "
                       f"{_hash_key(key, kind)} to {hashes[kind]} (or null to skip the check) in the params; "
                       "otherwise the transfer was corrupted: run the step again")
            else:
                fix = (f"Delete {path} to download it again, or, if this is the file you mean to use, set "
                       f"{_hash_key(key, kind)} to {hashes[kind]} (or null) in the params")
            raise ChecksumError(f"checksum mismatch for {url} ({path}): expected {kind} {expected}, got "
                                f"{hashes[kind]}. {fix}")


def file_hashes(path: Path) -> dict:
    """SHA-256 and MD5 of ``path``, remembered beside it (keyed by size and mtime) so reruns skip a
    minute of hashing a 13 GB archive."""
    path = Path(path)
    st = path.stat()
    cache = path.with_name(path.name + ".hashes.json")
    try:
        saved = json.loads(cache.read_text())
        if saved["size"] == st.st_size and saved["mtime_ns"] == st.st_mtime_ns:
            return {"sha256": saved["sha256"], "md5": saved["md5"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hashes = _hash_file(path)
    _write_hash_cache(path, hashes)
    return hashes


def _hash_file(path: Path, chunk: int = 1 << 20) -> dict:
    sha, md = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            sha.update(block)
            md.update(block)
    return {"sha256": sha.hexdigest(), "md5": md.hexdigest()}


def _write_hash_cache(path: Path, hashes: dict) -> None:
    from avg import safe_io

    st = path.stat()
    try:
        safe_io.write_json(path.with_name(path.name + ".hashes.json"),
                      {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **hashes})
    except OSError:  # a read-only cache is fine: we just hash again next time
        pass


# --- extraction -------------------------------------------------------------------------------------

Select = Callable[[str], "str | None"]


def extract(archive: Path, out_dir: Path, select: Select | None = None, progress: bool = True) -> list[str]:
    """Unpack the regular files of a .zip or .tar(.gz/.bz2/.xz) into ``out_dir``.

    ``select(member_name)`` returns the relative path to write the member to, or None to skip it
    (default: the member's own path). A member whose name (or link target) is absolute or climbs out
    with ``..`` is refused for the whole archive: such an archive is broken or hostile. Links and
    devices are never extracted. Returns the relative paths written.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_file():
        raise ArchiveError(f"{archive} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    select = select or (lambda name: name)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, out_dir, select, progress)
        if _is_tar(archive):
            return _extract_tar(archive, out_dir, select, progress)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
            struct.error, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # disk full, permission denied: not the archive's fault (decoders raise errno-less OSErrors)
        raise _corrupt(archive, f"{type(exc).__name__}: {exc}") from None
    suffix = "".join(archive.suffixes[-2:]).lower()
    if suffix.endswith((".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz")):
        raise _corrupt(archive, "not a readable zip or tar archive")
    raise ArchiveError(f"{archive} is not a zip or tar archive; expected .zip, .tar, .tar.gz (or .tgz)")


def _is_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except (OSError, EOFError, zlib.error, tarfile.TarError):
        # a truncated .tar.gz can fail even the sniff; judge by the name so the user hears "corrupt"
        return archive.name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def _corrupt(archive: Path, why: str) -> ArchiveError:
    return ArchiveError(f"{archive} is corrupt or truncated ({why}). Delete it and run the step again to "
                        "download it anew (or replace it with a good copy)")


def safe_member_path(name: str) -> PurePosixPath:
    """The member name as a relative path inside the output folder, or :class:`UnsafeArchiveError`."""
    text = name.replace("\\", "/")
    path = PurePosixPath(text)
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or ".." in path.parts:
        raise UnsafeArchiveError(f"archive member {name!r} points outside the extraction folder")
    return PurePosixPath(*[p for p in path.parts if p not in ("", ".")])


def _target(out_dir: Path, archive: Path, rel: str) -> Path:
    try:
        clean = safe_member_path(rel)
    except UnsafeArchiveError:
        raise UnsafeArchiveError(f"{archive}: select() mapped a member to {rel!r}, outside the output folder") from None
    if not clean.parts:
        raise UnsafeArchiveError(f"{archive}: select() mapped a member to an empty path")
    return out_dir.joinpath(*clean.parts)


def _copy_member(src, out_dir: Path, archive: Path, rel: str) -> Path:
    """Write one archive member's bytes to its place under ``out_dir``; the written path."""
    dest = _target(out_dir, archive, rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return dest


def _extract_zip(archive: Path, out_dir: Path, select: Select, progress: bool) -> list[str]:
    written = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:  # refuse before writing anything
            safe_member_path(info.filename)
        for info in tqdm(infos, desc=f"unpack {archive.name}"[:30], unit="file", disable=not progress,
                         mininterval=1.0):
            if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
                continue
            rel = select(info.filename)
            if rel is not None:
                with zf.open(info) as src:      # zf.open checks the CRC at the end
                    _copy_member(src, out_dir, archive, rel)
                written.append(rel)
    return written


def _extract_tar(archive: Path, out_dir: Path, select: Select, progress: bool) -> list[str]:
    written = []
    # streaming mode ("r|*"): one pass over a .tar.gz, no seeking back per member
    with tarfile.open(archive, "r|*") as tf:
        for member in tqdm(tf, desc=f"unpack {archive.name}"[:30], unit="file", disable=not progress,
                           mininterval=1.0):
            safe_member_path(member.name)
            if member.issym() or member.islnk():
                # never extracted, but a link aimed outside marks the archive as hostile
                base = "" if member.islnk() else posixpath.dirname(member.name)
                target = posixpath.normpath(posixpath.join(base, member.linkname))
                if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
                    raise UnsafeArchiveError(f"archive link {member.name!r} -> {member.linkname!r} points "
                                             "outside the extraction folder")
                continue
            if not member.isfile():
                continue
            rel = select(member.name)
            if rel is not None:
                if _copy_member(tf.extractfile(member), out_dir, archive, rel).stat().st_size != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                written.append(rel)
    return written
