"""MovieLens folders as unzipped: ml-100k, ml-1m/10m and ml-latest/20m/25m layouts.

The header-less tab/`::` files and latin-1 item lists of the older releases are parsed here;
the newer CSV layout goes through the generic loaders. Errors are `DataError`s naming the file
and line, as in `loaders.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bertrec.errors import DataError
from bertrec.train.dataset import Dataset, Ratings
from bertrec.train.loaders import (
    gc_paused,
    item_text,
    load_item_texts,
    load_ratings,
    parse_genres,
    parse_item_id,
    ratings_from_columns,
)

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def _split_lines(
    path: Path, lines: Iterable[str], sep: str, width: int
) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of a header-less MovieLens file whose rows all have `width` fields."""
    for line, raw in enumerate(lines, 1):
        fields = raw.rstrip("\r\n").split(sep)
        if len(fields) != width:
            if not raw.strip():
                continue
            message = f"expected {width} fields separated by {sep!r}, found {len(fields)}"
            raise DataError(str(path), message, line)
        yield line, fields


def _legacy_lines(path: Path) -> list[str]:
    """Old MovieLens item files are latin-1; try UTF-8 first so re-encoded copies read right."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.split("\n")  # not splitlines(): latin-1 "\x85" would count as a line break


def _plain_ratings(path: Path, sep: str) -> Ratings:
    """Header-less user, item, rating, timestamp rows (MovieLens u.data, ratings.dat)."""
    lines: list[int] = []
    columns: tuple[list[Any], ...] = ([], [], [], [], [])
    users, items, ratings, reviews, stamps = columns
    with gc_paused(), path.open(encoding="latin-1") as fh:  # ASCII; latin-1 can't fail
        for line, (user, item, rating, ts) in _split_lines(path, fh, sep, 4):
            lines.append(line)
            users.append(user)
            items.append(item)
            ratings.append(rating)
            stamps.append(ts)
        reviews.extend([None] * len(lines))
        return ratings_from_columns(path, lines, columns)


def _ml100k_items(path: Path, genre_file: Path) -> dict[str, str]:
    genres: Sequence[str] = ML100K_GENRES
    if genre_file.is_file():  # "name|index" lines, in index order
        genres = [
            name
            for _, (name, _index) in _split_lines(genre_file, _legacy_lines(genre_file), "|", 2)
        ]
    texts = {}
    for line, fields in _split_lines(path, _legacy_lines(path), "|", 5 + len(genres)):
        flags = fields[5:]  # after id, title, release date, video release date, IMDb URL
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(str(path), "genre flags must be 0 or 1", line)
        chosen = [genre for genre, flag in zip(genres, flags, strict=True) if flag == "1"]
        texts[parse_item_id(path, line, fields[0])] = item_text(fields[1].strip(), genres=chosen)
    return texts


def _ml1m_items(path: Path) -> dict[str, str]:
    return {
        parse_item_id(path, line, movie): item_text(title.strip(), genres=parse_genres(genres))
        for line, (movie, title, genres) in _split_lines(path, _legacy_lines(path), "::", 3)
    }


def _ml100k(folder: Path) -> Dataset:
    texts = _ml100k_items(folder / "u.item", folder / "u.genre")
    return Dataset(_plain_ratings(folder / "u.data", "\t"), texts)


def _ml1m(folder: Path) -> Dataset:
    return Dataset(_plain_ratings(folder / "ratings.dat", "::"), _ml1m_items(folder / "movies.dat"))


def _ml_csv(folder: Path) -> Dataset:
    return Dataset(load_ratings(folder / "ratings.csv"), load_item_texts(folder / "movies.csv"))


_LAYOUTS: tuple[tuple[str, str, str, Callable[[Path], Dataset]], ...] = (
    ("ml-100k", "u.data", "u.item", _ml100k),
    ("ml-1m, ml-10m", "ratings.dat", "movies.dat", _ml1m),
    ("ml-latest, ml-20m, ml-25m", "ratings.csv", "movies.csv", _ml_csv),
)


def load_movielens(folder: Path) -> Dataset:
    """A MovieLens folder as unzipped: ml-100k, ml-1m/10m or ml-latest/20m/25m layout.

    Item texts read "Title (Year). Genres: A, B".

    Raises:
        DataError: the folder matches no layout, or one of its files is malformed.
    """
    if not folder.is_dir():
        raise DataError(str(folder), "folder not found")
    for name, ratings_file, items_file, load in _LAYOUTS:
        if (folder / ratings_file).is_file():
            if not (folder / items_file).is_file():
                raise DataError(str(folder), f"has {ratings_file} but no {items_file} ({name})")
            return load(folder)
    expected = "; ".join(f"{r} + {i} ({name})" for name, r, i, _ in _LAYOUTS)
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
    raise DataError(str(folder), f"not a MovieLens folder: expected {expected}; found {found}")
