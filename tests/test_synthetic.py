"""The synthetic log generator: sizes, the structure it promises, determinism and its files."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from peftrec.dataset_tools import (
    PrepareConfig,
    load_dataset_folder,
    prepare_dataset,
    read_interactions,
    read_items,
)
from peftrec.dataset_tools.synthetic import (
    MIN_USER_LENGTH,
    START_TIME,
    SyntheticConfig,
    build_catalog,
    generate_sequences,
    write_synthetic_log,
)

COLUMNS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"}


def generate(config: SyntheticConfig, **kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users, items, times = zip(*generate_sequences(config, **kwargs), strict=True)
    return np.concatenate(users), np.concatenate(items), np.concatenate(times)


def top_share(items: np.ndarray, num_items: int) -> float:
    counts = np.sort(np.bincount(items, minlength=num_items))[::-1]
    return counts[: max(1, num_items // 100)].sum() / len(items)


def test_files_are_deterministic_for_a_seed(tmp_path: Path):
    config = SyntheticConfig(num_interactions=20_000, num_items=2_000)
    write_synthetic_log(config, tmp_path / "a")
    write_synthetic_log(config, tmp_path / "b")
    write_synthetic_log(SyntheticConfig(20_000, 2_000, seed=1), tmp_path / "c")
    for name in ("interactions.tsv", "items.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    log = (tmp_path / "a" / "interactions.tsv").read_bytes()
    assert log != (tmp_path / "c" / "interactions.tsv").read_bytes()


def test_output_does_not_depend_on_chunk_size():
    config = SyntheticConfig(num_interactions=30_000, num_items=3_000, seed=3)
    whole, small = generate(config), generate(config, chunk_interactions=1_000)
    for a, b in zip(whole, small, strict=True):
        np.testing.assert_array_equal(a, b)
    chunks = list(generate_sequences(config, chunk_interactions=1_000))
    assert len(chunks) > 20 and max(len(c[0]) for c in chunks) < 5_000


@pytest.mark.parametrize("target", [20_000, 200_000])
def test_requested_sizes(target: int):
    config = SyntheticConfig(num_interactions=target, num_items=target // 10)
    users, items, _ = generate(config)
    assert abs(len(items) - target) <= 0.02 * target
    assert items.min() >= 0 and items.max() < config.num_items
    per_user = np.bincount(users)
    assert len(per_user) == config.num_users == target // 50
    assert per_user.min() >= MIN_USER_LENGTH
    assert per_user.max() > 10 * np.median(per_user)  # heavy-tailed activity


def test_popularity_is_zipf_like_and_follows_the_exponent():
    shares = [
        top_share(generate(SyntheticConfig(100_000, 10_000, zipf_exponent=s))[1], 10_000)
        for s in (0.7, 1.1, 1.5)
    ]
    assert shares[1] > 0.15
    assert shares[0] < shares[1] < shares[2]


@pytest.mark.parametrize("follow", [0.0, 0.4, 0.7, 0.95])
def test_next_item_is_a_successor_with_follow_probability(follow: float):
    config = SyntheticConfig(100_000, 20_000, follow_probability=follow, seed=5)
    users, items, _ = generate(config)
    successors = build_catalog(config).successors
    assert not (successors == np.arange(config.num_items)[:, None]).any()
    within = users[1:] == users[:-1]
    is_successor = (successors[items[:-1]] == items[1:, None]).any(axis=1)
    assert abs(is_successor[within].mean() - follow) < 0.1


def test_successors_are_mostly_in_the_same_topic():
    catalog = build_catalog(SyntheticConfig(10_000, 5_000))
    same = catalog.topic[catalog.successors] == catalog.topic[:, None]
    assert 0.7 < same.mean() < 0.95


def test_timestamps_rise_per_user_with_session_gaps():
    config = SyntheticConfig(50_000, 5_000, session_gap=7_200)
    users, _, times = generate(config)
    assert times.dtype == np.int64 and times.min() >= START_TIME
    within = users[1:] == users[:-1]
    gaps = np.diff(times)[within]
    assert gaps.min() >= 0
    sessions = gaps >= config.session_gap // 2
    assert 0.05 < sessions.mean() < 0.3  # about one interaction in seven opens a session
    assert gaps[sessions].max() <= 1.5 * config.session_gap
    assert np.median(gaps[~sessions]) < 600  # seconds to minutes inside a session


def test_files_read_and_prepare(tmp_path: Path):
    config = SyntheticConfig(num_interactions=20_000, num_items=2_000, num_topics=10)
    stats = write_synthetic_log(config, tmp_path / "log")
    inter, items_file = tmp_path / "log" / "interactions.tsv", tmp_path / "log" / "items.tsv"
    assert stats["interactions"] == 20_000 and stats["users"] == 400
    assert stats["bytes"] == inter.stat().st_size + items_file.stat().st_size
    df = read_interactions(inter, "tsv", **COLUMNS)
    assert len(df) == 20_000 and df["user"].nunique() == 400
    assert df["item"].nunique() == stats["items_used"]
    items = read_items(items_file, "tsv", item_col="item_id")
    assert len(items) == 2_000 and list(items.columns) == ["item", "title", "genre"]
    assert items["title"].iloc[7].endswith(" 000007") and items["genre"].nunique() == 10
    folder = prepare_dataset(inter, "tsv", tmp_path / "prepared", PrepareConfig(k_core=2),
                             items_path=items_file, **COLUMNS)
    data = load_dataset_folder(folder)
    stats = data.info["statistics"]  # repeated user-item pairs are deduplicated
    assert data.num_users > 350 and 10_000 < stats["interactions"] < 20_000


@pytest.mark.parametrize("field, value", [
    ("num_interactions", 0), ("num_items", 1), ("num_users", 10_000), ("zipf_exponent", -1.0),
    ("num_topics", 5_000), ("session_gap", 0), ("follow_probability", 1.5), ("seed", -1),
    ("num_items", 2.5), ("zipf_exponent", float("nan")),
])
def test_bad_config_names_the_field(field: str, value: object):
    settings = {"num_interactions": 20_000, "num_items": 2_000, field: value}
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**settings)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = Path(__file__).resolve().parents[1] / "scripts" / "generate_synthetic.py"
    spec = importlib.util.spec_from_file_location("generate_synthetic_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--interactions", "5000", "--items", "500", "--output-dir", str(tmp_path / "o")]
    cli.run_main(cli.main, args)
    assert re.search(r"interactions +5,000\n", capsys.readouterr().out)
    assert (tmp_path / "o" / "items.tsv").is_file()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(cli.main, [*args[:-2], "--users", "2000", "--output-dir", str(tmp_path / "p")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: num_users=2000") and "Traceback" not in err
    assert not (tmp_path / "p").exists()
