"""Loaders: every format's happy path, MovieLens layouts, and located errors for bad input."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bertrec.errors import DataError
from bertrec.train.loaders import load_dataset, load_item_texts, load_ratings
from bertrec.train.movielens import load_movielens


def write(folder: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = folder / name
    path.write_bytes(text.encode(encoding))
    return path


def raises_at(
    path: Path, line: int | None, load: Callable[[Path], object] = load_ratings
) -> DataError:
    """The DataError that loading `path` raises, checked to name the file and the line."""
    with pytest.raises(DataError) as info:
        load(path)
    assert info.value.line == line
    where = f"{path}:{line}" if line is not None else str(path)
    assert str(info.value).startswith(where + ": ")
    return info.value


# ------------------------------------------------------------------------------- ratings files


def test_csv_required_columns_only(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", "user_id,item_id,rating\nu1,i1,4\nu2,i1,3.5\n u3 ,i2,1\n")
    ratings = load_ratings(path)
    assert ratings.user_ids.tolist() == ["u1", "u2", "u3"]
    assert ratings.item_ids.tolist() == ["i1", "i1", "i2"]
    assert ratings.ratings.dtype == np.float32
    np.testing.assert_allclose(ratings.ratings, [4.0, 3.5, 1.0])
    assert ratings.reviews.tolist() == ["", "", ""]
    assert ratings.timestamps.dtype == np.int64
    assert ratings.timestamps.tolist() == [0, 0, 0]


def test_csv_reviews_and_timestamps_with_quoting(tmp_path: Path) -> None:
    text = (
        "userId,movieId,rating,review,timestamp\n"
        '1,10,5,"Great, really great",881250949\n'
        '2,10,2,"two\nlines",2020-01-02T03:04:05Z\n'
        "3,11,3,,\n"
    )
    ratings = load_ratings(write(tmp_path, "r.csv", text))
    assert ratings.reviews.tolist() == ["Great, really great", "two\nlines", ""]
    assert ratings.timestamps.tolist() == [881250949, 1577934245, 0]


def test_tsv_aliases_are_case_insensitive(tmp_path: Path) -> None:
    text = "USERID\tProduct_ID\tStars\tReviewText\tTime\nalice\tp9\t2\tmeh\t1970-01-02\n"
    ratings = load_ratings(write(tmp_path, "r.tsv", text))
    assert ratings.user_ids.tolist() == ["alice"]
    assert ratings.item_ids.tolist() == ["p9"]
    assert ratings.ratings.tolist() == [2.0]
    assert ratings.reviews.tolist() == ["meh"]
    assert ratings.timestamps.tolist() == [86400]  # a naive ISO date counts as UTC


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", "\ufeffuser,item,score\na,b,1\n")
    assert load_ratings(path).user_ids.tolist() == ["a"]


def test_jsonl_amazon_fields_and_numeric_ids(tmp_path: Path) -> None:
    rows = [
        {"reviewerID": "A1", "asin": "B01", "overall": 5.0, "reviewText": "Loved it"},
        {"reviewerID": 7, "asin": 12.0, "overall": "4", "unixReviewTime": 1400000000},
        {"reviewerID": "A1", "asin": 12, "overall": 1, "reviewText": None},
    ]
    text = json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n  \n" + json.dumps(rows[2])
    for name in ("r.jsonl", "r.ndjson"):
        ratings = load_ratings(write(tmp_path, name, text))
        assert ratings.user_ids.tolist() == ["A1", "7", "A1"]
        assert ratings.item_ids.tolist() == ["B01", "12", "12"]
        assert ratings.ratings.tolist() == [5.0, 4.0, 1.0]
        assert ratings.reviews.tolist() == ["Loved it", "", ""]
        assert ratings.timestamps.tolist() == [0, 1400000000, 0]


def test_jsonl_iso_timestamp_with_offset(tmp_path: Path) -> None:
    row = {"user_id": "u", "item_id": "i", "rating": 3, "timestamp": "1970-01-01T02:00:00+01:00"}
    ratings = load_ratings(write(tmp_path, "r.jsonl", json.dumps(row) + "\n"))
    assert ratings.timestamps.tolist() == [3600]


# ---------------------------------------------------------------------------- ratings errors


def test_missing_file(tmp_path: Path) -> None:
    err = raises_at(tmp_path / "nope.csv", None)
    assert "file not found" in str(err)


@pytest.mark.parametrize("name", ["r.csv", "r.tsv", "r.jsonl"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    err = raises_at(write(tmp_path, name, "\n\n" if name.endswith("jsonl") else ""), None)
    assert "file is empty" in str(err)


def test_header_only(tmp_path: Path) -> None:
    err = raises_at(write(tmp_path, "r.csv", "user_id,item_id,rating\n"), None)
    assert "no ratings" in str(err)


def test_unknown_extension(tmp_path: Path) -> None:
    err = raises_at(write(tmp_path, "r.xlsx", "whatever"), None)
    assert "'.xlsx'" in str(err)
    for suffix in (".csv", ".tsv", ".jsonl", ".ndjson"):
        assert suffix in str(err)


def test_folder_given_as_ratings_file(tmp_path: Path) -> None:
    (tmp_path / "r.csv").mkdir()
    assert "folder" in str(raises_at(tmp_path / "r.csv", None))


def test_missing_column_lists_found_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", "\nuser_id,product,rating\nu,i,1\n")
    message = str(raises_at(path, 2))
    assert "missing item id column" in message
    assert "movieId" in message  # the accepted names
    assert "found columns: user_id, product, rating" in message


def test_jsonl_missing_field_names_the_line(tmp_path: Path) -> None:
    text = '{"user": "u", "item": "i", "rating": 1}\n{"user": "u", "item": "i"}\n'
    message = str(raises_at(write(tmp_path, "r.jsonl", text), 2))
    assert "missing rating column" in message
    assert "found fields: user, item" in message


@pytest.mark.parametrize(
    ("rows", "line", "fragment"),
    [
        ("u,i,1\nu,i,abc\n", 3, "rating 'abc' is not a number"),
        ("u,i,1\nu,i,\n", 3, "rating '' is not a number"),
        ("u,i,nan\n", 2, "not a finite number"),
        ("u,i,1\nu,i,-inf\n", 3, "not a finite number"),
        ("u,i,1\n ,i,2\n", 3, "empty user id"),
        ("u,i,1\nu,i,2\nu,,2\n", 4, "empty item id"),
        ("u,i,1\nu,i,2,3\n", 3, "expected 3 fields as in the header, found 4"),
        ("u,i\n", 2, "found 2"),
        ('u,i,1\nu,"a\nb",2\nu,i\n', 5, "found 2"),  # the quoted newline counts as a line
        ('u,i,1\nu,"a\nb"\n', 3, "found 2"),  # a record spanning lines: where it starts
        ('u,"i,1\n', 2, "malformed row"),  # an unterminated quote: where the record starts
    ],
)
def test_bad_csv_row(tmp_path: Path, rows: str, line: int, fragment: str) -> None:
    err = raises_at(write(tmp_path, "ratings.csv", "user,item,rating\n" + rows), line)
    assert fragment in str(err)


def test_tsv_stray_quote_is_located(tmp_path: Path) -> None:
    path = write(tmp_path, "r.tsv", 'user\titem\trating\treview\nu\ti\t1\tok\nu\ti\t1\t"A" b\n')
    assert "'\\t' expected after" in str(raises_at(path, 3))


def test_gc_is_back_on_after_a_failed_load(tmp_path: Path) -> None:
    raises_at(write(tmp_path, "r.csv", "user,item,rating\nu,i,x\n"), 2)
    assert gc.isenabled()


def test_bad_timestamp(tmp_path: Path) -> None:
    path = write(tmp_path, "r.tsv", "user\titem\trating\ttimestamp\nu\ti\t1\t5\nu\ti\t1\tsoon\n")
    assert "timestamp 'soon'" in str(raises_at(path, 3))


@pytest.mark.parametrize(
    ("lines", "line", "fragment"),
    [
        (['{"user": "u", "item": "i", "rating": 1}', "", '{"user": "u", "item": '], 3, "invalid"),
        (["[1, 2, 3]"], 1, "expected a JSON object, found list"),
        (['{"user": "u", "item": "i", "rating": null}'], 1, "rating None is not a number"),
        (
            [
                '{"user": "u", "item": "i", "rating": 1}',
                '{"user": "u", "item": "i", "rating": NaN}',
            ],
            2,
            "finite",
        ),
        (['{"user": "", "item": "i", "rating": 1}'], 1, "empty user id"),
        (['{"user": ["u"], "item": "i", "rating": 1}'], 1, "user id must be a string or number"),
    ],
)
def test_bad_json_line(tmp_path: Path, lines: list[str], line: int, fragment: str) -> None:
    err = raises_at(write(tmp_path, "r.jsonl", "\n".join(lines) + "\n"), line)
    assert fragment in str(err)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    text = "user,item,rating\n" + "u,i,1\n" * 5000 + "u,Mis\xe9rables,1\n"
    err = raises_at(write(tmp_path, "r.csv", text, encoding="latin-1"), 5002)
    assert "UTF-8" in str(err)


# -------------------------------------------------------------------------------- item texts


def test_item_texts_text_column(tmp_path: Path) -> None:
    path = write(tmp_path, "items.csv", 'item_id,text\ni1,"A book, about things"\ni2,Other\n')
    assert load_item_texts(path) == {"i1": "A book, about things", "i2": "Other"}


def test_item_texts_join_title_and_genres(tmp_path: Path) -> None:
    text = (
        "movieId,title,genres\n"
        "1,Toy Story (1995),Animation|Children's|Comedy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "99,Untitled (2015),(no genres listed)\n"
    )
    assert load_item_texts(write(tmp_path, "movies.csv", text)) == {
        "1": "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "11": "American President, The (1995). Genres: Comedy, Drama, Romance",
        "99": "Untitled (2015)",
    }


def test_item_texts_join_description_without_double_stop(tmp_path: Path) -> None:
    text = (
        "asin\tGenre\tTitle\tPlot\n"
        "b1\tAction|Crime\tHeat\tA heist goes wrong.\n"
        "b2\t\t\tJust a plot\n"
    )
    assert load_item_texts(write(tmp_path, "items.tsv", text)) == {
        "b1": "Heat. A heist goes wrong. Genres: Action, Crime",
        "b2": "Just a plot",
    }


def test_item_texts_jsonl_overview_and_genre_list(tmp_path: Path) -> None:
    rows = [
        {"product_id": 5, "title": "Lamp", "overview": "Bright", "genres": ["Home", "Light"]},
        {"product_id": "6", "text": "Given text", "title": "ignored"},
    ]
    path = write(tmp_path, "items.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert load_item_texts(path) == {"5": "Lamp. Bright. Genres: Home, Light", "6": "Given text"}


def test_item_texts_duplicates_last_wins_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "item_id,title\na,First\nb,Bee\na,Second\nb,Bee again\na,Third\n"
    with caplog.at_level(logging.WARNING, logger="bertrec.train.loaders"):
        texts = load_item_texts(write(tmp_path, "items.csv", text))
    assert texts == {"a": "Third", "b": "Bee again"}
    warnings = [r.getMessage() for r in caplog.records if "repeated" in r.getMessage()]
    assert len(warnings) == 1
    assert "3 repeated item ids" in warnings[0]


def test_item_texts_skip_items_without_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bertrec.train.loaders"):
        texts = load_item_texts(write(tmp_path, "items.csv", "item,title\na,A\nb,\n"))
    assert texts == {"a": "A"}
    assert "skipped 1 items with no text" in caplog.text


def test_item_texts_without_text_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "items.csv", "item_id,price\na,3\n")
    message = str(raises_at(path, 1, load_item_texts))
    assert "missing text column" in message
    assert "overview" in message
    assert "found columns: item_id, price" in message


def test_item_texts_empty_id(tmp_path: Path) -> None:
    path = write(
        tmp_path, "items.jsonl", '{"item_id": "a", "text": "x"}\n{"item_id": "", "text": "y"}\n'
    )
    assert "empty item id" in str(raises_at(path, 2, load_item_texts))


# -------------------------------------------------------------------------------- MovieLens


def _ml100k_item(movie: int, title: str, genres: set[int]) -> str:
    flags = "|".join("1" if g in genres else "0" for g in range(19))
    return f"{movie}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?x|{flags}\n"


def make_ml100k(folder: Path, genre_file: bool = False) -> Path:
    folder.mkdir()
    write(
        folder,
        "u.data",
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n\n22\t242\t1\t878887116\n",
    )
    items = _ml100k_item(242, "Kolya (1996)", {5}) + _ml100k_item(
        302, "Misérables, Les (1995)", {8, 12}
    )
    write(folder, "u.item", items, encoding="latin-1")
    if genre_file:
        names = ["unknown", *(f"G{i}" for i in range(1, 19))]
        write(folder, "u.genre", "".join(f"{n}|{i}\n" for i, n in enumerate(names)) + "\n")
    return folder


def movielens_of(path: Path) -> object:
    """Load the MovieLens folder holding `path` (for `raises_at`, which names the file)."""
    return load_movielens(path.parent)


def test_ml100k(tmp_path: Path) -> None:
    dataset = load_movielens(make_ml100k(tmp_path / "ml-100k"))
    assert dataset.ratings.user_ids.tolist() == ["196", "186", "22"]
    assert dataset.ratings.item_ids.tolist() == ["242", "302", "242"]
    assert dataset.ratings.ratings.tolist() == [3.0, 3.0, 1.0]
    assert dataset.ratings.timestamps.tolist() == [881250949, 891717742, 878887116]
    assert dataset.item_texts == {
        "242": "Kolya (1996). Genres: Comedy",
        "302": "Misérables, Les (1995). Genres: Drama, Musical",
    }


def test_ml100k_genre_names_from_u_genre(tmp_path: Path) -> None:
    dataset = load_movielens(make_ml100k(tmp_path / "ml-100k", genre_file=True))
    assert dataset.item_texts["302"] == "Misérables, Les (1995). Genres: G8, G12"


def test_ml100k_bad_rows(tmp_path: Path) -> None:
    folder = make_ml100k(tmp_path / "ml-100k")
    write(folder, "u.data", "196\t242\t3\t881250949\n196\t242\t3\n")
    assert "expected 4 fields" in str(raises_at(folder / "u.data", 2, movielens_of))
    write(folder, "u.data", "196\t242\tfive\t881250949\n")
    assert "rating 'five'" in str(raises_at(folder / "u.data", 1, movielens_of))


def test_ml1m(tmp_path: Path) -> None:
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    write(folder, "ratings.dat", "1::1193::5::978300760\n2::73::3::978302109\n")
    movies = (
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "73::Misérables, Les (1995)::Drama|Musical\n"
    )
    write(folder, "movies.dat", movies, encoding="latin-1")
    write(folder, "users.dat", "1::F::1::10::48067\n")
    dataset = load_movielens(folder)
    assert dataset.ratings.user_ids.tolist() == ["1", "2"]
    assert dataset.ratings.item_ids.tolist() == ["1193", "73"]
    assert dataset.ratings.ratings.tolist() == [5.0, 3.0]
    assert dataset.ratings.timestamps.tolist() == [978300760, 978302109]
    assert dataset.item_texts == {
        "1193": "One Flew Over the Cuckoo's Nest (1975). Genres: Drama",
        "73": "Misérables, Les (1995). Genres: Drama, Musical",
    }
    write(folder, "movies.dat", "1::Title\n", encoding="latin-1")
    err = raises_at(folder / "movies.dat", 1, movielens_of)
    assert "expected 3 fields separated by '::', found 2" in str(err)


def make_ml_latest(folder: Path) -> Path:
    folder.mkdir()
    write(
        folder,
        "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,11,2.5,964981247\n",
    )
    movies = (
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Jumanji (1995),(no genres listed)\n"
    )
    write(folder, "movies.csv", movies)
    return folder


def test_ml_latest(tmp_path: Path) -> None:
    dataset = load_movielens(make_ml_latest(tmp_path / "ml-latest-small"))
    assert dataset.ratings.item_ids.tolist() == ["1", "11"]
    assert dataset.ratings.ratings.tolist() == [4.0, 2.5]
    assert dataset.ratings.timestamps.tolist() == [964982703, 964981247]
    assert dataset.item_texts == {
        "1": "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy",
        "11": "American President, The (1995). Genres: Comedy, Drama, Romance",
        "2": "Jumanji (1995)",
    }


def test_not_a_movielens_folder(tmp_path: Path) -> None:
    write(tmp_path, "notes.txt", "hi")
    message = str(raises_at(tmp_path, None, load_movielens))
    assert "u.data + u.item" in message
    assert "ratings.dat + movies.dat" in message
    assert "ratings.csv + movies.csv" in message
    assert "found notes.txt" in message


def test_movielens_folder_missing_items_file(tmp_path: Path) -> None:
    write(tmp_path, "ratings.dat", "1::1::5::0\n")
    assert "no movies.dat" in str(raises_at(tmp_path, None, load_movielens))


# ----------------------------------------------------------------------------- load_dataset


def test_load_dataset_folder_with_extra_items(tmp_path: Path) -> None:
    folder = make_ml_latest(tmp_path / "ml")
    extra = write(tmp_path, "extra.csv", "movieId,text\n11,A president falls in love.\n500,New\n")
    dataset = load_dataset(folder, extra)
    assert len(dataset.ratings) == 2
    assert dataset.item_texts["11"] == "A president falls in love."
    assert dataset.item_texts["500"] == "New"
    assert dataset.item_texts["1"].startswith("Toy Story (1995)")


def test_load_dataset_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ratings = write(tmp_path, "r.csv", "user,item,rating\nu,a,1\nu,b,2\n")
    items = write(tmp_path, "i.csv", "item,title\na,Apple\n")
    assert load_dataset(ratings).item_texts == {}
    with caplog.at_level(logging.WARNING, logger="bertrec.train.loaders"):
        dataset = load_dataset(ratings, items)
    assert dataset.ratings.item_ids.tolist() == ["a", "b"]
    assert dataset.item_texts == {"a": "Apple"}
    assert "1 of 2 rated items have no text" in caplog.text
