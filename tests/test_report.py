"""scripts/report.py: one self-contained HTML file plus PNGs from run and sweep folders
(every promised table and figure, the PNGs opened, sized and not blank), the statistics
of a collapsed embedding space (pretraining/model_stats.py) against hand-computed cases,
the embedding / non-embedding parameter split, and bad input as one line, exit status 2."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from peftrec.downstream.report import (
    CURVES_SIZE,
    DPI,
    MAP_PANEL_SIZE,
    MATPLOTLIB_MISSING,
    TRADEOFF_SIZE,
    map_panels,
    pca_axes,
)
from peftrec.pretraining.cli import parse_args, pretrain_parser, run_main
from peftrec.pretraining.model_stats import (
    effective_rank,
    embedding_statistics,
    mean_pairwise_cosine,
    parameter_split,
)
from peftrec.pretraining.pipeline import pretrain
from tests.helpers import MODEL, TRAIN, finetune, load_script

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

SECTIONS = ("results", "curves", "parameters", "item-maps", "embedding-statistics")
TABLES = ("results-table", "parameters-table", "statistics-table")


def report_cli(argv: list[str]) -> None:
    run_main(load_script("report").main, argv)


@pytest.fixture(scope="module")
def sweep(tiny_dataset_dir, target_dir, text_base, tmp_path_factory) -> tuple[Path, Path]:
    """(a sweep folder, the encoder cache): an ID and a text pretraining run, a Houlsby
    adapter run on the text one, and an unfinished run (config.json only), at several
    depths."""
    root = tmp_path_factory.mktemp("report") / "sweep"
    text_run, cache = text_base
    shutil.copytree(text_run, root / "pretraining" / "text")
    pretrain(parse_args(pretrain_parser("t"), [
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(root / "pretraining" / "id"),
        "--epochs", "2", *MODEL, *TRAIN]))
    finetune(("houlsby",), "--pretrained", str(text_run), "--dataset", str(target_dir),
             "--output-dir", str(root / "adapters" / "houlsby" / "seed0"), "--epochs", "2",
             "--layers", "top:1", "--encoder-cache-dir", str(cache))
    unfinished = root / "adapters" / "houlsby" / "seed1"
    unfinished.mkdir(parents=True)
    shutil.copy(root / "adapters" / "houlsby" / "seed0" / "config.json", unfinished)
    return root, cache


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory) -> Path:
    root, cache = sweep
    output = tmp_path_factory.mktemp("report_out") / "report"
    report_cli([str(root), "--output-dir", str(output), "--encoder-cache-dir", str(cache)])
    return output


class Tables(HTMLParser):
    """The tables of an HTML page (id -> rows of cell texts, the header first) and its
    images (data URI, data-file)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[tuple[str, str]] = []
        self.ids: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "table":
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append((attrs["src"], attrs["data-file"]))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None


def rows_by_run(table: list[list[str]]) -> dict[str, dict[str, str]]:
    header, *rows = table
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_the_report_holds_every_table_and_figure(report, sweep):
    root, _ = sweep
    page = (report / "report.html").read_text()
    parsed = Tables(page)
    assert set(SECTIONS) <= set(parsed.ids) and set(TABLES) <= set(parsed.tables)
    # Self-contained: nothing is fetched (no src or href other than data URIs).
    assert not re.search(r'(src|href)="(?!data:)', page)
    runs = {"sweep/pretraining/id", "sweep/pretraining/text", "sweep/adapters/houlsby/seed0"}
    results = rows_by_run(parsed.tables["results-table"])
    assert set(results) == runs  # the unfinished run is left out, and named
    assert "adapters/houlsby/seed1: unfinished" in page
    metrics = json.loads((root / "adapters/houlsby/seed0/metrics.json").read_text())
    adapter = results["sweep/adapters/houlsby/seed0"]
    assert adapter["method"] == "houlsby" and adapter["epochs"] == "2"
    assert adapter["test ndcg@10"] == f"{metrics['test']['ndcg@10']:.4f}"
    assert results["sweep/pretraining/id"]["method"] == "pretraining"

    # Parameters: the recorded trainable/total, split into embedding and non-embedding.
    parameters = rows_by_run(parsed.tables["parameters-table"])
    for run in runs:
        row = parameters[run]
        assert number(row["embedding"]) + number(row["non-embedding"]) == number(row["total"])
        assert number(row["trainable embedding"]) + number(row["trainable non-embedding"]) \
            == number(row["trainable"])
    row = parameters["sweep/adapters/houlsby/seed0"]
    assert number(row["trainable"]) == metrics["parameters"]["trainable"] < number(row["total"])
    assert number(row["trainable embedding"]) == 0  # the adapters only, no table
    # ID SASRec: the item table (41 rows of 16) and the positions (20 x 16) are embeddings.
    id_row = parameters["sweep/pretraining/id"]
    items = json.loads((root / "pretraining/id/config.json").read_text())["model"]["num_items"]
    assert number(id_row["embedding"]) == (items + 1) * 16 + 20 * 16

    statistics = rows_by_run(parsed.tables["statistics-table"])
    assert set(statistics) == runs
    assert all(1 <= number(row["effective rank"]) <= number(row["width"]) == 16
               for row in statistics.values())

    # Figures: each embedded image is also a file beside the page; opened, sized, not blank.
    expected = {"curves.png": CURVES_SIZE, "ndcg-vs-trainable.png": TRADEOFF_SIZE,
                **{f"items-{run.replace('/', '-')}.png":
                   (MAP_PANEL_SIZE[0] * map_panels(), MAP_PANEL_SIZE[1]) for run in runs}}
    embedded = {name: src for src, name in parsed.images}
    assert set(embedded) == set(expected)
    assert {path.name for path in report.iterdir()} == {*expected, "report.html"}
    for name, (width, height) in expected.items():
        png = (report / name).read_bytes()
        assert embedded[name] == "data:image/png;base64," + base64.b64encode(png).decode()
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG"
            assert image.size == (int(width * DPI), int(height * DPI))
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is None or len(colours) > 20, f"{name} is (nearly) blank"


def test_effective_rank_is_1_for_identical_vectors_and_full_for_orthonormal_ones():
    identical = torch.tensor([[0.3, -1.2, 2.0, 0.5]]).repeat(50, 1)
    stats = embedding_statistics(identical)
    assert stats.effective_rank == pytest.approx(1.0, abs=1e-6)
    assert stats.mean_cosine == pytest.approx(1.0, abs=1e-6)
    assert stats.norm_std == pytest.approx(0.0, abs=1e-6)
    assert stats.norm_mean == pytest.approx(float(identical[0].norm()), rel=1e-6)

    orthonormal = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator()
                                              .manual_seed(0)))[0][:, :8].T  # 8 rows in 16-d
    stats = embedding_statistics(orthonormal)
    assert stats.effective_rank == pytest.approx(8.0, abs=1e-6)
    assert stats.mean_cosine == pytest.approx(0.0, abs=1e-6)
    assert (stats.norm_min, stats.norm_max) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert effective_rank(torch.eye(5) * 3.0) == pytest.approx(5.0, abs=1e-6)  # any scale


def test_the_statistics_match_hand_computed_values(monkeypatch):
    # Singular values 3 and 1: shares 3/4 and 1/4, entropy -(.75 ln .75 + .25 ln .25).
    assert effective_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]])) == pytest.approx(
        1.7548, abs=1e-4)
    # Cosines of the pairs: 0, 1/sqrt(2), 1/sqrt(2); a zero vector has cosine 0 with all.
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert mean_pairwise_cosine(vectors) == pytest.approx(2 ** 0.5 / 3, abs=1e-6)
    assert mean_pairwise_cosine(torch.cat([vectors, torch.zeros(1, 2)])) == pytest.approx(
        2 * 2 ** -0.5 / 6, abs=1e-6)
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    stats = embedding_statistics(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    assert (stats.norm_mean, stats.norm_std, stats.norm_min, stats.norm_max) == pytest.approx(
        (3.0, 2.0, 1.0, 5.0))
    assert stats.norm_cv == pytest.approx(2 / 3)
    # Summed over chunks of rows, the same numbers as in one piece.
    many = torch.randn(100, 6, generator=torch.Generator().manual_seed(1))
    whole = embedding_statistics(many)
    monkeypatch.setattr("peftrec.pretraining.model_stats.CHUNK_ROWS", 7)
    assert embedding_statistics(many).to_dict() == pytest.approx(whole.to_dict(), rel=1e-9)


def test_the_pca_map_axes_are_the_directions_of_largest_spread():
    generator = torch.Generator().manual_seed(2)
    spread = torch.randn(500, 3, generator=generator) * torch.tensor([0.1, 5.0, 1.0])
    vectors = (spread + torch.tensor([3.0, -1.0, 2.0])).numpy()
    for chunk_rows in (7, 1000):  # summed over chunks or in one piece
        mean, axes = pca_axes(vectors, chunk_rows)
        assert mean == pytest.approx([3.0, -1.0, 2.0], abs=0.5)
        assert abs(axes[:, 0]) == pytest.approx([0, 1, 0], abs=0.02)
        assert abs(axes[:, 1]) == pytest.approx([0, 0, 1], abs=0.02)


def test_embedding_parameters_are_the_embedding_tables_and_the_per_item_ones():
    from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender

    backbone = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16,
                "max_len": 5}
    model = SequentialRecommender(RecommenderConfig(num_items=30, backbone_config=backbone))
    split = parameter_split(model)
    total = sum(p.numel() for p in model.parameters())
    assert split["embedding"] == 31 * 8 + 5 * 8  # item table (with padding) + positions
    assert split["non_embedding"] == total - split["embedding"]
    assert split["trainable"] == split["total"] == total
    model.item_encoder.requires_grad_(False)
    split = parameter_split(model)
    assert (split["trainable_embedding"], split["trainable"]) == (5 * 8, total - 31 * 8)
    # DiffRec's item bias is per item: an embedding parameter.
    diffrec = SequentialRecommender(RecommenderConfig(
        num_items=30, backbone="diffrec", backbone_config={**backbone, "num_steps": 10}))
    assert parameter_split(diffrec)["embedding"] == 31 * 8 + 31 + 5 * 8


def test_an_older_run_folder_is_read_and_models_can_be_left_out(sweep, tmp_path):
    root, cache = sweep
    old = tmp_path / "old-run"
    shutil.copytree(root / "pretraining" / "id", old)
    # metrics.json and log.jsonl as the first peftrec wrote them: no parameters, no
    # checkpoint size; no learning rate or skipped steps per epoch.
    metrics = json.loads((old / "metrics.json").read_text())
    (old / "metrics.json").write_text(json.dumps(
        {key: metrics[key] for key in ("valid", "test", "protocol", "training")}))
    rows = [json.loads(line) for line in (old / "log.jsonl").read_text().splitlines()]
    (old / "log.jsonl").write_text("".join(json.dumps(
        {key: row[key] for key in ("epoch", "step", "train_loss", "valid")}) + "\n"
        for row in rows))
    report_cli([str(old), "--output-dir", str(tmp_path / "out")])
    parsed = Tables((tmp_path / "out" / "report.html").read_text())
    row = rows_by_run(parsed.tables["parameters-table"])["old-run"]
    assert number(row["trainable"]) == number(row["total"]) == metrics["parameters"]["total"]

    report_cli([str(old), "--output-dir", str(tmp_path / "no-models"), "--no-models"])
    page = (tmp_path / "no-models" / "report.html").read_text()
    assert "--no-models: item maps" in page and "statistics-table" not in page
    assert sorted(p.name for p in (tmp_path / "no-models").iterdir()) == [
        "curves.png", "report.html"]


@pytest.mark.parametrize("case, message", [
    ("empty", "is not a run folder (no config.json and metrics.json) and holds none below it"),
    ("missing", "no such folder"),
    ("unfinished", "is an unfinished run (config.json but no metrics.json)"),
    ("checkpoint", "is a checkpoint folder, not a run folder; pass the run folder"),
    ("no-dataset", "config.json: no 'dataset.path'; a run folder of another schema"),
    ("no-test", "metrics.json: no 'test.ndcg@10'"),
    ("bad-log", "log.jsonl line 3: not valid JSON"),
    ("field", "--color-field 'colour': not a column of the item table"),
    ("no-matplotlib", MATPLOTLIB_MISSING),
])
def test_bad_input_is_one_line_and_exit_status_2(sweep, case, message, tmp_path, capsys,
                                                 monkeypatch):
    root, cache = sweep
    run = tmp_path / "run"
    shutil.copytree(root / "pretraining" / "id", run)
    argv = [str(run)]
    if case == "empty":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        argv = [str(tmp_path / "empty")]
    elif case == "missing":
        argv = [str(tmp_path / "nowhere")]
    elif case == "unfinished":
        (run / "metrics.json").unlink()
    elif case == "checkpoint":
        argv = [str(run / "best_model")]
    elif case == "no-dataset":
        config = json.loads((run / "config.json").read_text())
        del config["dataset"]
        (run / "config.json").write_text(json.dumps(config))
    elif case == "no-test":
        metrics = json.loads((run / "metrics.json").read_text())
        del metrics["test"]
        (run / "metrics.json").write_text(json.dumps(metrics))
    elif case == "bad-log":
        with (run / "log.jsonl").open("a") as log:
            log.write("{not json\n")
    elif case == "field":
        argv += ["--color-field", "colour"]
    elif case == "no-matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        report_cli([*argv, "--output-dir", str(output)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: ")
    assert message in error
    if case in ("empty", "missing", "checkpoint"):
        assert str(argv[0]) in error  # names the folder
    assert not output.exists()
