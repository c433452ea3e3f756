"""A deterministic synthetic catalogue where text genuinely predicts taste.

Users have latent tastes over genres; items have genre mixtures, a hidden quality and a
long-tailed popularity. An item's description is written from its genres' vocabulary (and hints
at its quality), so a text encoder can place an unseen item near items of the same kind.
Which items a user rates depends on taste and popularity (missing not at random), and the
rating depends on taste, quality and the user's leniency; short reviews echo the rating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bertrec.train.dataset import Dataset, Ratings

GENRES: dict[str, list[str]] = {
    "science fiction": [
        "galaxy",
        "starship",
        "alien",
        "robot",
        "planet",
        "orbit",
        "astronaut",
        "laser",
        "cosmic",
        "android",
        "spaceship",
        "wormhole",
        "colony",
        "cyborg",
        "asteroid",
    ],
    "romance": [
        "love",
        "wedding",
        "heart",
        "romance",
        "kiss",
        "couple",
        "passion",
        "bride",
        "sweetheart",
        "affair",
        "proposal",
        "valentine",
        "longing",
        "lovers",
        "honeymoon",
    ],
    "crime": [
        "detective",
        "murder",
        "heist",
        "gangster",
        "clue",
        "police",
        "suspect",
        "robbery",
        "mafia",
        "investigation",
        "witness",
        "smuggler",
        "verdict",
        "alibi",
        "corruption",
    ],
    "horror": [
        "ghost",
        "haunted",
        "vampire",
        "zombie",
        "terror",
        "curse",
        "blood",
        "demon",
        "nightmare",
        "monster",
        "graveyard",
        "possessed",
        "scream",
        "witch",
        "creepy",
    ],
    "comedy": [
        "hilarious",
        "prank",
        "silly",
        "comedy",
        "laugh",
        "awkward",
        "jokes",
        "goofy",
        "slapstick",
        "parody",
        "roommate",
        "mishap",
        "sitcom",
        "absurd",
        "witty",
    ],
    "fantasy": [
        "dragon",
        "wizard",
        "kingdom",
        "magic",
        "sword",
        "elf",
        "quest",
        "sorcerer",
        "enchanted",
        "castle",
        "prophecy",
        "knight",
        "spell",
        "unicorn",
        "realm",
    ],
    "history": [
        "history",
        "war",
        "biography",
        "archive",
        "ancient",
        "empire",
        "revolution",
        "battlefield",
        "soldier",
        "dynasty",
        "century",
        "treaty",
        "monarch",
        "pharaoh",
        "medieval",
    ],
    "family": [
        "animated",
        "kids",
        "family",
        "puppy",
        "friendship",
        "cartoon",
        "toys",
        "school",
        "grandma",
        "playful",
        "holiday",
        "kitten",
        "birthday",
        "fairy",
        "cheerful",
    ],
    "sports": [
        "football",
        "coach",
        "championship",
        "stadium",
        "athlete",
        "boxing",
        "tournament",
        "marathon",
        "basketball",
        "underdog",
        "league",
        "olympic",
        "training",
        "team",
        "victory",
    ],
    "music": [
        "band",
        "concert",
        "guitar",
        "singer",
        "album",
        "jazz",
        "orchestra",
        "rock",
        "melody",
        "drummer",
        "tour",
        "piano",
        "rapper",
        "festival",
        "songwriter",
    ],
}
FILLER = ["story", "tale", "film", "journey", "world", "life", "secret", "night", "city", "days"]
ADJECTIVES = ["dark", "bright", "quiet", "wild", "strange", "lost", "last", "golden", "hidden"]
QUALITY_HINTS = {
    "high": ["critically acclaimed", "award-winning", "a modern classic", "beautifully made"],
    "mid": ["well made", "solid", "entertaining", "competent"],
    "low": ["forgettable", "clumsy", "poorly made", "a cheap production"],
}
SENTIMENT = {
    5: [
        "absolutely loved it",
        "a masterpiece",
        "one of my favourites",
        "brilliant from start to end",
    ],
    4: ["really enjoyed it", "very good", "well worth watching", "great fun"],
    3: ["it was okay", "decent but not special", "mixed feelings", "average at best"],
    2: ["disappointing", "not for me", "rather dull", "hard to sit through"],
    1: ["terrible", "a waste of time", "awful", "I hated it"],
}


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 1500
    n_items: int = 1200
    mean_ratings_per_user: float = 30.0
    taste_concentration: float = 0.3  # Dirichlet alpha: lower = users with narrower tastes
    genre_concentration: float = 0.25  # Dirichlet alpha: lower = items with fewer genres
    selection_taste: float = 3.0  # how strongly taste drives which items get rated (MNAR)
    popularity_exponent: float = 1.0  # long tail of item popularity
    review_fraction: float = 0.6  # share of ratings that come with a review
    seed: int = 7


@dataclass(frozen=True)
class SyntheticTruth:
    """The hidden generative state, for tests and diagnostics."""

    user_taste: np.ndarray  # (n_users, n_genres)
    item_genres: np.ndarray  # (n_items, n_genres)
    item_quality: np.ndarray  # (n_items,)
    item_popularity: np.ndarray  # (n_items,)


def generate(config: SyntheticConfig = SyntheticConfig()) -> tuple[Dataset, SyntheticTruth]:
    """Generate ratings, reviews and item texts; the same config always gives the same data."""
    rng = np.random.default_rng(config.seed)
    n_genres = len(GENRES)
    taste = rng.dirichlet(np.full(n_genres, config.taste_concentration), size=config.n_users)
    genres = rng.dirichlet(np.full(n_genres, config.genre_concentration), size=config.n_items)
    quality = rng.normal(0.0, 0.45, size=config.n_items)
    popularity = rng.pareto(1.2, size=config.n_items) + 1.0
    leniency = rng.normal(0.0, 0.35, size=config.n_users)
    # Affinity in [-1, 1]-ish: how much of the item's genre mass the user likes, centred.
    affinity = np.clip(n_genres * (taste @ genres.T) - 1.0, -1.0, 3.0) / 1.5

    counts = np.clip(
        rng.lognormal(np.log(config.mean_ratings_per_user) - 0.3, 0.8, size=config.n_users),
        5,
        config.n_items // 3,
    ).astype(int)
    logits = (
        config.popularity_exponent * np.log(popularity)[None, :] + config.selection_taste * affinity
    )
    gumbel = rng.gumbel(size=logits.shape)
    order = np.argsort(-(logits + gumbel), axis=1)  # Gumbel top-k = sampling without replacement
    users = np.repeat(np.arange(config.n_users), counts)
    items = np.concatenate([order[u, : counts[u]] for u in range(config.n_users)])

    raw = 2.75 + leniency[users] + quality[items] + 1.1 * affinity[users, items]
    raw += rng.normal(0.0, 0.55, size=len(users))
    stars = np.clip(np.rint(raw), 1, 5).astype(int)

    item_texts = [_describe(rng, genres[i], quality[i]) for i in range(config.n_items)]
    has_review = rng.random(len(users)) < config.review_fraction
    reviews = [
        _review(rng, genres[i], int(s)) if keep else ""
        for i, s, keep in zip(items, stars, has_review, strict=True)
    ]
    timestamps = 1_600_000_000 + rng.integers(0, 86_400 * 365, size=len(users))
    ratings = Ratings.from_columns(
        user_ids=[f"u{u:05d}" for u in users],
        item_ids=[f"i{i:05d}" for i in items],
        ratings=stars.astype(np.float32).tolist(),
        reviews=reviews,
        timestamps=timestamps.tolist(),
    )
    texts = {f"i{i:05d}": t for i, t in enumerate(item_texts)}
    truth = SyntheticTruth(taste, genres, quality, popularity)
    return Dataset(ratings=ratings, item_texts=texts), truth


def _pick_words(rng: np.random.Generator, mix: np.ndarray, n: int) -> list[str]:
    names = list(GENRES)
    topics = rng.choice(len(names), size=n, p=mix)
    return [str(rng.choice(GENRES[names[t]])) for t in topics]


def _describe(rng: np.random.Generator, mix: np.ndarray, quality: float) -> str:
    names = list(GENRES)
    main = names[int(np.argmax(mix))]
    words = _pick_words(rng, mix, int(rng.integers(6, 14)))
    title = f"The {rng.choice(ADJECTIVES).title()} {words[0].title()}"
    tier = "high" if quality > 0.35 else "low" if quality < -0.35 else "mid"
    hint = str(rng.choice(QUALITY_HINTS[tier])) if rng.random() < 0.7 else "a"
    half = len(words) // 2
    return (
        f"{title}. A {main} {rng.choice(FILLER)} about {', '.join(words[1:half])} "
        f"and {words[half]}. Expect {', '.join(words[half + 1 :])}. "
        f"Critics call it {hint} {main} {rng.choice(FILLER)}."
    )


def _review(rng: np.random.Generator, mix: np.ndarray, stars: int) -> str:
    feeling = str(rng.choice(SENTIMENT[stars]))
    topic = ", ".join(_pick_words(rng, mix, 2))
    verdict = "great" if stars >= 4 else "meh" if stars == 3 else "bad"
    return f"{feeling.capitalize()}. The {topic} part was {verdict}."
