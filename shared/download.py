"""The one network access of the project: an explicit, checksummed download of the four
official files, on request (--download), into the user's data folder."""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shared.data import DATA_DIR_ENV, DatasetSpec, OfficialFile, how_to_get
from shared.errors import DataError, UsageError, first_line
from shared.idx import read_idx_content
from shared.io import WRITER_PATTERN, remove_left_by_the_dead, temporary_prefix
from shared.outputs import missing_folders, remove_if_empty

DOWNLOAD_URL_ENV = "THREEFOLD_DOWNLOAD_URL"
TIMEOUT_SECONDS = 60  # for each read: a server that says nothing for this long has gone
# A file, its headers and body, may take TIMEOUT_SECONDS and the file's largest size
# (most_bytes) at this rate: a server that trickles a byte every few seconds is stopped in
# minutes, not months.
SLOWEST_BYTES_PER_SECOND = 50_000


def most_bytes(file: OfficialFile) -> int:
    """The most a gzip of the official IDX file can take: the IDX itself (a header, then a
    byte a pixel or a label) and room for gzip's headers and stored blocks."""
    header, item = (16, 28 * 28) if "images" in file.name else (8, 1)
    return header + file.count * item + (1 << 20)


class _RedirectOverHttp(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, but only to another http:// or https:// address (its own also
    follow ftp://, which the download's address may not be)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirected to {newurl[:80]!r}, not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _TooSlow(TimeoutError):
    """The file's deadline passed: its reply came slower than SLOWEST_BYTES_PER_SECOND."""


class _DeadlineReader(io.RawIOBase):
    """A connection's socket read under a deadline: each read waits at most TIMEOUT_SECONDS
    and never past `deadline` (time.monotonic()), so that headers trickled a byte at a
    time end too (http.client reads them through the socket's file, read by read)."""

    def __init__(self, sock: socket.socket, deadline: float):
        # The socket's own file: the socket stays open until it is closed too.
        self.sock, self.file, self.deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        left = self.deadline - time.monotonic()
        if left > 0:
            self.sock.settimeout(min(TIMEOUT_SECONDS, left))
            try:
                return self.file.readinto(buffer)
            except TimeoutError:
                if time.monotonic() < self.deadline:
                    raise
        raise _TooSlow()

    def close(self) -> None:
        self.file.close()
        super().close()


def _opener(deadline: float) -> urllib.request.OpenerDirector:
    """urllib's opener whose connections read their replies under `deadline`."""

    def under_deadline(connection: type) -> type:
        """`connection` (http.client's) whose socket's replies go through a reader under
        the deadline, once it is connected (over TLS too)."""

        class Connection(connection):
            def connect(self) -> None:
                super().connect()
                self.sock = _DeadlineSocket(self.sock, deadline)

            def _tunnel(self) -> None:
                # A proxy's reply to CONNECT, read before TLS starts: a proxy that trickled it
                # was read under the per-read timeout alone.
                sock, self.sock = self.sock, _DeadlineSocket(self.sock, deadline)
                try:
                    super()._tunnel()
                finally:
                    self.sock = sock

        return Connection

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(under_deadline(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            connection = under_deadline(http.client.HTTPSConnection)
            return self.do_open(connection, req, context=self._context)

    return urllib.request.build_opener(_RedirectOverHttp, Http, Https)


class _DeadlineSocket:
    """A connected socket whose replies http.client reads through a _DeadlineReader; all
    else is the socket's own."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _fetch(url: str, target: Path, progress: bool, limit: int) -> None:
    """Stream `url` into `target`, at most `limit` bytes; an HTTP error, a dropped connection,
    a body shorter than its Content-Length or longer than `limit` is a DataError naming the
    address."""
    allowed = TIMEOUT_SECONDS + limit / SLOWEST_BYTES_PER_SECOND
    received, deadline = 0, time.monotonic() + allowed
    try:
        with _opener(deadline).open(url, timeout=TIMEOUT_SECONDS) as response:
            total = _length(response.headers.get("Content-Length"), url)
            if total is not None and total > limit:
                raise DataError(f"{url}: {total:,} bytes, more than the file can be ({limit:,})")
            with (
                open(target, "wb") as f,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=Path(url).name,
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                # read1: what has arrived, so that a trickle meets the deadline (the reader's).
                while chunk := response.read1(1 << 16):
                    received += len(chunk)
                    if received > limit:  # a server that sends no length, or lies about it
                        raise DataError(f"{url}: more than the file can be ({limit:,} bytes)")
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: the server answered HTTP {e.code} ({e.reason})") from None
    except (_TooSlow, urllib.error.URLError) as e:
        # urllib hands on a deadline passed while it connects (a proxy's CONNECT) as a reason
        if isinstance(e, _TooSlow) or isinstance(e.reason, _TooSlow):
            raise DataError(
                f"{url}: {received:,} bytes in {allowed:.0f} s, "
                f"slower than {SLOWEST_BYTES_PER_SECOND:,} bytes a second; stopped"
            ) from None
        raise DataError(f"{url}: download failed ({e.reason})") from None
    # A connection dropped mid-body (IncompleteRead), a reply that is not HTTP, a redirect to
    # an address urllib cannot take (ValueError, InvalidURL): each the server's doing.
    except (http.client.HTTPException, OSError, ValueError) as e:
        raise DataError(f"{url}: download failed ({first_line(e)})") from None
    if total is not None and received != total:
        raise DataError(f"{url}: download cut short ({received} of {total} bytes)")


def _length(header: str | None, url: str) -> int | None:
    """The body's length a Content-Length header declares (None where there is none)."""
    if not header:
        return None
    # int() also takes "-5", "1_000" and " 7 "; isdigit() also "²", which int() does not.
    text = header.strip()
    if not (text.isascii() and text.isdigit()):
        raise DataError(f"{url}: the server declared a length of {header[:40]!r}, not a number")
    if len(text) > 18:  # int() refuses 4,300 digits; no file is near 10**18 bytes
        raise DataError(f"{url}: the server declared a length of {len(text):,} digits")
    return int(text) or None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_download(path: Path, file: OfficialFile, label: str) -> None:
    """Where the SHA-256 of the IDX content is pinned, the IDX header and body
    (read_idx_content) and that digest; else the published MD5 of the .gz first. A mirror
    that recompressed the official files (Debian's package does) holds the same content in
    other bytes. Errors name `label` (the address a download came from: its staging file is
    gone by then)."""
    expected_md5 = None if file.content_sha256 else file.gzip_md5
    if expected_md5 and (actual := _md5(path)) != expected_md5:
        raise DataError(
            f"{label}: MD5 {actual} differs from the published {expected_md5}; "
            "the download is damaged or not the official file"
        )
    actual = read_idx_content(path, label=label).sha256
    expected_sha = file.content_sha256
    if expected_sha and actual != expected_sha:
        raise DataError(
            f"{label}: SHA-256 of the IDX content {actual[:16]}... differs from "
            f"the official {expected_sha[:16]}..."
        )


def download_dataset(
    spec: DatasetSpec,
    dest: Path | None = None,
    base_url: str | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Fetch the four .gz files into a hidden staging folder inside `dest`, verify every one,
    and only then move them into place: a failed or partial download leaves nothing that
    looks like data. A file `dest` already holds with the official content is not fetched
    again; one with other content is refused before any network access (see _held). Returns
    `dest` (default: $THREEFOLD_DATA where set, else the dataset's user folder)."""
    if not all(file.gzip_md5 or file.content_sha256 for file in spec.files):
        raise UsageError(
            f"--download: no checksums are known for {spec.name}'s files, and threefold "
            f"downloads only what it can verify; {how_to_get(spec)}"
        )
    source, from_env = "--download-url", os.environ.get(DOWNLOAD_URL_ENV)
    if base_url is None:
        source = f"${DOWNLOAD_URL_ENV}" if from_env else "the source"
        base_url = from_env or spec.download_url
    base_url = _checked_address(base_url, source)
    # Where every command then looks first: $THREEFOLD_DATA where it is set.
    dest = Path(dest or os.environ.get(DATA_DIR_ENV) or spec.user_dir)
    wanted = [file for file in spec.files if not _held(dest, file)]
    if not wanted:
        return dest
    made, staging, done = missing_folders(dest), None, False
    try:
        try:
            dest.mkdir(parents=True, exist_ok=True)
            prefix = temporary_prefix("download", os.getpid())
            staging = Path(tempfile.mkdtemp(dir=dest, prefix=prefix))
            _remove_stale_staging(dest, staging.stat().st_mtime)  # by the folder's clock
        except OSError as e:
            raise UsageError(f"--download: cannot write to {dest} ({e.strerror or e})") from None
        names = [f"{file.name}.gz" for file in wanted]
        for file, name in zip(wanted, names, strict=True):
            url = f"{base_url.rstrip('/')}/{name}"
            _fetch(url, staging / name, progress, most_bytes(file))
            verify_download(staging / name, file, url)
        _move_into_place(staging, dest, names)
        done = True
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        remove_if_empty([] if done else made)  # a failed download leaves no folder it made
    return dest


# A download's staging folder: .download.HOST.PID.x, or an older version's .download-x (whose
# writer is unknown: taken for dead by its age alone, as another host's); x, mkdtemp's 8
# characters: a user's .download-backup is not one.
_STAGING = re.compile(rf"\.download(?:{WRITER_PATTERN}|-[a-z0-9_]{{8}})")


def _remove_stale_staging(dest: Path, now: float) -> None:
    """Remove the staging folders that killed downloads into `dest` left (SIGKILL: they
    stayed for good): not a live download's nor another user's; another host's once an hour
    old by `now`, the folder's clock (see io.left_by_the_dead)."""
    remove_left_by_the_dead(dest, ".download*", _STAGING, shutil.rmtree, now)


def _held(dest: Path, file: OfficialFile) -> bool:
    """Whether `dest` holds `file` (gzipped or plain, as the loader finds it) with the official
    content. Any other file under its names is refused: the download would write over it, or
    a new .gz would stand in front of a plain file, and a user's own data (a run's, which
    --resume looks for there) would be lost."""
    held = [p for p in (dest / f"{file.name}.gz", dest / file.name) if os.path.lexists(p)]
    for path in held:
        if path.is_dir():
            raise DataError(f"{path}: a folder where the download puts its file")
        if not path.is_file():  # a FIFO would wait for a writer; a dangling link
            raise DataError(f"{path}: not a regular file where the download puts its file")
        try:
            verify_download(path, file, str(path))
        except DataError:
            raise DataError(
                f"--download: {path} is not the official {file.name} (other data, or "
                "damaged), and a download writes over no file; move it away, or pass another "
                "--data-dir"
            ) from None
    return bool(held)


def _checked_address(base_url: str, source: str) -> str:
    """`base_url` if it is an http:// or https:// address with a host; else a one-line
    UsageError naming `source` (urllib's own errors for the rest are tracebacks)."""
    # A password is not repeated: an address holding '@' is not shown, nor urllib's words on
    # it ('user:pass/word@host' gave the port 'pass'). An '@' in the path is an address's own.
    hidden = "@" in base_url
    shown = (
        f"{source} (an address holding '@', not shown)" if hidden else f"{source} {base_url[:80]!r}"
    )
    try:
        parts = urllib.parse.urlsplit(base_url)
        parts.port  # noqa: B018 -- a port that is not a number raises here
    except ValueError as e:
        raise UsageError(f"{shown}: not an address" + ("" if hidden else f" ({e})")) from None
    if "@" in parts.netloc:  # urllib looked "user:password@host" up as a host name
        raise UsageError(f"{source}: an address with a user name or password; give none")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{shown}: not an http:// or https:// address")
    if not base_url.isprintable() or " " in base_url:
        raise UsageError(f"{shown}: an address holds no spaces or control characters")
    return base_url


def _move_into_place(staging: Path, dest: Path, names: list[str]) -> None:
    """Each verified file from `staging` to `dest`; a folder in a file's place is refused
    before any moves, so that a failure leaves the data folder as it was."""
    for name in names:
        if (dest / name).is_dir():
            raise DataError(f"{dest / name}: a folder where the download puts its file")
    try:
        for name in names:
            os.replace(staging / name, dest / name)
    except OSError as e:
        why = e.strerror or e
        raise DataError(f"{dest}: cannot move the download into place ({why})") from None
