"""Item content: Amazon/MIND readers, item text templates, the LMDB image store and its CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from peftrec.dataset_tools import DataError, images, load_dataset_folder, resolve_dataset
from peftrec.dataset_tools.images import ImageStore, build_image_store
from peftrec.dataset_tools.item_text import (
    HISTORY_OFFSET_S,
    ItemTextTemplate,
    default_template,
    read_amazon_metadata,
    read_amazon_reviews,
    read_mind_behaviors,
    read_mind_news,
)
from tests.helpers import load_script

COLORS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 210)}


# ---------------------------------------------------------------- readers


def test_amazon_metadata_json_and_python_literal_lines(tmp_path: Path):
    path = tmp_path / "meta.json"
    lines = [
        json.dumps({"asin": "B01", "title": "Tutu", "brand": "Coxlist",
                    "category": ["Clothing", "Girls"], "description": ["Pink.", "Soft."]}),
        "",
        repr({"asin": "0000031852", "title": "Girls' Ballet Tutu", "price": 3.17,
              "categories": [["Sports & Outdoors", "Dance"], ["Sports & Outdoors", "Ballet"]],
              "description": "A tutu.", "salesRank": {"Toys & Games": 211836}}),
        json.dumps({"asin": "B01", "title": "repeated product, first record wins"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    df = read_amazon_metadata(path)
    assert list(df.columns) == ["item", "title", "brand", "categories", "description"]
    assert df["item"].tolist() == ["B01", "0000031852"]
    first, second = df.to_dict("records")
    assert first == {"item": "B01", "title": "Tutu", "brand": "Coxlist",
                     "categories": "Clothing, Girls", "description": "Pink. Soft."}
    assert second["title"] == "Girls' Ballet Tutu" and second["brand"] == ""
    assert second["categories"] == "Sports & Outdoors, Dance, Ballet"
    assert second["description"] == "A tutu."

    path.write_text(lines[0] + "\n{'asin': 'B02', 'title': \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^meta.json line 2: neither JSON nor a Python literal"):
        read_amazon_metadata(path)
    path.write_bytes(lines[0].encode() + b"\n{'asin': '\xff'}\n")
    with pytest.raises(DataError, match=r"^meta.json line 2: cannot read the file"):
        read_amazon_metadata(path)
    path.write_text(lines[0] + "\n" + json.dumps({"title": "no asin"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^meta.json line 2: no 'asin' field"):
        read_amazon_metadata(path)


def test_amazon_reviews(tmp_path: Path):
    path = tmp_path / "Books_5.json"
    reviews = [
        {"reviewerID": "A2SU", "asin": "0000013714", "reviewerName": "J. McDonald",
         "helpful": [2, 3], "reviewText": "Great.", "overall": 5.0, "summary": "Heavenly",
         "unixReviewTime": 1252800000, "reviewTime": "09 13, 2009"},
        {"reviewerID": "AFV2", "asin": "0000013714", "overall": 4.0, "unixReviewTime": 1357344000},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in reviews), encoding="utf-8")
    df = read_amazon_reviews(path)
    assert list(df.columns) == ["user", "item", "timestamp", "rating", "line"]
    assert df["user"].tolist() == ["A2SU", "AFV2"]
    assert df["timestamp"].tolist() == [1252800000, 1357344000]
    assert df["rating"].tolist() == [5.0, 4.0] and df["line"].tolist() == [1, 2]
    packed = tmp_path / "Books_5.json.gz"  # the dumps ship gzip-compressed
    packed.write_bytes(gzip.compress(path.read_bytes()))
    pd.testing.assert_frame_equal(read_amazon_reviews(packed), df)

    unrated = [{k: v for k, v in r.items() if k != "overall"} for r in reviews]
    path.write_text("".join(json.dumps(r) + "\n" for r in unrated), encoding="utf-8")
    assert list(read_amazon_reviews(path).columns) == ["user", "item", "timestamp", "line"]
    path.write_text(json.dumps(reviews[0]) + "\n" + json.dumps(unrated[1]) + "\n")
    with pytest.raises(DataError, match=r"^Books_5.json line 2: no 'overall' rating"):
        read_amazon_reviews(path)
    path.write_text(json.dumps(reviews[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"^Books_5.json line 2: expected one object per line"):
        read_amazon_reviews(path)


NEWS_TSV = (
    "N55528\tlifestyle\tlifestyleroyals\tThe Brands Queen Elizabeth, Prince Charles Love\t"
    "Shop like royalty.\thttps://assets.msn.com/labs/mind/AAGH0ET.html\t"
    '[{"Label": "Prince Philip", "Type": "P", "WikidataId": "Q80976"}]\t[]\n'
    'N19639\thealth\tweightloss\t50 Worst "Habits" For Belly Fat\t\t'
    "https://assets.msn.com/labs/mind/AAB19MK.html\t[]\t[]\n"
)


def test_mind_news(tmp_path: Path):
    path = tmp_path / "news.tsv"
    path.write_text(NEWS_TSV, encoding="utf-8")
    df = read_mind_news(path)
    assert list(df.columns) == ["item", "title", "abstract", "category", "subcategory"]
    assert df["item"].tolist() == ["N55528", "N19639"]
    assert df["title"].tolist()[1] == '50 Worst "Habits" For Belly Fat'  # quotes are text
    assert df["abstract"].tolist() == ["Shop like royalty.", ""]
    assert df["subcategory"].tolist() == ["lifestyleroyals", "weightloss"]
    path.write_text(NEWS_TSV + "N1\tnews\tnewsus\tOnly a title\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"^news.tsv line 3: expected 8 tab-separated fields"):
        read_mind_news(path)


def test_mind_behaviors(tmp_path: Path):
    path = tmp_path / "behaviors.tsv"
    path.write_text(
        "1\tU13740\t11/11/2019 9:05:58 AM\tN55189 N42782 N34694\tN55689-1 N35729-0\n"
        "2\tU91836\t11/12/2019 6:11:30 PM\tN31739\tN20678-0 N39317-1 N58114-1\n"
        "3\tU13740\t11/15/2019 8:55:22 AM\tN55189 N42782 N34694\tN55689-1 N11-0\n"
        "4\tU91836\t11/13/2019 1:00:00 PM\t\tN5 N6\n",  # unlabelled test-split impressions
        encoding="utf-8",
    )
    df = read_mind_behaviors(path)
    assert list(df.columns) == ["user", "item", "timestamp", "line"]
    u1 = df[df["user"] == "U13740"].sort_values("timestamp", kind="stable")
    # the history once, in order, before the first impression; then the clicks
    assert u1["item"].tolist() == ["N55189", "N42782", "N34694", "N55689", "N55689"]
    t1 = pd.Timestamp("2019-11-11 09:05:58").timestamp()
    assert u1["timestamp"].tolist() == pytest.approx(
        [t1 - 3 * HISTORY_OFFSET_S, t1 - 2 * HISTORY_OFFSET_S, t1 - HISTORY_OFFSET_S, t1,
         pd.Timestamp("2019-11-15 08:55:22").timestamp()], abs=1e-6)
    assert u1["line"].tolist() == [1, 1, 1, 1, 3]
    u2 = df[df["user"] == "U91836"].sort_values(["timestamp", "line"], kind="stable")
    assert u2["item"].tolist() == ["N31739", "N39317", "N58114"]  # PM is 18:11

    path.write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1\tN2-1\n2\tU1\tyesterday\tN1\tN3-1\n")
    with pytest.raises(DataError, match=r"^behaviors.tsv line 2: time 'yesterday'"):
        read_mind_behaviors(path)
    path.write_text("1\tU1\t11/11/2019 9:05:58 AM\tN1\tN2-1 N3-x\n")
    with pytest.raises(DataError, match=r"^behaviors.tsv line 1: impression 'N3-x'"):
        read_mind_behaviors(path)


# ---------------------------------------------------------------- templates

ITEMS = pd.DataFrame({
    "item_id": ["a", "b", "c"],
    "title": ["Heat", "", None],
    "year": ["1995", "", "2001"],
    "genre": ["Crime, Drama", "", ""],
})


def test_template_renders_fields():
    texts = ItemTextTemplate("{title} ({year}). Genres: {genre}").render(ITEMS.iloc[:1])
    assert texts == ["Heat (1995). Genres: Crime, Drama"] and texts.empty_items == []
    assert ItemTextTemplate("{title!r:<8}|").render(ITEMS.iloc[:1]) == ["'Heat'  |"]


def test_template_missing_field_lists_available():
    with pytest.raises(DataError, match=r"no field 'genres'.*available fields: item_id, title, "
                       r"year, genre"):
        ItemTextTemplate("{title}: {genres}").render(ITEMS)
    with pytest.raises(DataError, match="names no field"):
        ItemTextTemplate("just text")


def test_template_empty_items_raise_or_are_reported():
    template = ItemTextTemplate("{title} ({year})")  # punctuation alone is not content
    with pytest.raises(DataError, match=r"1 of 3 items have no text \('b'\)"):
        template.render(ITEMS)
    texts = template.render(ITEMS, allow_empty=True)
    assert texts.empty_items == ["b"]
    assert texts == ["Heat (1995)", "()", "(2001)"]  # None renders as ""
    many = pd.DataFrame({"item": [f"i{k}" for k in range(7)], "title": [" "] * 7})
    with pytest.raises(DataError, match=r"7 of 7 items have no text \('i0', .*'i4', \.\.\.\)"):
        ItemTextTemplate("{title}").render(many)


def test_builtin_template_on_prepared_ml100k(tmp_path: Path):
    data = load_dataset_folder(resolve_dataset("ml-100k", cache_dir=tmp_path))
    items = data.items.to_pandas()
    texts = default_template(data.name).render(items)
    assert len(texts) == data.num_items and texts.empty_items == []
    toy = texts[items["item_id"].tolist().index("Toy Story (1995)")]
    assert toy == "Toy Story (1995). Genres: Animation Children's Comedy"
    with pytest.raises(DataError, match="no field 'genre'"):  # ML-1M's field name
        default_template("ml-1m").render(items)
    with pytest.raises(DataError, match="no default item text template"):
        default_template("amazon-books")


# ---------------------------------------------------------------- image store


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def _assert_color(image: Image.Image, color: tuple[int, int, int], size: int) -> None:
    assert image.size == (size, size) and image.mode == "RGB"
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - color).max() < 8, (mean, color)


def _image_folder(root: Path) -> Path:
    folder = root / "images"
    folder.mkdir()
    for name, color in COLORS.items():
        (folder / f"{name}.png").write_bytes(_png(color))
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", ["folder", "zip", "csv"])
def test_image_store_round_trip(tmp_path: Path, kind: str):
    folder = _image_folder(tmp_path)
    if kind == "zip":
        source = tmp_path / "images.zip"
        with zipfile.ZipFile(source, "w") as zf:
            for name in COLORS:
                zf.write(folder / f"{name}.png", f"catalog/{name}.png")
    elif kind == "csv":
        source = tmp_path / "images.csv"
        source.write_text("item_id,path\n" + "".join(
            f"item-{name},images/{name}.png\n" for name in COLORS))
    else:
        source = folder
    report = build_image_store(source, tmp_path / "store", size=16)
    assert report.count == 3 and report.missing == [] and report.unreadable == []
    store = ImageStore(tmp_path / "store")
    assert len(store) == 3
    assert store.meta["size"] == 16 and store.meta["format"] == "JPEG"
    prefix = "item-" if kind == "csv" else ""
    for name, color in COLORS.items():
        assert prefix + name in store
        _assert_color(store[prefix + name], color, 16)
        assert Image.open(io.BytesIO(store.get_bytes(prefix + name))).format == "JPEG"
    assert "__meta__" not in store and "purple" not in store
    with pytest.raises(KeyError, match="'purple' has no image in the store"):
        store["purple"]


def test_image_store_png_crop_and_transparency(tmp_path: Path):
    folder = tmp_path / "images"
    folder.mkdir()
    wide = Image.new("RGB", (60, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (20, 0, 40, 20))  # blue | red | blue: the crop keeps the red
    wide.save(folder / "wide.png")
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(folder / "clear.png")
    build_image_store(folder, tmp_path / "store", size=12, fmt="png")
    store = ImageStore(tmp_path / "store")
    assert Image.open(io.BytesIO(store.get_bytes("wide"))).format == "PNG"
    _assert_color(store["wide"], (255, 0, 0), 12)
    _assert_color(store["clear"], (255, 255, 255), 12)  # transparency becomes white


def test_bad_images_refused_and_previous_store_kept(tmp_path: Path):
    folder = _image_folder(tmp_path)
    output = tmp_path / "store"
    build_image_store(folder, output, size=8)
    before = _tree_digest(output)
    (folder / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    wanted = [*COLORS, "broken", "ghost"]
    with pytest.raises(DataError, match=r"^images: 2 of 5 items have no usable image \(1 missing, "
                       r"1 unreadable: 'ghost' \(no image in images\); 'broken' .*"
                       r"--skip-bad-images"):
        build_image_store(folder, output, size=8, item_ids=wanted)
    assert _tree_digest(output) == before  # untouched, no temporary folder left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "store"]
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError, match="--skip-bad-images"):
        build_image_store(folder, fresh, size=8)
    assert not fresh.exists()


def test_skip_bad_images_reports_them(tmp_path: Path):
    folder = _image_folder(tmp_path)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    report = build_image_store(folder, tmp_path / "store", size=8,
                               item_ids=["green", "broken", "ghost", "red"], skip_bad=True)
    assert report.count == 2 and report.ignored == 1  # blue is not a wanted item
    assert [m[0] for m in report.missing] == ["ghost"]
    assert [u[0] for u in report.unreadable] == ["broken"]
    store = ImageStore(tmp_path / "store")
    assert len(store) == 2 and "green" in store and "red" in store
    assert "broken" not in store and "ghost" not in store and "blue" not in store


def test_csv_missing_file_and_not_a_store(tmp_path: Path):
    _image_folder(tmp_path)
    table = tmp_path / "images.csv"
    table.write_text("item_id,path\nred,images/red.png\nlost,images/lost.png\n")
    report = build_image_store(table, tmp_path / "store", size=8, skip_bad=True)
    assert report.missing == [("lost", "images.csv line 3: no file images/lost.png")]
    table.write_text("item,path\nred,images/red.png\n")
    with pytest.raises(DataError, match="no column 'item_id'; expected item_id,path"):
        build_image_store(table, tmp_path / "store2", size=8)
    with pytest.raises(DataError, match="not an image store"):
        ImageStore(tmp_path / "images")


class _MeanColors:
    """A map-style dataset reading the store in whichever process indexes it.

    It also reports whether the environment the parent had open (copied into a fork
    worker) was closed there, i.e. whether the worker opened its own.
    """

    def __init__(self, store: ImageStore, inherited: lmdb.Environment | None = None) -> None:
        self.store, self.inherited, self.ids = store, inherited, list(COLORS) * 4

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, bool]:
        mean = np.asarray(self.store[self.ids[i]], dtype=np.float32).mean(axis=(0, 1))
        try:
            self.inherited.stat()
        except lmdb.Error:  # closed
            return mean, True
        return mean, False


def test_image_store_in_fork_workers_and_after_pickling(tmp_path: Path):
    from torch.utils.data import DataLoader

    build_image_store(_image_folder(tmp_path), tmp_path / "store", size=8)
    store = ImageStore(tmp_path / "store")
    _assert_color(store["red"], COLORS["red"], 8)  # the parent has an open environment
    stat = (tmp_path / "store" / "data.mdb").stat()
    parent_env = images._open_envs[(stat.st_dev, stat.st_ino)]
    dataset = _MeanColors(store, parent_env)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context="fork")
    batches = list(loader)
    means = np.concatenate([mean.numpy() for mean, _ in batches])
    expected = np.asarray([COLORS[i] for i in dataset.ids], dtype=np.float32)
    assert np.abs(means - expected).max() < 8
    assert all(closed.all() for _, closed in batches)  # each worker opened its own
    assert dataset[0][1] is False  # while the parent's stays open and in use
    _assert_color(store["green"], COLORS["green"], 8)

    copy = pickle.loads(pickle.dumps(store))  # as a spawn worker receives it
    assert len(copy) == 3
    _assert_color(copy["blue"], COLORS["blue"], 8)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "store")
    _assert_color(ImageStore(link)["blue"], COLORS["blue"], 8)  # a second reader, other path


def test_reader_follows_a_rebuilt_store(tmp_path: Path):
    folder = _image_folder(tmp_path)
    build_image_store(folder, tmp_path / "store", size=8)
    store = ImageStore(tmp_path / "store")
    _assert_color(store["red"], COLORS["red"], 8)
    (folder / "red.png").write_bytes(_png(COLORS["blue"]))
    build_image_store(folder, tmp_path / "store", size=8)
    _assert_color(store["red"], COLORS["blue"], 8)
    open_here = [env for env in images._open_envs.values() if env.path() == str(store.path)]
    assert len(open_here) == 1  # the replaced store's environment was closed


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture):
    cli = load_script("build_image_store")
    folder = _image_folder(tmp_path)
    items = tmp_path / "items.tsv"
    items.write_text("item_id\ttitle\nred\tRed\nghost\tGhost\n")
    args = ["--source", str(folder), "--output-dir", str(tmp_path / "store"), "--size", "8",
            "--items", str(items)]
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(cli.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: images: 1 of 2 items have no usable image") and \
        "Traceback" not in err and len(err.strip().splitlines()) == 1
    cli.run_main(cli.main, [*args, "--skip-bad-images"])
    out = capsys.readouterr().out
    assert "wrote 1 images (8x8 JPEG)" in out and "ignored 2" in out and "'ghost'" in out
    assert ImageStore(tmp_path / "store")["red"].size == (8, 8)
