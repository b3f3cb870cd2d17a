"""Downloads with a timeout, retries and no partial files left behind; Keras' cache folder.

`fetch` serves the released weights (`keras_t2t.pretrained`) and the ImageNet class names
(`keras_t2t.imagenet`). A server that sends nothing for `$KERAS_T2T_DOWNLOAD_TIMEOUT` seconds
(default 30), at connection or at any point of a download, fails the try; a failure that may
pass (a stall, a dropped connection, an HTTP 5xx/408/429) is tried again, `DOWNLOAD_ATTEMPTS`
times in all; the file appears whole or not at all.
"""

import hashlib
import http.client
import logging
import math
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

logger = logging.getLogger("keras_t2t")

TIMEOUT_VARIABLE = "KERAS_T2T_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte from the server, at connection or any read
DOWNLOAD_ATTEMPTS = 3  # in all, where the failure may pass (a stall, a reset, an HTTP 5xx)
RETRY_BACKOFF = 2.0  # seconds before the second attempt, doubled before each next one


def keras_home():
    """Keras' own folder (`$KERAS_HOME`, else `~/.keras`; `/tmp/.keras` where it cannot be
    written), as `keras.utils.get_file` chooses it."""
    base = os.path.expanduser(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras"))
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        pass
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return base


def file_digest(path, algorithm, chunk=1 << 22):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class DownloadError(OSError):
    """A file could not be downloaded; no part of it is left on disk. `origin` and `reason`
    (what went wrong) are also attributes."""

    def __init__(self, message, origin=None, reason=None):
        super().__init__(message)
        self.origin, self.reason = origin, reason


class _Incomplete(Exception):
    """The connection ended before the declared length."""


class _LocalError(Exception):
    """Writing the download failed here (a full disk, permissions): trying again won't help."""


def download_timeout():
    """Seconds without data after which a download gives up: `$KERAS_T2T_DOWNLOAD_TIMEOUT`,
    else `DEFAULT_TIMEOUT`."""
    value = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"{TIMEOUT_VARIABLE} must be a positive number of seconds, received {value!r}."
        )
    return seconds


def remove_file(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fetch_once(origin, partial, timeout, chunk, progress):
    """One try: `origin` into `partial`, whole (its declared length) or an exception."""
    try:
        out = open(partial, "wb")
    except OSError as error:
        raise _LocalError(error) from None
    with out:
        # The timeout bounds the connection and each read of the headers and the body.
        with urllib.request.urlopen(origin, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            declared = int(declared) if declared and declared.strip().isdigit() else None
            bar = None
            if progress:  # as keras.utils.get_file shows it
                import keras

                bar = keras.utils.Progbar(declared)
            received = 0
            while block := response.read(chunk):
                try:
                    out.write(block)
                except OSError as error:
                    raise _LocalError(error) from None
                received += len(block)
                if bar is not None and (declared is None or received < declared):
                    bar.update(received)
        if declared is not None and received != declared:
            raise _Incomplete(f"the connection ended after {received:,} of {declared:,} bytes")
        if bar is not None:
            bar.update(received, finalize=True)


def _diagnose(error, timeout):
    """(what went wrong, whether another try may succeed)."""
    if isinstance(error, _LocalError):
        return f"cannot write it here: {error.args[0]}", False
    if isinstance(error, _Incomplete):
        return error.args[0], True
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}", error.code in (408, 429) or error.code >= 500
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return (
            f"no data for {timeout:g} s: the server or the network stalled ({TIMEOUT_VARIABLE} "
            f"sets this limit)",
            True,
        )
    permanent = (ConnectionRefusedError, socket.gaierror, FileNotFoundError, ssl.CertificateError)
    if isinstance(reason, permanent):
        return str(reason), False  # nothing listens there, no such host, a wrong certificate
    if isinstance(reason, (OSError, http.client.HTTPException)):
        return f"{type(reason).__name__}: {reason}", True  # a reset, a dropped connection
    return f"{type(reason).__name__}: {reason}", False


def fetch(origin, path, timeout=None, attempts=None, chunk=1 << 20, progress=True):
    """Downloads `origin` (http(s):// or file://) to `path` and returns `path`.

    The download goes to a temporary `<path>.<pid>-<thread>.partial` beside `path`, renamed to
    `path` once whole (its Content-Length received), and removed on any failure, interrupts
    included. A server that sends nothing for `timeout` seconds (default
    `download_timeout()`), at connection or at any point of the body, fails the try; a stall,
    a dropped connection or an HTTP 5xx/408/429 is tried again, `attempts` times in all
    (default `DOWNLOAD_ATTEMPTS`) after a growing pause. Raises `DownloadError` naming
    `origin` and what went wrong. `progress`: "Downloading data from ..." and Keras' progress
    bar, as `keras.utils.get_file` shows them.
    """
    timeout = download_timeout() if timeout is None else float(timeout)
    attempts = DOWNLOAD_ATTEMPTS if attempts is None else max(1, int(attempts))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as error:
        reason = f"cannot write it here: {error}"
        raise DownloadError(f"Cannot download {origin}: {reason}.", origin, reason) from None
    partial = f"{path}.{os.getpid()}-{threading.get_ident()}.partial"  # a shared cache
    if progress:
        print(f"Downloading data from {origin}", flush=True)
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(origin, partial, timeout, chunk, progress)
            os.replace(partial, path)
            return path
        except BaseException as error:
            remove_file(partial)
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
                raise
            reason, transient = _diagnose(error, timeout)
        if not transient or attempt == attempts:
            reason += f" ({attempt} tries)" if attempt > 1 else ""
            raise DownloadError(f"Cannot download {origin}: {reason}.", origin, reason)
        pause = RETRY_BACKOFF * 2 ** (attempt - 1)
        logger.warning(
            "Downloading %s failed (%s); trying again in %g s (%d of %d).",
            origin,
            reason,
            pause,
            attempt + 1,
            attempts,
        )
        time.sleep(pause)
