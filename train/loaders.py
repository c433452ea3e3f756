"""Read ratings and item texts from CSV/TSV/JSON Lines files (MovieLens folders: movielens.py).

Every user mistake becomes a `DataError` naming the file and the 1-based line, so the CLI can
print one actionable line instead of a traceback. Rows are collected into plain lists and turned
into numpy arrays once at the end, which keeps ml-1m-sized files (1M rows) to a few seconds.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bertrec.errors import DataError
from bertrec.train.dataset import Dataset, Ratings

log = logging.getLogger(__name__)

_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_JSON_LINES = (".jsonl", ".ndjson")
_NO_GENRES = "(no genres listed)"

Row = Any  # list[str] from the csv module, or dict[str, Any] from json
Keys = tuple[Any, ...]  # per schema column: its index (CSV) or name (JSON) in the row, or None
Record = tuple[int, Row, Keys]  # (1-based line, row, keys)


@dataclass(frozen=True)
class _Schema:
    """The columns a file may have, by role, and which roles are required."""

    columns: tuple[tuple[str, tuple[str, ...]], ...]  # (role, accepted names), in Keys order
    required: tuple[tuple[str, tuple[str, ...]], ...]  # (what, roles): at least one role each

    def resolve(self, names: Sequence[str]) -> tuple[int | None, ...] | str:
        """Per column, its index in `names` (matched case-insensitively); or what is missing."""
        position: dict[str, int] = {}
        for i, name in enumerate(names):
            position.setdefault(name.strip().lower(), i)
        found = {
            role: next((position[a.lower()] for a in accepted if a.lower() in position), None)
            for role, accepted in self.columns
        }
        for what, roles in self.required:
            if all(found[role] is None for role in roles):
                accepted = ", ".join(
                    a for role, names in self.columns if role in roles for a in names
                )
                return f"missing {what} column (accepted names: {accepted})"
        return tuple(found.values())


_ITEM_NAMES = ("item_id", "itemId", "movieId", "item", "asin", "product_id")
_RATINGS = _Schema(
    columns=(
        ("user", ("user_id", "userId", "user", "reviewerID")),
        ("item", _ITEM_NAMES),
        ("rating", ("rating", "score", "stars", "overall")),
        ("review", ("review", "review_text", "reviewText", "text")),
        ("timestamp", ("timestamp", "time", "unixReviewTime")),
    ),
    required=(("user id", ("user",)), ("item id", ("item",)), ("rating", ("rating",))),
)
_ITEMS = _Schema(
    columns=(
        ("item", _ITEM_NAMES),
        ("text", ("text",)),
        ("title", ("title",)),
        ("description", ("description", "overview", "plot")),
        ("genres", ("genres", "genre")),
    ),
    required=(("item id", ("item",)), ("text", ("text", "title", "description", "genres"))),
)


# ------------------------------------------------ value parsing (ValueError, located by callers)


def _as_id(value: object, what: str) -> str:
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))  # JSON 12.0 and 12 must name the same item
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    elif value is None:
        text = ""
    else:
        raise ValueError(f"{what} must be a string or number, found {type(value).__name__}")
    if not text:
        raise ValueError(f"empty {what}")
    return text


def _as_rating(value: object) -> float:
    try:
        rating = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"rating {value!r} is not a number") from None
    if not math.isfinite(rating):
        raise ValueError(f"rating {value!r} is not a finite number")
    return rating


def _as_timestamp(value: object) -> int:
    """Epoch seconds from an int, a numeric string or an ISO date (naive dates count as UTC)."""
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:  # e.g. "881250949.0" from a float column
            return int(float(text))
        except (ValueError, OverflowError):
            pass
        try:  # fromisoformat only takes a "Z" suffix from Python 3.11 on
            when = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" else text)
            return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())
        except ValueError:
            pass
    raise ValueError(f"timestamp {value!r} is neither epoch seconds nor an ISO date")


def _as_text(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(t for t in (_as_text(v) for v in value) if t)
    return "" if value is None else str(value).strip()


def parse_genres(value: object) -> list[str]:
    """Genres from "A|B" text or a JSON list, without MovieLens's "(no genres listed)"."""
    parts = value if isinstance(value, list) else _as_text(value).split("|")
    return [g for g in map(_as_text, parts) if g and g != _NO_GENRES]


def item_text(title: str, description: str = "", genres: Sequence[str] = ()) -> str:
    """One string for the text encoder, e.g. "Toy Story (1995). Genres: Animation, Comedy"."""
    pieces = [p for p in (title, description) if p]
    if genres:
        pieces.append("Genres: " + ", ".join(genres))
    text = ""
    for piece in pieces:
        if text:
            text += " " if text[-1] in ".!?" else ". "
        text += piece
    return text


# ------------------------------------------------------------------------------- record readers


def _records(path: Path, schema: _Schema) -> Iterator[Record]:
    """The rows of a .csv/.tsv/.jsonl/.ndjson file, each with where the schema's columns are."""
    if not path.exists():
        raise DataError(str(path), "file not found")
    if path.is_dir():
        raise DataError(str(path), "is a folder, expected a file")
    suffix = path.suffix.lower()
    if suffix not in _DELIMITERS and suffix not in _JSON_LINES:
        supported = ", ".join([*_DELIMITERS, *_JSON_LINES])
        raise DataError(str(path), f"unsupported file type {suffix!r}; supported: {supported}")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            if suffix in _JSON_LINES:
                yield from _json_records(path, fh, schema)
            else:
                yield from _delimited_records(path, fh, _DELIMITERS[suffix], schema)
    except UnicodeDecodeError:
        raise _bad_encoding(path) from None


def _bad_encoding(path: Path) -> DataError:
    """Find the first non-UTF-8 line; text files decode in chunks, so the reader can't tell."""
    with path.open("rb") as fh:
        for line, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return DataError(str(path), "not UTF-8 text; re-save the file as UTF-8", line)
    return DataError(str(path), "not UTF-8 text; re-save the file as UTF-8")


def _delimited_records(
    path: Path, fh: Iterable[str], delimiter: str, schema: _Schema
) -> Iterator[Record]:
    reader = csv.reader(fh, delimiter=delimiter, strict=True)
    start = 1
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise DataError(str(path), "file is empty")
        keys = schema.resolve(header)
        if isinstance(keys, str):
            found = ", ".join(h.strip() for h in header)
            raise DataError(str(path), f"{keys}; found columns: {found}", reader.line_num)
        width = len(header)
        start = reader.line_num + 1
        for row in reader:  # a quoted field may span lines: report where its record starts
            line, start = start, reader.line_num + 1
            if len(row) != width and row:
                message = f"expected {width} fields as in the header, found {len(row)}"
                raise DataError(str(path), message, line)
            if row:
                yield line, row, keys
    except csv.Error as exc:
        detail = str(exc).replace("\t", "\\t")
        raise DataError(str(path), f"malformed row ({detail}); check its quotes", start) from None


def _json_records(path: Path, fh: Iterable[str], schema: _Schema) -> Iterator[Record]:
    resolved: dict[tuple[str, ...], Keys | str] = {}  # objects mostly share one set of keys
    empty = True
    for line, text in enumerate(fh, 1):
        if not text.strip():
            continue
        empty = False
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                str(path), f"invalid JSON: {exc.msg} (column {exc.colno})", line
            ) from None
        if not isinstance(obj, dict):
            raise DataError(str(path), f"expected a JSON object, found {type(obj).__name__}", line)
        names = tuple(obj)
        keys = resolved.get(names)
        if keys is None:
            found = schema.resolve(names)
            if not isinstance(found, str):
                found = tuple(None if i is None else names[i] for i in found)
            keys = resolved[names] = found
        if isinstance(keys, str):
            raise DataError(str(path), f"{keys}; found fields: {', '.join(names)}", line)
        yield line, obj, keys
    if empty:
        raise DataError(str(path), "file is empty")


# ---------------------------------------------------------------------------------- ratings


@contextmanager
def gc_paused() -> Generator[None, None, None]:
    """Pause the cyclic GC while loading: millions of new rows (lists, dicts) but no garbage,
    and the collector would keep rescanning them (a third of ml-1m's load time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _column(
    path: Path,
    lines: list[int],
    values: list[Any],
    fast: Callable[[Any], Any],
    slow: Callable[[Any], Any],
    valid: Callable[[list[Any]], bool] = bool,
) -> list[Any]:
    """Convert a column at C speed with `fast`; if that fails, redo it with the checking `slow`
    (same results on valid input) so the error names the offending line."""
    try:
        out = list(map(fast, values))
        if valid(out):
            return out
    except (TypeError, ValueError, OverflowError):
        pass
    out = []
    for line, value in zip(lines, values, strict=True):
        try:
            out.append(slow(value))
        except ValueError as exc:
            raise DataError(str(path), str(exc), line) from None
    return out


def ratings_from_columns(path: Path, lines: list[int], columns: tuple[list[Any], ...]) -> Ratings:
    """Ratings from raw per-row values, with `lines` locating each row for error messages."""
    if not lines:
        raise DataError(str(path), "no ratings in the file")
    users, items, ratings, reviews, stamps = columns
    return Ratings.from_columns(
        user_ids=_column(path, lines, users, str.strip, lambda v: _as_id(v, "user id"), all),
        item_ids=_column(path, lines, items, str.strip, lambda v: _as_id(v, "item id"), all),
        ratings=_column(
            path, lines, ratings, float, _as_rating, lambda out: all(map(math.isfinite, out))
        ),
        reviews=["" if v is None else str(v) for v in reviews],
        timestamps=(
            [0] * len(lines)
            if stamps.count(None) == len(stamps)
            else _column(path, lines, stamps, int, _as_timestamp)
        ),
    )


def load_ratings(path: Path) -> Ratings:
    """Ratings from a .csv/.tsv file with a header row, or a .jsonl/.ndjson file.

    Column names are matched case-insensitively against common aliases (userId, asin, overall,
    reviewText, unixReviewTime, ...). User, item and rating are required; review and timestamp
    are optional (timestamps may be epoch seconds or ISO dates).

    Raises:
        DataError: the file is missing, empty or of an unknown type, or a row is malformed.
    """
    lines: list[int] = []
    columns: tuple[list[Any], ...] = ([], [], [], [], [])
    users, items, ratings, reviews, stamps = columns
    with gc_paused():
        for line, row, (user, item, rating, review, ts) in _records(path, _RATINGS):
            lines.append(line)
            users.append(row[user])
            items.append(row[item])
            ratings.append(row[rating])
            reviews.append(None if review is None else row[review])
            stamps.append(None if ts is None else row[ts])
        return ratings_from_columns(path, lines, columns)


# ------------------------------------------------------------------------------- item texts


def parse_item_id(path: Path, line: int, value: object) -> str:
    """An item id cell, or a `DataError` located at `path:line`."""
    try:
        return _as_id(value, "item id")
    except ValueError as exc:
        raise DataError(str(path), str(exc), line) from None


def load_item_texts(path: Path) -> dict[str, str]:
    """Item id -> text, from a .csv/.tsv/.jsonl/.ndjson file.

    A `text` column is used as is; otherwise title, description (or overview, plot) and genres
    ("|"-separated or a JSON list) are joined: "Toy Story (1995). Genres: Animation, Comedy".
    Items with no text are skipped; a repeated id keeps its last text. Both are logged once.

    Raises:
        DataError: the file is missing, empty or of an unknown type, or a row is malformed.
    """
    texts: dict[str, str] = {}
    repeated = blank = 0
    for line, row, keys in _records(path, _ITEMS):
        item, text, title, description, genres = (None if k is None else row[k] for k in keys)
        item = parse_item_id(path, line, item)
        text = _as_text(text) or item_text(
            _as_text(title), _as_text(description), parse_genres(genres)
        )
        if not text:
            blank += 1
            continue
        repeated += item in texts
        texts[item] = text
    if repeated:
        log.warning("%s: %d repeated item ids; the last text of each was kept", path, repeated)
    if blank:
        log.warning("%s: skipped %d items with no text", path, blank)
    return texts


# ------------------------------------------------------------------------------------ datasets


def load_dataset(ratings: Path, items: Path | None = None) -> Dataset:
    """Ratings and item texts from a MovieLens folder or a ratings file.

    Texts from `items`, when given, are added (and override a MovieLens folder's own).

    Raises:
        DataError: from the loaders above.
    """
    if ratings.is_dir():
        from bertrec.train.movielens import load_movielens  # it builds on this module

        dataset = load_movielens(ratings)
        if items is None:
            return dataset
        dataset = Dataset(dataset.ratings, {**dataset.item_texts, **load_item_texts(items)})
    else:
        texts = load_item_texts(items) if items is not None else {}
        dataset = Dataset(load_ratings(ratings), texts)
    if items is not None:  # e.g. ids written "12" in one file and "12.0" in the other
        rated = set(dataset.ratings.item_ids.tolist())
        if missing := len(rated - dataset.item_texts.keys()):
            log.warning("%d of %d rated items have no text in %s", missing, len(rated), items)
    return dataset
