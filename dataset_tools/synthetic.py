"""Synthetic interaction logs with known structure, at any size up to tens of millions of rows.

Real logs cannot be scaled at will and their structure is unknown; a generator whose
popularity skew, sequential dependency and session rhythm are set by parameters lets us
benchmark the pipeline at 10M interactions and check that models learn what is there.

The process:
- items get a Zipf popularity (over a random permutation of ids) and one of ``num_topics``
  topics; each item has ``SUCCESSORS`` fixed successor items: the next item of its topic in a
  fixed cyclic order (like the next episode of a series) and popularity draws, mostly from
  its own topic;
- each user has a heavy-tailed (lognormal) sequence length of at least ``MIN_USER_LENGTH``,
  scaled so that the lengths sum exactly to ``num_interactions``, and 1-3 preferred topics;
- each next item is, with ``follow_probability``, a successor of the previous item, otherwise a
  popularity draw from one of the user's preferred topics (or, less often, from all items);
- timestamps advance by seconds to minutes within a session and by about ``session_gap``
  between sessions, from a per-user start in 2020.

Every per-interaction random number is a hash of (seed, stream, global interaction index),
so the output is identical for any chunk size, and chunks are generated level by level with
numpy (no per-interaction Python loop).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from .atomic import atomic_directory

MIN_USER_LENGTH = 5
SUCCESSORS = 3  # fixed successor items per item
START_TIME = 1_577_836_800  # 2020-01-01 00:00:00 UTC
INTERACTIONS_FILE = "interactions.tsv"
ITEMS_FILE = "items.tsv"

_LENGTH_SIGMA = 1.2  # lognormal sigma of user sequence lengths (heavy tail)
_SAME_TOPIC_SUCCESSOR = 0.8  # share of successors taken from the item's own topic
_PREFERRED_TOPIC_SHARE = 0.8  # share of fresh draws taken from the user's preferred topics
_SESSION_BREAK = 0.15  # probability that an interaction starts a new session
_IN_SESSION_MEAN_GAP = 90.0  # seconds between interactions of one session (exponential)
_START_SPREAD = 365 * 86_400  # users start uniformly within the first year
_CHUNK_INTERACTIONS = 1 << 18  # default chunk: bounds memory to tens of MB
_WORDS_PER_TOPIC = 8

_GENRES = (
    "ambient", "baroque", "bluegrass", "cyberpunk", "documentary", "drama", "dystopia",
    "fantasy", "folk", "gardening", "gothic", "history", "horror", "jazz", "kids", "mystery",
    "noir", "opera", "poetry", "punk", "reggae", "romance", "satire", "science", "soul",
    "space", "sports", "thriller", "travel", "western",
)
_TITLE_WORDS = (
    "amber", "anchor", "arrow", "autumn", "bell", "blue", "breeze", "bridge", "canyon",
    "castle", "cedar", "cinder", "cloud", "comet", "copper", "coral", "crown", "crystal",
    "dawn", "desert", "dream", "echo", "ember", "falcon", "feather", "fire", "forest",
    "frost", "garden", "ghost", "glass", "golden", "harbor", "hollow", "horizon", "iron",
    "island", "ivory", "jade", "lantern", "legend", "light", "lotus", "lunar", "marble",
    "meadow", "midnight", "mirror", "mist", "moon", "mountain", "night", "ocean", "orbit",
    "paper", "phantom", "pine", "prism", "quantum", "quiet", "rain", "raven", "river",
    "ruby", "sapphire", "secret", "shadow", "silver", "sky", "snow", "solar", "spark",
    "spirit", "star", "stone", "storm", "summer", "thunder", "tide", "valley", "velvet",
    "violet", "wander", "whisper", "wild", "willow", "winter", "wolf",
)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Hash streams: one independent uniform per interaction and purpose.
_FOLLOW, _ITEM, _TOPIC, _BREAK, _GAP = range(5)


# Upper bounds: item indices are int32, timestamps 64-bit integers (the seed has none:
# numpy's SeedSequence takes any non-negative integer).
_LIMITS = {"num_interactions": 2**40, "num_users": 2**40, "num_items": 2**31 - 1,
           "num_topics": 2**31 - 1, "session_gap": 2**31 - 1}


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of a synthetic log; every field is validated on construction."""

    # Each field is a flag of scripts/generate_synthetic.py (its help text, pretraining.cli).
    num_interactions: int = field(metadata={"flag": "interactions",
                                            "help": "total interactions"})
    num_items: int = field(metadata={"flag": "items", "help": "catalog size"})
    num_users: int | None = field(default=None, metadata={
        "flag": "users", "help": "number of users (default: interactions // 50, at least 1)"})
    zipf_exponent: float = field(default=1.1, metadata={  # popularity ~ rank ** -exponent
        "help": "item popularity skew"})
    num_topics: int = field(default=50, metadata={"flag": "topics",
                                                  "help": "item topics (genres)"})
    session_gap: int = field(default=3600 * 6, metadata={
        "help": "seconds, about, between two sessions of a user"})
    follow_probability: float = field(default=0.7, metadata={
        "help": "probability that the next item is a successor of the previous one"})
    seed: int = field(default=0, metadata={"help": "seeds the whole log"})

    def __post_init__(self) -> None:
        if self.num_users is None:
            object.__setattr__(self, "num_users", max(1, _as_int(self, "num_interactions") // 50))
        for name in ("num_interactions", "num_items", "num_users", "num_topics", "session_gap"):
            if _as_int(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")
        if _as_int(self, "seed") < 0:
            raise ValueError(f"seed must be >= 0, not {self.seed!r}")
        for name, limit in _LIMITS.items():
            if getattr(self, name) > limit:
                raise ValueError(f"{name} must be at most {limit:,}, not {getattr(self, name)!r}")
        if self.num_items < 2:
            raise ValueError(
                f"num_items must be >= 2 (an item's successors are other items), "
                f"not {self.num_items}"
            )
        if self.num_topics > self.num_items:
            raise ValueError(
                f"num_topics={self.num_topics} exceeds num_items={self.num_items}; every topic "
                "needs an item, so lower num_topics"
            )
        if self.num_interactions < MIN_USER_LENGTH * self.num_users:
            raise ValueError(
                f"num_users={self.num_users} needs num_interactions >= "
                f"{MIN_USER_LENGTH * self.num_users} (every user has at least {MIN_USER_LENGTH} "
                f"interactions); lower num_users or raise num_interactions"
            )
        exponent = _as_float(self, "zipf_exponent")
        if not 0.0 <= exponent <= 5.0:
            raise ValueError(
                f"zipf_exponent must be within [0, 5] (0: uniform popularity, about 1: "
                f"typical logs), not {self.zipf_exponent!r}"
            )
        if not 0.0 <= _as_float(self, "follow_probability") <= 1.0:
            raise ValueError(
                f"follow_probability must be a probability within [0, 1], "
                f"not {self.follow_probability!r}"
            )


@dataclass
class SyntheticLogFolder:
    """Where scripts/generate_synthetic.py writes the log (a flag, pretraining.cli)."""

    output_dir: Path = field(metadata={"help": "folder to write (replaced atomically)"})


def _as_int(config: SyntheticConfig, name: str) -> int:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    return int(value)


def _as_float(config: SyntheticConfig, name: str) -> float:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class SyntheticCatalog:
    """The item side of the process; tests and oracles use it to check the generated structure.

    ``by_topic`` lists item ids grouped by topic (topic t owns ``by_topic[topic_start[t]:
    topic_start[t + 1]]``) and ``cumulative`` is the running sum of their popularity in that
    order, so one ``searchsorted`` draws by popularity from one topic or from all items.
    """

    topic: np.ndarray  # [num_items] int32 topic of each item
    popularity: np.ndarray  # [num_items] float64, sums to 1
    successors: np.ndarray  # [num_items, SUCCESSORS] int32, never the item itself
    topic_names: tuple[str, ...]
    title_words: np.ndarray  # [num_items, 2] indices into _TITLE_WORDS, from the item's topic
    by_topic: np.ndarray
    cumulative: np.ndarray
    topic_start: np.ndarray  # [num_topics + 1]

    def draw(self, u: np.ndarray, topics: np.ndarray) -> np.ndarray:
        """Items by popularity from ``topics`` (``num_topics`` = all items), one per uniform."""
        n = len(self.by_topic)
        start = np.append(self.topic_start[:-1], 0)[topics]
        end = np.append(self.topic_start[1:], n)[topics]
        prefix = np.concatenate([[0.0], self.cumulative])
        low, high = prefix[start], prefix[end]
        position = np.searchsorted(self.cumulative, low + u * (high - low), side="right")
        return self.by_topic[np.clip(position, start, end - 1)]


def _seeds(config: SyntheticConfig) -> tuple[np.random.Generator, np.random.Generator, np.ndarray]:
    """Independent generators for the catalog and the users, and the per-interaction hash keys.

    The catalog depends only on (seed, num_items, num_topics, zipf_exponent), so logs of
    different sizes drawn with one seed share their items.
    """
    catalog, users, streams = np.random.SeedSequence(config.seed).spawn(3)
    return (np.random.default_rng(catalog), np.random.default_rng(users),
            streams.generate_state(5, np.uint64))


def _uniforms(key: np.uint64, index: np.ndarray) -> np.ndarray:
    """SplitMix64 of the global interaction index: uniforms in [0, 1) independent of chunking."""
    z = index.astype(np.uint64) * _GAMMA + key
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _topic_names(num_topics: int) -> tuple[str, ...]:
    """Genre words, numbered once they run out (``jazz``, ..., ``jazz 2``) so names stay unique."""
    g = len(_GENRES)
    return tuple(_GENRES[t % g] + ("" if t < g else f" {t // g + 1}") for t in range(num_topics))


def build_catalog(config: SyntheticConfig) -> SyntheticCatalog:
    """Item topics, Zipf popularity and fixed successors for ``config`` (deterministic)."""
    rng = _seeds(config)[0]
    n, num_topics = config.num_items, config.num_topics
    topic = (rng.permutation(n) % num_topics).astype(np.int32)  # every topic gets items
    rank = rng.permutation(n).astype(np.float64) + 1.0  # ids are not sorted by popularity
    popularity = rank ** -config.zipf_exponent
    popularity /= popularity.sum()
    by_topic = np.argsort(topic, kind="stable").astype(np.int32)
    topic_start = np.searchsorted(topic[by_topic], np.arange(num_topics + 1)).astype(np.int64)
    vocabulary = np.stack([rng.choice(len(_TITLE_WORDS), _WORDS_PER_TOPIC, replace=False)
                           for _ in range(num_topics)])
    first = rng.integers(0, _WORDS_PER_TOPIC, n)
    second = (first + rng.integers(1, _WORDS_PER_TOPIC, n)) % _WORDS_PER_TOPIC  # a different word
    title_words = vocabulary[topic[:, None], np.stack([first, second], axis=1)]
    catalog = SyntheticCatalog(
        topic=topic, popularity=popularity, successors=np.empty((n, 0), np.int32),
        topic_names=_topic_names(num_topics), title_words=title_words, by_topic=by_topic,
        cumulative=np.cumsum(popularity[by_topic]), topic_start=topic_start,
    )
    same = rng.random((n, SUCCESSORS)) < _SAME_TOPIC_SUCCESSOR
    source = np.where(same, topic[:, None], num_topics)
    successors = catalog.draw(rng.random((n, SUCCESSORS)), source).astype(np.int32)
    following = np.roll(by_topic, -1)  # the next item of its topic, cyclically: a "series"
    following[topic_start[1:] - 1] = by_topic[topic_start[:-1]]
    successors[by_topic, 0] = following
    items = np.arange(n, dtype=np.int32)[:, None]
    successors = np.where(successors == items, (items + 1) % n, successors)
    return replace(catalog, successors=successors)


@dataclass(frozen=True)
class _Users:
    lengths: np.ndarray  # [num_users] int64, sums to num_interactions
    offsets: np.ndarray  # [num_users + 1] global index of each user's first interaction
    topics: np.ndarray  # [num_users, 3] preferred topics; the first ``num_preferred`` count
    num_preferred: np.ndarray  # [num_users] in 1..3
    start: np.ndarray  # [num_users] int64 first timestamp


def _build_users(config: SyntheticConfig, rng: np.random.Generator) -> _Users:
    """Lognormal lengths (min 5) scaled so they sum exactly to ``num_interactions``."""
    u = config.num_users
    raw = rng.lognormal(0.0, _LENGTH_SIGMA, u)
    extra = raw / raw.sum() * (config.num_interactions - MIN_USER_LENGTH * u)
    whole = np.floor(extra)
    missing = config.num_interactions - MIN_USER_LENGTH * u - int(whole.sum())
    if missing:  # hand out the rounding remainder to the largest fractional parts
        whole[np.argsort(extra - whole, kind="stable")[-missing:]] += 1
    lengths = MIN_USER_LENGTH + whole.astype(np.int64)
    return _Users(
        lengths=lengths,
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        topics=rng.integers(0, config.num_topics, (u, 3)),
        num_preferred=rng.integers(1, 4, u),
        start=START_TIME + rng.integers(0, _START_SPREAD, u),
    )


def _chunk(config: SyntheticConfig, catalog: SyntheticCatalog, users: _Users, keys: np.ndarray,
           first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users ``first..last-1``: their items (level by level along successor runs) and times."""
    lengths = users.lengths[first:last]
    user = np.repeat(np.arange(first, last, dtype=np.int64), lengths)
    n = len(user)
    index = np.arange(users.offsets[first], users.offsets[last], dtype=np.int64)
    position = index - users.offsets[user]
    opens = position == 0

    follow = (_uniforms(keys[_FOLLOW], index) < config.follow_probability) & ~opens
    u_item = _uniforms(keys[_ITEM], index)
    u_topic = _uniforms(keys[_TOPIC], index)
    fresh = np.flatnonzero(~follow)
    preferred = u_topic[fresh] < _PREFERRED_TOPIC_SHARE
    count = users.num_preferred[user[fresh]]
    slot = np.minimum((u_topic[fresh] / _PREFERRED_TOPIC_SHARE * count).astype(np.int64),
                      count - 1)
    topics = np.where(preferred, users.topics[user[fresh], slot], config.num_topics)
    items = np.empty(n, np.int32)
    items[fresh] = catalog.draw(u_item[fresh], topics)

    # A run is a fresh draw followed by successor steps; fill depth d from depth d - 1.
    run_start = np.maximum.accumulate(np.where(follow, 0, np.arange(n)))
    depth = np.arange(n) - run_start
    order = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[order], np.arange(1, int(depth.max()) + 2))
    which = np.minimum((u_item * SUCCESSORS).astype(np.int64), SUCCESSORS - 1)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        at = order[lo:hi]
        items[at] = catalog.successors[items[at - 1], which[at]]

    breaks = _uniforms(keys[_BREAK], index) < _SESSION_BREAK
    u_gap = _uniforms(keys[_GAP], index)
    in_session = 1 + np.floor(-_IN_SESSION_MEAN_GAP * np.log1p(-u_gap)).astype(np.int64)
    in_session = np.minimum(in_session, max(1, config.session_gap // 2))
    between = np.rint(config.session_gap * (0.5 + u_gap)).astype(np.int64)
    gap = np.where(opens, 0, np.where(breaks, between, in_session))
    elapsed = np.cumsum(gap)
    elapsed -= np.repeat(elapsed[opens], lengths)
    return user, items.astype(np.int64), users.start[user] + elapsed


def generate_sequences(
    config: SyntheticConfig, chunk_interactions: int = _CHUNK_INTERACTIONS,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (user_ids, item_ids, timestamps) int64 arrays for whole users, in user order.

    A chunk holds about ``chunk_interactions`` rows (more if one user is longer), so memory
    stays bounded at any total size; the concatenated output does not depend on the chunk size.
    """
    if isinstance(chunk_interactions, bool) or not isinstance(chunk_interactions, int) \
            or chunk_interactions < 1:
        raise ValueError(f"chunk_interactions must be an integer >= 1, not {chunk_interactions!r}")
    yield from _generate(config, build_catalog(config), chunk_interactions)


def _generate(config: SyntheticConfig, catalog: SyntheticCatalog, chunk_interactions: int,
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    _, user_rng, keys = _seeds(config)
    users = _build_users(config, user_rng)
    first = 0
    while first < config.num_users:
        target = users.offsets[first] + chunk_interactions
        last = max(first + 1, int(np.searchsorted(users.offsets, target, side="right")) - 1)
        yield _chunk(config, catalog, users, keys, first, last)
        first = last


def _items_table(catalog: SyntheticCatalog) -> pa.Table:
    """Titles of two topic words plus the zero-padded id ("quantum river 000123"), genre = topic."""
    n = len(catalog.topic)
    words = pa.array(_TITLE_WORDS)
    first = words.take(catalog.title_words[:, 0])
    second = words.take(catalog.title_words[:, 1])
    ids = np.arange(n, dtype=np.int64)
    padded = pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), max(6, len(str(n - 1))), "0")
    return pa.table({
        "item_id": ids,
        "title": pc.binary_join_element_wise(first, second, padded, " "),
        "genre": pa.array(catalog.topic_names).take(catalog.topic),
    })


def _write_tsv(path: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> None:
    """Tab-separated, unquoted header (pyarrow would quote it), one table at a time."""
    options = pa_csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with pa.OSFile(str(path), "wb") as sink:
        sink.write("\t".join(schema.names).encode() + b"\n")
        with pa_csv.CSVWriter(sink, schema, write_options=options) as writer:
            for table in tables:
                writer.write_table(table)


def write_synthetic_log(config: SyntheticConfig, output_dir: str | os.PathLike[str]) -> dict:
    """Write ``interactions.tsv`` and ``items.tsv`` into ``output_dir``, replacing it atomically.

    Both files read with ``read_interactions(..., "tsv", user_col="user_id",
    item_col="item_id", time_col="timestamp")`` and ``read_items(..., "tsv",
    item_col="item_id")``. Chunks are streamed to disk, so memory stays bounded. Returns the
    statistics of what was written.
    """
    out = Path(output_dir)
    if out.exists() and not (out.is_dir() and ((out / INTERACTIONS_FILE).is_file()
                                               or not any(out.iterdir()))):
        raise ValueError(
            f"{output_dir}: exists and is not a synthetic log folder (no {INTERACTIONS_FILE}), "
            "and writing would replace it; pick a new folder or remove it first"
        )
    catalog = build_catalog(config)
    used = np.zeros(config.num_items, dtype=bool)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                        ("timestamp", pa.int64())])

    def interaction_tables() -> Iterator[pa.Table]:
        for users, items, times in _generate(config, catalog, _CHUNK_INTERACTIONS):
            used[items] = True
            yield pa.table([users, items, times], schema=schema)

    with atomic_directory(output_dir) as tmp:
        _write_tsv(tmp / INTERACTIONS_FILE, schema, interaction_tables())
        items_table = _items_table(catalog)
        _write_tsv(tmp / ITEMS_FILE, items_table.schema, [items_table])
        size = sum(f.stat().st_size for f in tmp.iterdir())
    return {
        "interactions": config.num_interactions,
        "users": config.num_users,
        "items_used": int(used.sum()),
        "catalog_items": config.num_items,
        "bytes": size,
        "config": {f.name: getattr(config, f.name) for f in fields(config)},
    }
