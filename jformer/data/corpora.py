"""Corpus files: the data directory, checked text / line / parallel readers, atomic writes,
and the Multi30k loader. Pure Python (no numpy)."""

from __future__ import annotations

import os
import pathlib

PathLike = str | os.PathLike

__all__ = ["PathLike", "default_data_dir", "write_text_atomic", "read_text", "read_lines", "read_parallel",
           "MULTI30K_SPLITS", "load_multi30k"]

_DATA_HINT = ("the datasets live in ../shared/data beside the repository checkout "
              "(see jformer.data.default_data_dir(); set JFORMER_DATA to use another directory)")


def default_data_dir() -> pathlib.Path:
    """The data directory: ``$JFORMER_DATA`` if set, else the first ``<ancestor>/shared/data``
    above this file (for a checkout at ``/work/main`` that is ``/work/shared/data``, i.e.
    ``../shared/data`` relative to the repository root).

    Raises FileNotFoundError, listing what was tried, if none exists.
    """
    env = os.environ.get("JFORMER_DATA")
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"JFORMER_DATA={env!r} is not a directory")
        return path
    tried = []
    for parent in pathlib.Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
        tried.append(str(candidate))
    raise FileNotFoundError(f"no data directory found (tried {tried}); {_DATA_HINT}")


def _check_file(path: PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found; {_DATA_HINT}")
    return path


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``path`` so that a reader, or a writer killed midway, leaves the old file or the new
    one, never part of it (a temporary file beside it, then an atomic rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding=encoding)
    os.replace(tmp, path)


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
    """The whole file as a str (newlines kept exactly as stored)."""
    with open(_check_file(path), encoding=encoding, newline="") as f:
        return f.read()


def read_lines(path: PathLike, encoding: str = "utf-8") -> list[str]:
    """The file's lines without their line endings ("\\n" or "\\r\\n").

    Splits on "\\n" only (``str.splitlines`` would also split on U+2028, U+0085, ... and
    break the line alignment of parallel corpora). A final newline does not add an empty line.
    """
    text = read_text(path, encoding)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_parallel(src_path: PathLike, tgt_path: PathLike, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """Line-aligned parallel files -> [(source line, target line)], newlines stripped.

    Raises ValueError naming both files and their line counts if the counts differ.
    """
    src, tgt = read_lines(src_path, encoding), read_lines(tgt_path, encoding)
    if len(src) != len(tgt):
        raise ValueError(f"parallel files are misaligned: {str(src_path)!r} has {len(src)} lines but "
                         f"{str(tgt_path)!r} has {len(tgt)} lines")
    return list(zip(src, tgt))


MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")


def load_multi30k(split: str = "train", *, src: str = "de", tgt: str = "en",
                  data_dir: PathLike | None = None) -> list[tuple[str, str]]:
    """Multi30k task 1 raw text pairs of ``split`` (29,000 / 1,014 / 1,000 lines)."""
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"split must be one of {MULTI30K_SPLITS}, got {split!r}")
    if {src, tgt} != {"de", "en"}:
        raise ValueError(f"src/tgt must be 'de' and 'en' (either way round), got {src!r}, {tgt!r}")
    root = (pathlib.Path(data_dir) if data_dir is not None else default_data_dir()) / "multi30k"
    return read_parallel(root / f"{split}.{src}", root / f"{split}.{tgt}")
