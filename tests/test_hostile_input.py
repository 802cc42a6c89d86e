"""Hostile input, property-based (issue 23): random and adversarial files for every reader
of scripts/prepare_data.py and random flag combinations. Every outcome must be a valid
dataset folder or exit code 2 with one error line, no traceback and no partial output.

Examples are derandomized (the same ones on every run) and few per test, so the file stays
within about a minute on a loaded 2-core machine; docs/reliability.md lists the classes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from peftrec.dataset_tools import load_dataset_folder
from peftrec.downstream.report import MATPLOTLIB_MISSING
from peftrec.downstream.sweep import script_parser
from peftrec.pretraining.cli import run_main
from tests.helpers import ROOT, load_script, run_pretrain, save_bert, save_vision

PREPARE = load_script("prepare_data").main
SYNTHETIC = load_script("generate_synthetic").main
SPLIT = load_script("split_domains").main
EXAMPLES, FLAG_EXAMPLES, SYNTHETIC_EXAMPLES, SPLIT_EXAMPLES = 100, 200, 60, 60
# (docs/reliability.md quotes them)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

# --- the property -----------------------------------------------------------------------------


def check_dataset(folder: Path) -> None:
    data = load_dataset_folder(folder)
    assert data.num_users > 0 and data.num_items > 0
    item_ids = data.items["item_id"]
    assert len(item_ids) == data.num_items and all(isinstance(i, str) for i in item_ids)
    for row in data.sequences:
        items, times = row["item_indices"], row["timestamps"]
        assert len(items) >= 3 and len(items) == len(times)
        assert all(1 <= i <= data.num_items for i in items)
        stamps = np.asarray(times, dtype=np.float64)
        assert np.isfinite(stamps).all() and (np.diff(stamps) >= 0).all()


def one_error_line(code, text: str) -> str:
    """The one `error:` line of a script that exited with `code` and wrote `text` on stderr
    (exit 2, no traceback)."""
    assert code == 2, text
    assert "Traceback" not in text, text
    # Our errors are one line; argparse's own add its usage lines before its one error.
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text
    if text.startswith("error:"):
        assert text.count("\n") == 1, text
    return errors[0]


def outcome(argv: list[str], output: Path, script=PREPARE, outputs=None) -> str:
    """Run a script in-process: 'ok' (a valid dataset) or the one error line."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            run_main(script, argv)
    except SystemExit as exit_info:
        text = err.getvalue()
        error = one_error_line(exit_info.code, text)
        for folder in [output] if outputs is None else outputs:
            assert not folder.exists(), f"partial output {folder} left after: {text}"
            leftovers = [p.name for p in folder.parent.iterdir()
                         if p.name.startswith(f".{folder.name}.")] if folder.parent.is_dir() else []
            assert not leftovers, leftovers
        return error
    for folder in [output] if script is PREPARE else outputs or []:
        check_dataset(folder)  # generate_synthetic's log is checked by its test
    return "ok"


# --- hostile field values ---------------------------------------------------------------------

IDS = st.one_of(
    st.sampled_from(["u1", "u2", "i1", "i2", "i3", "0", "-1", "", " ", "nan", "NULL", "None",
                     "1e3", "\u05e9\u05dc\u05d5\u05dd", "\U0001f3ac", "a\u202eb", "x" * 5000]),
    st.text(min_size=0, max_size=8),
)
TIMES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64),
    st.sampled_from(["", "nan", "inf", "-inf", "1e400", "1.5", "-0", "0x10", "2024-01-01",
                     "99999999999999999999", "-99999999999999999999", "1e18", "4102444800",
                     "1 000", "\u0661\u0662\u0663"]),
    st.floats(allow_nan=True, allow_infinity=True),
)
RATINGS = st.one_of(st.integers(-5, 10), st.sampled_from(["", "x", "nan", "inf", "4.5"]))
TITLES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\u0627\u0644\u0641\u064a\u0644\u0645", "Am\u00e9lie (2001)",
                     "\U0001f600" * 50, "a,b", 'quote"inside', "tab\tinside", "new\nline",
                     "x" * 100_000, "::"]),
)
HOSTILE_ROWS = st.lists(st.tuples(IDS, IDS, TIMES, RATINGS), max_size=2)
# Valid Unix seconds, negative (before 1970) and far in the future included.
GOOD_TIMES = st.integers(-(2**40), 2**40)
GOOD_ROWS = [(f"u{u}", f"i{(u + k) % 4}", 1000 + k, 1 + (u + k) % 5)
             for u in range(4) for k in range(4)]
# Bugs the properties found, kept as explicit examples (docs/reliability.md).
WRAPPING_TIME = [("u0", "i0", "99999999999999999999", 4), *GOOD_ROWS[1:]]  # was -2**63
GOOD_HEADER = ["user_id", "item_id", "timestamp", "rating"]


@st.composite
def rows_strategy(draw):
    """A grid every user and item of which survives 2-core, plus up to two hostile rows."""
    times = draw(st.lists(GOOD_TIMES, min_size=16, max_size=16))
    rows = [(f"u{u}", f"i{(u + k) % 4}", times[4 * u + k], 1 + (u + k) % 5)
            for u in range(4) for k in range(4)]
    for row in draw(HOSTILE_ROWS):
        rows.insert(draw(st.integers(0, len(rows))), row)
    return rows


ROWS = rows_strategy()
ENCODINGS = st.sampled_from(["utf-8", "utf-8", "latin-1", "utf-16", "utf-8-sig", "cp1252"])
JUNK = st.binary(min_size=0, max_size=400)


def encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace")


def delimited(rows, sep: str, header: list[str] | None) -> str:
    lines = [sep.join(header)] if header is not None else []
    lines += [sep.join(str(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


HEADERS = st.one_of(
    st.just(["user_id", "item_id", "timestamp", "rating"]),
    st.just(["user_id", "item_id", "timestamp", "rating"]),
    st.just(["user_id", "item_id", "timestamp", "rating"]),
    st.just(["user_id", "user_id", "timestamp", "rating"]),  # duplicate header
    st.just(["user_id", "item_id", "rating"]),  # missing column
    st.just(["user_id", "item_id", "timestamp", "rating", "extra"]),  # more names than fields
    st.just(["user_id", "item_id", "line", "rating"]),  # a column named like our own
    st.lists(st.text(max_size=6), min_size=0, max_size=5),
)
RECBOLE_HEADERS = st.one_of(
    st.just(["user_id:token", "item_id:token", "timestamp:float", "rating:float"]),
    st.just(["user_id:token", "item_id:token", "timestamp:float", "rating:float"]),
    st.just(["user_id:token", "item_id:token", "timestamp:float", "rating:float"]),
    st.just(["user_id:token", "user_id:float", "timestamp:float", "rating:float"]),
    st.just(["user_id:token", "item_id:token", "rating:float"]),
    st.lists(st.text(max_size=8), min_size=0, max_size=5),
)


def run_case(files: dict[str, bytes], flags: list[str]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in files.items():
            (root / name).write_bytes(data)
        output = root / "out"
        argv = [a.replace("{dir}", tmp) for a in flags] + ["--output", str(output)]
        result = outcome(argv, output)
        if currently_in_test_context():  # --hypothesis-show-statistics shows the ok/error mix
            event(result if result == "ok" else "error")
        return result


COLS = ["--user-col", "user_id", "--item-col", "item_id", "--time-col", "timestamp"]


def generic_flags(fmt: str, extra: list[str]) -> list[str]:
    return ["--input", f"{{dir}}/log.{fmt}", "--format", fmt, *COLS, "--k-core", "2", *extra]


# --- readers ----------------------------------------------------------------------------------


@SETTINGS
@given(rows=ROWS, header=HEADERS, encoding=ENCODINGS, fmt=st.sampled_from(["csv", "tsv"]),
       rating=st.booleans())
@example(rows=WRAPPING_TIME, header=GOOD_HEADER, encoding="utf-8", fmt="csv", rating=False)
def test_csv_and_tsv_files(rows, header, encoding, fmt, rating):
    text = delimited(rows, "," if fmt == "csv" else "\t", header)
    extra = ["--rating-col", "rating", "--min-rating", "2"] if rating else []
    run_case({f"log.{fmt}": encode(text, encoding)}, generic_flags(fmt, extra))


@SETTINGS
@given(rows=ROWS, keys=st.sampled_from([("user_id", "item_id", "timestamp")] * 3
                                       + [("user_id", "item_id", "time"), ("a", "b", "c")]),
       encoding=ENCODINGS, raw_values=st.booleans(),
       junk_line=st.one_of(st.none(), st.none(), JUNK))
@example(rows=GOOD_ROWS, keys=("user_id", "item_id", "timestamp"), encoding="utf-16",
         raw_values=False, junk_line=None)  # the error did not name the file
def test_jsonl_files(rows, keys, encoding, raw_values, junk_line):
    lines = []
    for user, item, time, _ in rows:
        values = (user, item, time) if raw_values else (str(user), str(item), str(time))
        try:
            lines.append(json.dumps(dict(zip(keys, values, strict=True)), ensure_ascii=False))
        except ValueError:  # nan/inf floats are not JSON; json.dumps writes them unless told
            lines.append("{}")
    data = encode("\n".join(lines) + "\n", encoding)
    if junk_line is not None:
        data += junk_line + b"\n"
    run_case({"log.jsonl": data}, generic_flags("jsonl", []))


@SETTINGS
@given(rows=ROWS, header=RECBOLE_HEADERS, encoding=ENCODINGS)
@example(rows=GOOD_ROWS, header=["user_id:token", "item_id:token", "timestamp:float",
                                  "timestamp:float"], encoding="utf-8")  # was a TypeError
def test_recbole_files(rows, header, encoding):
    text = delimited(rows, "\t", header)
    run_case({"log.inter": encode(text, encoding)},
             ["--input", "{dir}/log.inter", "--format", "recbole", "--k-core", "2"])


@SETTINGS
@given(rows=ROWS, dat=st.booleans(), encoding=ENCODINGS,
       titles=st.lists(st.tuples(st.sampled_from(["i1", "i2", "i3", "i4"]) | IDS, TITLES),
                       min_size=1, max_size=6))
@example(rows=GOOD_ROWS, dat=True, encoding="utf-8", titles=[])  # empty movies.dat
def test_movielens_files(rows, dat, encoding, titles):
    sep = "::" if dat else "\t"
    ratings = delimited([(u, i, r, t) for u, i, t, r in rows], sep, None)
    if dat:
        movies = delimited([(i, t, "Comedy|Drama") for i, t in titles], "::", None)
    else:
        movies = delimited([(i, t, "01-Jan-1995", "", "http://x", *["0"] * 18, "1")
                            for i, t in titles], "|", None)
    files = {"ratings.dat": encode(ratings, encoding), "movies.dat": encode(movies, encoding)}
    run_case(files, ["--input", "{dir}/ratings.dat", "--items", "{dir}/movies.dat",
                     "--format", "movielens", "--k-core", "2"])


GOOD_LOG = delimited([(f"u{u}", f"i{(u + k) % 4}", 1000 + k, 4) for u in range(4)
                      for k in range(4)], ",", ["user_id", "item_id", "timestamp", "rating"])


@SETTINGS
@given(fmt=st.sampled_from(["csv", "tsv", "jsonl", "recbole", "movielens"]), junk=JUNK,
       huge=st.sampled_from([0, 1, 200_000]))
@example(fmt="csv", junk=b"", huge=0)  # empty file
@example(fmt="jsonl", junk=b"\xff\xfe{\x00", huge=0)
def test_binary_junk_and_huge_lines(fmt, junk, huge):
    data = junk + b"x" * huge + (b"\n" if huge else b"")
    run_case({"log.txt": data}, ["--input", "{dir}/log.txt", "--format", fmt, *COLS,
                                 "--k-core", "2"])


@SETTINGS
@given(fmt=st.sampled_from(["csv", "tsv", "jsonl"]), header=HEADERS, titles=st.lists(
    st.tuples(st.sampled_from(["i0", "i1", "i2", "i3"]) | IDS, TITLES), max_size=6),
    encoding=ENCODINGS)
def test_item_files(fmt, header, titles, encoding):
    """A good log with a hostile item table (unicode/RTL/emoji titles, duplicate headers)."""
    if fmt == "jsonl":
        names = (header + ["x", "y"])[:2]
        text = "".join(json.dumps({names[0]: i, names[-1]: t}, ensure_ascii=False) + "\n"
                       for i, t in titles)
    else:
        text = delimited(titles, "," if fmt == "csv" else "\t", header[:2] or None)
    files = {"log.csv": GOOD_LOG.encode(), f"items.{fmt}": encode(text, encoding)}
    run_case(files, ["--input", "{dir}/log.csv", "--format", "csv", *COLS, "--k-core", "2",
                     "--items", f"{{dir}}/items.{fmt}", "--items-item-col", "user_id"])


# --- flags ------------------------------------------------------------------------------------

NUMBERS = st.sampled_from(["0", "1", "2", "3", "4", "2", "3", "-1", "-5", "10**9",
                           "99999999999999999999", "1.5", "nan", "inf", "-inf", "", "abc",
                           "0x3", "1e3"])
FLAG_CHOICES = {
    "--k-core": NUMBERS,
    "--min-rating": NUMBERS,
    "--max-history": NUMBERS,
    "--dedupe": st.sampled_from(["first", "last", "all", "first", "last", "none", "", "FIRST"]),
    "--format": st.sampled_from(["csv", "tsv", "jsonl", "recbole", "movielens", "parquet", ""]),
    "--user-col": st.sampled_from(["user_id", "item_id", "nope", "", "line"]),
    "--item-col": st.sampled_from(["item_id", "user_id", "nope", ""]),
    "--time-col": st.sampled_from(["timestamp", "rating", "nope"]),
    "--rating-col": st.sampled_from(["rating", "timestamp", "nope"]),
    "--items": st.sampled_from(["{dir}/items.csv", "{dir}/missing.csv", "{dir}"]),
    "--items-item-col": st.sampled_from(["item_id", "title", "nope"]),
    "--input": st.sampled_from(["{dir}/log.csv", "{dir}/missing.csv", "{dir}"]),
    "--config": st.sampled_from(["{dir}/missing.yaml", "{dir}/log.csv"]),
    "--unknown-flag": st.just("1"),
}
ITEMS_CSV = delimited([(f"i{i}", f"T\u00edtulo {i} \U0001f3ac") for i in range(4)], ",",
                      ["item_id", "title"])


@settings(SETTINGS, max_examples=FLAG_EXAMPLES)
@given(chosen=st.dictionaries(st.sampled_from(sorted(FLAG_CHOICES)), st.just(None), max_size=4)
       .flatmap(lambda keys: st.fixed_dictionaries({k: FLAG_CHOICES[k] for k in keys})),
       base=st.sampled_from([True, True, True, False]))
@example(chosen={"--k-core": "99999999999999999999"}, base=True)
@example(chosen={"--max-history": "99999999999999999999"}, base=True)
@example(chosen={"--max-history": "3", "--dedupe": "all"}, base=True)
@example(chosen={"--user-col": "line"}, base=True)  # was the file's line numbers, silently
def test_random_flag_combinations(chosen, base):
    flags = ["--input", "{dir}/log.csv", "--format", "csv", *COLS, "--k-core", "2"] if base else []
    for flag, value in chosen.items():
        if flag in flags:
            flags[flags.index(flag) + 1] = value
        else:
            flags += [flag, value]
    run_case({"log.csv": GOOD_LOG.encode(), "items.csv": ITEMS_CSV.encode()}, flags)


def test_good_inputs_still_succeed():
    """The property is not vacuous: the plain log passes with and without items."""
    flags = ["--input", "{dir}/log.csv", "--format", "csv", *COLS, "--k-core", "2"]
    files = {"log.csv": GOOD_LOG.encode(), "items.csv": ITEMS_CSV.encode()}
    assert run_case(files, flags) == "ok"
    assert run_case(files, [*flags, "--items", "{dir}/items.csv"]) == "ok"


FOUND = [  # (file, its text, flags, the error expected): bugs the properties found
    ("log.csv", delimited(WRAPPING_TIME, ",", GOOD_HEADER), COLS,
     "log.csv line 2: timestamp '99999999999999999999' is out of range"),
    ("log.csv", delimited(GOOD_ROWS, ",", ["user_id", "item_id", "line", "rating"]),
     [*COLS[:4], "--time-col", "line"],
     "log.csv: --time-col line: the column name 'line' is reserved"),
    ("log.inter", delimited(GOOD_ROWS, "\t", ["user_id:token", "item_id:token",
                                              "timestamp:float", "timestamp:float"]), [],
     "log.inter: column 'timestamp' appears more than once in the header"),
    ("log.jsonl", "".join(json.dumps(dict(zip(GOOD_HEADER, r, strict=True))) + "\n"
                          for r in GOOD_ROWS).encode("utf-16"), COLS,
     "log.jsonl line 1: not valid utf-8 text"),
]


def test_found_bugs_are_one_line_errors():
    for name, text, flags, expected in FOUND:
        data = text if isinstance(text, bytes) else text.encode()
        fmt = {"csv": "csv", "inter": "recbole", "jsonl": "jsonl"}[name.split(".")[1]]
        result = run_case({name: data}, ["--input", f"{{dir}}/{name}", "--format", fmt, *flags,
                                         "--k-core", "2"])
        assert result.startswith(f"error: {expected}"), result
    base = ["--input", "{dir}/log.csv", "--format", "csv", *COLS, "--k-core", "2"]
    for items, expected in ((b"", "items.csv: the file is empty; pass a file with items"),
                            (b"item_id,title\n,x\n", "items.csv line 2: empty item field; "
                             "every row of an item file needs an item id")):
        files = {"log.csv": GOOD_LOG.encode(), "items.csv": items}
        result = run_case(files, [*base, "--items", "{dir}/items.csv"])
        assert result == f"error: {expected} (fix or remove that line)" or result == (
            f"error: {expected}"), result
    result = run_case({"log.csv": GOOD_LOG.encode()}, ["--input", "{dir}/log.csv", "--format",
                                                       "csv", *COLS, "--k-core", "10**30"])
    assert "--k-core" in result
    result = run_case({"log.csv": GOOD_LOG.encode()}, ["--input", "{dir}/log.csv", "--format",
                                                       "csv", *COLS, "--k-core", str(10**30)])
    assert result.startswith("error: no interactions left after"), result


SYNTHETIC_NUMBERS = st.sampled_from(["1", "2", "5", "20", "0", "-3", "1.5", "nan", "abc", "",
                                     "99999999999999999999"])
SYNTHETIC_FLAGS = {
    "--users": SYNTHETIC_NUMBERS, "--topics": SYNTHETIC_NUMBERS, "--seed": SYNTHETIC_NUMBERS,
    "--session-gap": st.sampled_from(["1", "60", "2147483647", "99999999999999999999", "0"]),
    "--zipf-exponent": st.sampled_from(["0", "1.1", "5", "-1", "nan", "inf", "6"]),
    "--follow-probability": st.sampled_from(["0", "0.7", "1", "1.5", "-0.1", "nan"]),
}


@settings(SETTINGS, max_examples=SYNTHETIC_EXAMPLES)
@given(interactions=st.sampled_from(["300", "300", "5", "0", "-1", "99999999999999999999"]),
       items=st.sampled_from(["20", "20", "1", "0", "99999999999999999999"]),
       chosen=st.dictionaries(st.sampled_from(sorted(SYNTHETIC_FLAGS)), st.just(None),
                              max_size=3)
       .flatmap(lambda keys: st.fixed_dictionaries({k: SYNTHETIC_FLAGS[k] for k in keys})))
@example(interactions="300", items="20", chosen={"--session-gap": "99999999999999999999"})
@example(interactions="99999999999999999999", items="20", chosen={"--users": "1"})
def test_generate_synthetic_flags(interactions, items, chosen):
    """scripts/generate_synthetic.py: a log that prepare_data turns into a valid dataset, or
    one error line (a --session-gap past int64 was an OverflowError; 10**20 interactions for
    one user streamed until the disk filled)."""
    flags = ["--interactions", interactions, "--items", items, "--topics", "2"]
    for flag, value in chosen.items():
        flags += [flag, value]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        result = outcome([*flags, "--output-dir", str(log)], log, SYNTHETIC)
        if currently_in_test_context():
            event(result if result == "ok" else "error")
        if result == "ok":
            cols = ["--user-col", "user_id", "--item-col", "item_id", "--time-col", "timestamp"]
            assert outcome(["--input", str(log / "interactions.tsv"), "--format", "tsv", *cols,
                            "--items", str(log / "items.tsv"), "--k-core", "0",
                            "--output", f"{tmp}/data"], Path(tmp) / "data") == "ok"


SPLIT_FLAGS = {
    "--field": st.sampled_from(["genre", "genre", "title", "item_id", "nope", ""]),
    "--source-values": st.sampled_from(["group0,group1", "group0,group1", "group0", "", ",",
                                        "nope",
                                        "\U0001f3ac,\u05e9"]),
    "--source-range": st.sampled_from(["1990,", ",1990", "5,1", "a,b", "nan,inf", "1,2,3", ","]),
    "--source-name": st.sampled_from(["src", "", "\u202e"]),
}
SPLIT_OUTPUTS = st.sampled_from(["{dir}/s", "{dir}/t", "{dir}/s", "{dir}/t", "{dir}/t/s",
                                 "{dir}/s/t", "{dir}", "{data}"])


@settings(SETTINGS, max_examples=SPLIT_EXAMPLES)
@given(chosen=st.dictionaries(st.sampled_from(sorted(SPLIT_FLAGS)), st.just(None), max_size=2)
       .flatmap(lambda keys: st.fixed_dictionaries({k: SPLIT_FLAGS[k] for k in keys})),
       source=SPLIT_OUTPUTS, target=SPLIT_OUTPUTS)
@example(chosen={}, source="{dir}/s", target="{dir}/t")
@example(chosen={}, source="{dir}/s", target="{dir}")  # both were errors with a partial output:
@example(chosen={}, source="{dir}/s", target="{dir}/s/t")  # the inner folder was deleted
def test_split_domains_flags(tiny_dataset_dir, chosen, source, target):
    """scripts/split_domains.py on a prepared folder: two valid datasets or one error line."""
    with tempfile.TemporaryDirectory() as tmp:
        def place(text: str) -> str:
            return text.replace("{dir}", f"{tmp}/out").replace("{data}", str(tiny_dataset_dir))

        flags = ["--dataset", str(tiny_dataset_dir), "--field", "genre"]
        if "--source-range" not in chosen:
            flags += ["--source-values", "group0,group1"]
        for flag, value in chosen.items():
            if flag in flags:
                flags[flags.index(flag) + 1] = value
            else:
                flags += [flag, value]
        outs = [Path(place(source)), Path(place(target))]
        argv = [*flags, "--source-output", str(outs[0]), "--target-output", str(outs[1])]
        before = sorted(p.name for p in tiny_dataset_dir.iterdir())
        result = outcome(argv, outs[0], SPLIT, outputs=[o for o in outs
                                                       if o != tiny_dataset_dir])
        assert sorted(p.name for p in tiny_dataset_dir.iterdir()) == before
        event(result if result == "ok" else "error")


def test_split_output_around_the_input_is_refused():
    """An output folder holding the input dataset would delete it when replaced."""
    flags = ["--input", "{dir}/data/log.csv", "--format", "csv", *COLS, "--k-core", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").mkdir()
        (Path(tmp) / "data" / "log.csv").write_text(GOOD_LOG)
        data = Path(tmp) / "data" / "tiny"
        assert outcome([f.replace("{dir}", tmp) for f in flags] + ["--output", str(data)],
                       data) == "ok"
        argv = ["--dataset", str(data), "--field", "item_id", "--source-values", "i0",
                "--source-output", str(Path(tmp) / "data"), "--target-output", f"{tmp}/t"]
        result = outcome(argv, Path(tmp) / "t", SPLIT, outputs=[Path(tmp) / "t"])
        assert "cannot contain or lie inside the input dataset folder" in result, result
        assert (data / "dataset_info.json").is_file()


def test_output_that_would_delete_something_is_refused():
    """--output replaces a folder atomically: never the folder holding the input, an input
    file, a plain file or a folder that is not a dataset (each was deleted before)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "log.csv").write_text(GOOD_LOG)
        (root / "notes").mkdir()
        (root / "notes" / "keep.txt").write_text("mine")
        (root / "file.txt").write_text("mine")
        base = ["--input", f"{tmp}/log.csv", "--format", "csv", *COLS, "--k-core", "2"]
        for output, expected in ((root, "the output folder holds the input"),
                                 (root / "log.csv", "the output folder holds the input"),
                                 (root / "notes", "exists and is not a peftrec dataset folder"),
                                 (root / "file.txt", "exists and is not a peftrec dataset")):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    run_main(PREPARE, [*base, "--output", str(output)])
            except SystemExit as exit_info:
                assert exit_info.code == 2
            assert expected in err.getvalue() and err.getvalue().count("\n") == 1, err.getvalue()
        assert (root / "log.csv").read_text() == GOOD_LOG
        syn = ["--interactions", "300", "--items", "20", "--topics", "2"]
        result = outcome([*syn, "--output-dir", str(root / "notes")], root / "notes", SYNTHETIC,
                         outputs=[])
        assert "exists and is not a synthetic log folder" in result, result
        log = root / "log"
        for _ in range(2):  # a new folder, then the earlier log is replaced
            assert outcome([*syn, "--output-dir", str(log)], log, SYNTHETIC) == "ok"
        assert (root / "notes" / "keep.txt").read_text() == (root / "file.txt").read_text()
        (root / "empty").mkdir()
        for output in (root / "empty", root / "empty"):  # an empty folder, then a dataset
            assert outcome([*base, "--output", str(output)], output) == "ok"


# --- every script's flags ---------------------------------------------------------------------
# Every script in scripts/, found by listing the folder: random combinations of its own flags
# (read from the parser it builds) on top of a command that works. Each example runs the
# script's main through run_main until its work would start (WORK_STARTS: the flags parsed,
# the --config file and preset applied, the data and checkpoints read, the configs built and
# checked); the outcome must be that point, or exit 2 with one error line.

SCRIPTS = sorted(path.stem for path in (ROOT / "scripts").glob("*.py"))
SCRIPT_FLAG_EXAMPLES = 50  # per script (docs/reliability.md quotes it)
MODULES = {name: load_script(name) for name in SCRIPTS}
SKIPPED_SCRIPTS: dict[str, str] = {}  # script -> why its flags are not drawn (none so far)
NOT_DRAWN = {"-h": "prints the help and exits 0",
             "--debug": "asks for the traceback instead of the one line"}


class WorkStarts(Exception):
    """Raised where a script's work would start: its flags and inputs are resolved."""


# Where the work starts: a built-in dataset prepared (on the first use of its name), a training
# run's accelerator (the model is built after it; pretraining, fine-tuning, zero-shot), the
# demo's first run (its command parsed), an evaluation once the model is loaded,
# recommendations, a report's figures, a sweep's runs, plan or table, an image store's writes.
WORK_STARTS = (
    "peftrec.dataset_tools.builtin._file_lock",
    "peftrec.dataset_tools.builtin._prepare_split",
    "peftrec.downstream.demo.pretrain",
    "peftrec.pretraining.pipeline.build_accelerator",
    "peftrec.downstream.transfer.build_accelerator",
    "peftrec.pretraining.pipeline.evaluate_model",
    "peftrec.downstream.serving.RunRecommender.recommend",
    "peftrec.downstream.report.item_map_figure",
    "peftrec.downstream.report.curves_figure",
    "peftrec.downstream.sweep.print_plan",
    "peftrec.downstream.sweep.run_sweep",
    "peftrec.downstream.sweep.write_results",
    "peftrec.dataset_tools.images._build",
)
# The dataset scripts' work, a function each imports by name (its checks run before it).
SCRIPT_WORK = ("prepare_dataset", "prepare_builtin", "write_synthetic_log", "split_domains")

PRETRAIN = ["--dataset", "{data}", "--output-dir", "{out}/run", "--cpu", "--report-to", "none"]
FINETUNE = ["--pretrained", "{run}", "--dataset", "{target}", "--output-dir", "{out}/run",
            "--cpu", "--report-to", "none"]
# A command per script that reaches its work (test_every_script_has_a_working_command).
BASES = {
    "pretrain_id": PRETRAIN,
    "pretrain_text": [*PRETRAIN, "--encoder", "{bert}", "--text-template", "{title} ({genre})"],
    "pretrain_image": [*PRETRAIN, "--encoder", "{vit}", "--image-store", "{store}"],
    "finetune_full": FINETUNE,
    "adapter_houlsby": FINETUNE,
    "adapter_lora": FINETUNE,
    "adapter_prefix": FINETUNE,
    "adapter_diffusion_step": FINETUNE,
    "evaluate": ["--run", "{run}", "--cpu"],
    "recommend": ["--run", "{run}", "--users", "u1", "--output", "{out}/recs.jsonl", "--cpu"],
    "report": ["{run}", "--output-dir", "{out}/report"],
    "sweep": ["{sweep}", "--output-dir", "{out}/sweep"],
    "transfer_demo": ["--source", "{data}", "--target", "{target}", "--output-dir", "{out}/demo",
                      "--encoder", "{bert}", "--pretrain-epochs", "1"],
    "build_image_store": ["--source", "{images}", "--output-dir", "{out}/store", "--size", "8"],
    "prepare_data": ["--input", "{log}", "--format", "csv", *COLS, "--output", "{out}/data"],
    "generate_synthetic": ["--interactions", "300", "--items", "20", "--topics", "2",
                           "--output-dir", "{out}/log"],
    "split_domains": ["--dataset", "{data}", "--field", "genre", "--source-values", "group0",
                      "--source-output", "{out}/s", "--target-output", "{out}/t"],
}

JUNK_VALUES = ["", "-1", "0", "nan", "inf", "-inf", "abc", "99999999999999999999", "1e400",
               "0x10", "\u202e", "\U0001f3ac", "x" * 300, "--", "{out}/missing"]
TYPED_VALUES = {
    int: ["1", "2", "3", "16", "1.5"],
    float: ["0.5", "1e-3", "1", "0", "-0.0"],
    Path: ["{out}", "{out}/new", "{file}", "{data}", "{target}", "{run}", "{run}/best_model",
           "{config_good}", "{config_unknown}", "{config_bad}", "{config_list}", "/dev/null"],
}
TEXT_VALUES = ["abc", "title,genre", ",", "genre", "item_id", "{title}", "{nope}", "{",
               "{data}", "i1", "u1"]


def action_values(action) -> st.SearchStrategy:
    """Values for a flag: its choices or values of its type (its default among them), junk."""
    if action.choices is not None:
        valid = [str(choice) for choice in action.choices]
    else:
        valid = TYPED_VALUES.get(action.type, TEXT_VALUES)
    if action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, bool):
        valid = [*valid, str(action.default)]
    valid = st.sampled_from(valid)
    return st.one_of(valid, valid, valid, st.sampled_from(JUNK_VALUES))  # 3 of 4 valid


@st.composite
def flag_tokens(draw, action) -> list[str]:
    """One occurrence of `action` on a command line: its name (any alias) and its values."""
    if action.nargs == 0:
        return [draw(st.sampled_from(action.option_strings))]
    count = {"+": (1, 3), "*": (0, 3), "?": (0, 1), None: (1, 1)}.get(action.nargs)
    values = draw(st.lists(action_values(action), min_size=count[0], max_size=count[1]))
    if not action.option_strings:  # a positional
        return values
    name = draw(st.sampled_from(action.option_strings))
    if len(values) == 1 and draw(st.booleans()):
        return [f"{name}={values[0]}"]
    return [name, *values]


def drawn_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions
            if not set(action.option_strings) & {*NOT_DRAWN, "--help"}]


YAML_VALUES = st.one_of(st.integers(-2, 2**70), st.floats(), st.booleans(), st.none(),
                        st.lists(st.sampled_from(["a", "1", "{data}"]), max_size=2),
                        st.just({"a": 1}))


@st.composite
def config_file(draw, actions: list[argparse.Action]) -> str:
    """A --config file of settings of the parser (by destination or flag name) with values
    of their type, junk, or other YAML types; an unknown key now and then."""
    settings_ = {}
    for action in draw(st.lists(st.sampled_from(actions), min_size=1, max_size=3)):
        names = [action.dest, *(o.lstrip("-") for o in action.option_strings if o[1] == "-")]
        value = draw(action_values(action) | YAML_VALUES)
        settings_[draw(st.sampled_from(names))] = value
    if draw(st.integers(0, 9)) == 0:
        settings_["no_such_setting"] = 1
    return yaml.safe_dump(settings_, allow_unicode=True)


@st.composite
def script_command(draw, script: str) -> list[str]:
    """The script's working command, changed by up to four edits: a flag of its parser set
    (replacing the command's value, or repeated), a flag of the command removed, an unknown
    flag or a stray word added, a --config file of drawn settings given."""
    argv = list(BASES.get(script, []))
    actions = drawn_actions(script_parser(script))
    for _ in range(draw(st.integers(0, 4))):
        edit = draw(st.sampled_from(["set", "set", "set", "drop", "unknown", "config"]))
        if edit == "config":
            argv += ["--config", "{out}/drawn.yaml", "<yaml>", draw(config_file(actions))]
            continue
        if edit == "set":
            action = draw(st.sampled_from(actions))
            tokens = draw(flag_tokens(action))
            given = [i for i, token in enumerate(argv) if token in action.option_strings]
            if given and tokens and action.nargs is None and tokens[0] in action.option_strings \
                    and len(tokens) == 2 and not draw(st.booleans()):
                argv[given[0] + 1] = tokens[1]  # replace the command's value
            else:
                argv += tokens
        elif edit == "drop":
            flags = [i for i, token in enumerate(argv) if token.startswith("--")]
            if flags:
                i = draw(st.sampled_from(flags))
                end = next((j for j in range(i + 1, len(argv)) if argv[j].startswith("--")),
                           len(argv))
                del argv[i:end]
        else:
            argv += draw(st.sampled_from([["--no-such-flag"], ["--no-such-flag", "1"], ["-x"],
                                          ["stray"], ["--"], ["--data", "{data}"]]))
    return argv


@pytest.fixture(scope="module")
def places(tiny_dataset_dir, target_dir, tmp_path_factory) -> dict[str, str]:
    """What the commands' {names} stand for: datasets, a pretrained run, encoders, images, a
    sweep, --config files, a plain file ({out}, each example's own folder, is added later)."""
    from PIL import Image

    from peftrec.dataset_tools.images import build_image_store

    root = tmp_path_factory.mktemp("script_flags")
    run_pretrain(tiny_dataset_dir, root / "run", "--epochs", "1")
    (root / "images").mkdir()
    for item in ("i0", "i1"):
        Image.new("RGB", (4, 4), (200, 10, 10)).save(root / "images" / f"{item}.png")
    build_image_store(root / "images", root / "store", size=32)
    texts = {"log.csv": GOOD_LOG, "file.txt": "plain text\n", "good.yaml": "seed: 3\n",
             "unknown.yaml": "no_such_setting: 1\n", "bad.yaml": "a: [\n", "list.yaml": "- 1\n",
             "sweep.yaml": yaml.safe_dump({"script": "pretrain_id", "output_dir": "sweep",
                                           "base": {"dataset": str(tiny_dataset_dir),
                                                    "epochs": 1, "cpu": True},
                                           "seeds": [0]})}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    return {"data": str(tiny_dataset_dir), "target": str(target_dir), "run": str(root / "run"),
            "bert": str(save_bert(root / "bert")), "vit": str(save_vision(root / "vit", "vit")),
            "images": str(root / "images"), "store": str(root / "store"),
            "log": str(root / "log.csv"), "file": str(root / "file.txt"),
            "sweep": str(root / "sweep.yaml"), "config_good": str(root / "good.yaml"),
            "config_unknown": str(root / "unknown.yaml"), "config_bad": str(root / "bad.yaml"),
            "config_list": str(root / "list.yaml")}


def flag_outcome(script: str, argv: list[str], places: dict[str, str]) -> str:
    """Run scripts/<script>.py's main as the command line does (run_main), stopped where its
    work starts: 'resolved', 'done' (it finished without reaching that point), or its one
    error line. The shared inputs must stay as they were."""
    module = MODULES[script]
    inputs = {name: sorted(p.name for p in Path(places[name]).iterdir())
              for name in ("data", "target", "run")}
    with tempfile.TemporaryDirectory() as out, pytest.MonkeyPatch.context() as patch:
        here = {**places, "out": out}
        for name, value in here.items():
            argv = [token.replace(f"{{{name}}}", value) for token in argv]
        while "<yaml>" in argv:  # "<yaml>", TEXT: the drawn --config file's text
            at = argv.index("<yaml>")
            (Path(out) / "drawn.yaml").write_text(argv[at + 1], encoding="utf-8")
            del argv[at:at + 2]

        def stop(*args, **kwargs):
            raise WorkStarts

        for target in WORK_STARTS:
            patch.setattr(target, stop)
        for name in SCRIPT_WORK:
            if hasattr(module, name):
                patch.setattr(module, name, stop)
        if script not in BASES:  # a script this test does not know yet: its parsing only
            real_parse = module.parse_args
            patch.setattr(module, "parse_args", lambda *a, **k: stop(real_parse(*a, **k)))
        patch.chdir(out)  # a default output folder (runs/...) lands in the example's folder
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                run_main(module.main, argv)
            result = "done"
        except WorkStarts:
            result = "resolved"
        except SystemExit as exit_info:
            result = one_error_line(exit_info.code, err.getvalue())
    assert inputs == {name: sorted(p.name for p in Path(places[name]).iterdir())
                      for name in inputs}, argv
    return result


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in SKIPPED_SCRIPTS])
@settings(SETTINGS, max_examples=SCRIPT_FLAG_EXAMPLES)
@given(data=st.data())
def test_random_flags_of_every_script(places, script, data):
    argv = data.draw(script_command(script), label="argv")
    result = flag_outcome(script, argv, places)
    event("error" if result.startswith("error") or "error:" in result else result)


def test_every_script_has_a_working_command(places):
    """The property is not vacuous: each script's command reaches its work, and every
    script in scripts/ has one (a new script: add it to BASES)."""
    assert sorted(BASES) == [s for s in SCRIPTS if s not in SKIPPED_SCRIPTS]
    for script, argv in BASES.items():
        outcome = flag_outcome(script, argv, places)
        if script == "report" and importlib.util.find_spec("matplotlib") is None:
            # Its optional extra is not installed (CI installs .[dev,mlflow]): one line.
            assert outcome == f"error: {MATPLOTLIB_MISSING}"
            continue
        assert outcome == "resolved", script


FOUND_FLAGS = [  # (script, flags added to its command, the error expected): bugs the
    # property found: each was a traceback, several lines, or a wrong value taken (a `cpu:
    # 'no'` that turned --cpu on, a `k: 1.5`); docs/reliability.md lists them
    ("build_image_store", ["--config", "{config_bad}"],
     "bad.yaml is not valid YAML at line 2, column 1: expected the node content, but found"),
    ("sweep", ["--config", "{out}/drawn.yaml", "<yaml>", "sweep: [a]\n"],
     "sweep: one value expected, not ['a']"),
    ("split_domains", ["--config", "x" * 300], "File name too long: 'xxx"),
    ("build_image_store", ["--format=--"], "--format: one value expected, not '--'"),
    ("pretrain_id", ["--config=--"], "--config: one value expected, not '--'"),
    ("adapter_diffusion_step", ["--config", "{out}/drawn.yaml", "<yaml>", "epochs: null\n"],
     "epochs: a value is needed, not null (default 200)"),
    ("split_domains", ["--source-values=--"], "--source-values: one value expected, not '--'"),
    ("pretrain_id", ["--config", "{out}/drawn.yaml", "<yaml>", "backbone: nope\n"],
     "backbone: 'nope' is not one of ['adrec', "),
    ("build_image_store", ["--config", "{out}/drawn.yaml", "<yaml>", "size: [8]\n"],
     "size: one value expected, not [8]"),
    ("evaluate", ["--config", "{out}/drawn.yaml", "<yaml>", "cpu: 'no'\n"],
     "cpu: true or false, not 'no'"),
    ("recommend", ["--config", "{out}/drawn.yaml", "<yaml>", "k: 1.5\n"],
     "k: invalid literal for int() with base 10: '1.5'"),
]


def test_found_flag_bugs_are_one_line_errors(places):
    for script, flags, expected in FOUND_FLAGS:
        result = flag_outcome(script, [*BASES[script], *flags], places)
        assert expected in result, (script, result)
    # null in a file is unset: required again (was None, then an AttributeError).
    command = [token for token in BASES["split_domains"] if token != "group0"]
    command.remove("--source-values")
    result = flag_outcome("split_domains", [*command, "--config", "{out}/drawn.yaml", "<yaml>",
                                            "source_values: null\n"], places)
    assert "one of the arguments --source-values --source-range is required" in result, result
    # A sweep file is read as a --config file is (downstream.sweep.load_sweep).
    result = flag_outcome("sweep", ["{config_bad}"], places)
    assert "bad.yaml is not valid YAML at line 2, column 1: expected the node" in result, result
