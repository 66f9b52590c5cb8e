"""Files: every atomic writer of the toolkit, the one JSON-lines reader and file hashing.

An atomic writer writes to a temporary file in the destination folder (``.tmp-{pid}-{n}-{name}``,
created exclusively, so it gets the usual permissions and never collides across threads), flushes
it (and by default ``fsync``s it), then moves it onto the destination with ``os.replace``. A reader
therefore sees the old file or the complete new one, never a half-written file; on an error the
temporary file is removed and the destination is untouched. Folders that clean up after a crash
recognise leftovers by ``TMP_PREFIX``.

Formats (bytes as the toolkit has always written them): text UTF-8; JSON ``json.dump(obj, indent)``
without a trailing newline unless asked; JSON lines ``json.dumps(line) + "\\n"`` per line; CSV
``DataFrame.to_csv(index=False, lineterminator="\\n")``; npz ``np.savez`` (uncompressed); PNG and
other library formats through a callback that writes to the open binary file.
"""
import contextlib
import hashlib
import itertools
import json
import os
import shutil

from .errors import DataError

__all__ = ["TMP_PREFIX", "temp_path", "atomic_write", "write_text", "write_bytes", "write_json", "write_jsonl",
           "write_csv", "write_npz", "write_png", "save_torch", "atomic_directory", "read_json_lines",
           "iter_json_lines", "file_sha256"]

TMP_PREFIX = ".tmp-"
_COUNTER = itertools.count()


def temp_path(path):
    """A fresh temporary name beside ``path``: ``{folder}/.tmp-{pid}-{n}-{name}``."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{next(_COUNTER)}-{name}")


def atomic_write(path, write, binary=False, fsync=True, encoding="utf-8"):
    """Call ``write(fh)`` on a temporary file beside ``path``, then move it onto ``path``.

    ``binary``: open the file in ``"wb"`` mode (else text with ``encoding`` and ``"\\n"`` line ends).
    ``fsync``: force the bytes to disk before the rename (off for large files the OS may flush
    lazily). Returns ``path``.
    """
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding=encoding, newline="\n") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def write_bytes(path, data, fsync=True):
    """Write ``data`` (bytes) atomically."""
    return atomic_write(path, lambda fh: fh.write(data), binary=True, fsync=fsync)


def write_text(path, text, fsync=True):
    """Write ``text`` atomically as UTF-8 (no newline translation)."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path, obj, indent=4, default=None, newline=False, fsync=True):
    """Write ``json.dumps(obj, indent=indent, default=default)`` atomically (plus ``"\\n"`` when ``newline``)."""
    return write_text(path, json.dumps(obj, indent=indent, default=default) + ("\n" if newline else ""), fsync=fsync)


def write_jsonl(path, lines, fsync=True):
    """Write one ``json.dumps(line)`` per line atomically."""
    return write_text(path, "".join(json.dumps(line) + "\n" for line in lines), fsync=fsync)


def write_csv(df, path, fsync=True, **to_csv_kwargs):
    """Write a pandas DataFrame atomically: ``df.to_csv(index=False, lineterminator="\\n", **to_csv_kwargs)``."""
    return write_text(path, df.to_csv(index=False, lineterminator="\n", **to_csv_kwargs), fsync=fsync)


def write_npz(path, arrays, fsync=False):
    """Write ``np.savez(fh, **arrays)`` (uncompressed) atomically; not fsynced by default (large files)."""
    import numpy as np
    return atomic_write(path, lambda fh: np.savez(fh, **arrays), binary=True, fsync=fsync)


def write_png(path, save, fsync=True):
    """Write a PNG atomically: ``save(fh)`` writes its bytes to the open binary file ``fh``
    (e.g. ``lambda fh: fig.savefig(fh, format="png")``)."""
    return atomic_write(path, save, binary=True, fsync=fsync)


def save_torch(obj, path, fsync=True):
    """``torch.save(obj)`` atomically (never a half-written checkpoint); returns ``path``."""
    import torch
    return atomic_write(path, lambda fh: torch.save(obj, fh), binary=True, fsync=fsync)


@contextlib.contextmanager
def atomic_directory(path):
    """Build a folder under a temporary name beside ``path`` and move it onto ``path`` when the
    block completes (an existing ``path`` is replaced); on an error the temporary folder is removed.

    Yields the temporary folder's path (created, empty)."""
    path = os.path.abspath(os.fspath(path))
    tmp = temp_path(path)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------- reading
_JSONL_EXPECTED = "expected JSONL: one JSON object per line"


def _array_message(path, doc):
    return f"{path}: is a JSON array of {len(doc)} item{'s' if len(doc) != 1 else ''}, not JSONL; {_JSONL_EXPECTED}"


def _not_jsonl(path, fh, first_line):
    """Why a file whose first non-blank line is not a JSON object is not JSONL, when it is one JSON
    document instead: a JSON array (``[`` ...) or one object spread over several lines (pretty-printed).
    ``fh``: the open binary file (read to its end); returns None when the whole file is no JSON either."""
    head = first_line.lstrip()
    if not head.startswith(("[", "{")):
        return None
    try:
        doc = json.loads(first_line + fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if isinstance(doc, list):
        return _array_message(path, doc)
    if doc is None and head.startswith("["):
        return f"{path}: starts with '[' like a JSON array, not JSONL; {_JSONL_EXPECTED}"
    if isinstance(doc, dict):
        return f"{path}: holds one JSON object spread over several lines (pretty-printed JSON), not JSONL; " \
               f"{_JSONL_EXPECTED}"
    return None


def iter_json_lines(path, what="file"):
    """Yield ``(line number, object)`` for every non-blank line of a JSON-lines file.

    Line numbers are 1-based; a UTF-8 byte-order mark is accepted. Every problem is a DataError that
    names the path (and the line): ``{what}`` not found, a folder, unreadable, not UTF-8, malformed
    JSON, or a line that is not a JSON object. A file that is one JSON document instead (a JSON array,
    or one pretty-printed object) is said to be one, and every JSON problem says that JSONL (one JSON
    object per line) is expected.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a JSONL {what}")
    try:
        with open(path, "rb") as fh:
            first = True
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}: line {lineno}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    why = _not_jsonl(path, fh, line) if first else None
                    raise DataError(why or f"{path}: line {lineno}: malformed JSON ({exc.msg}, column {exc.colno}); "
                                           f"{_JSONL_EXPECTED}") from None
                if not isinstance(obj, dict):
                    if first and isinstance(obj, list) and not fh.read().strip():
                        raise DataError(_array_message(path, obj))
                    raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}; "
                                    f"{_JSONL_EXPECTED}")
                first = False
                yield lineno, obj
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_json_lines(path, what="file"):
    """The objects of a JSON-lines file in file order (blank lines skipped); see ``iter_json_lines``."""
    return [obj for _, obj in iter_json_lines(path, what)]


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
