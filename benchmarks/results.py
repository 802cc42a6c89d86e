"""Result files of the benchmarks, and the README and docs tables generated from them.

A benchmark writes each table as `benchmarks/results/<name>.json` (its rows plus where they
came from: command, commit, versions, device, date) and `<name>.md` (the same, as the
Markdown shown in the README and docs/). A block in README.md or any docs/*.md

    <!-- results: transfer/ml-1m-to-ml-100k -->
    ...
    <!-- /results -->

holds exactly the .md file's text: `python benchmarks/results.py` rewrites every block of
every such file from its results file (`--check` only reports the stale ones), and the test
suite fails when a block and its file disagree, so no number reaches the README or the docs
by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from peftrec.dataset_tools import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /results -->)",
                   re.DOTALL)


def provenance(command: list[str] | None = None) -> dict:
    """Where a result comes from: the command (quoted as a shell would need it, so that it
    can be pasted back), the commit (and whether the tree had uncommitted changes), library
    versions, the device and the date."""
    import torch

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            continue
    device = (f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available()
              else f"CPU, {os.cpu_count()} cores")
    if command is None:  # this process's own command, its script relative to the repository
        script = Path(sys.argv[0]).resolve()
        shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
        command = ["python", str(shown), *sys.argv[1:]]
    return {
        "command": shlex.join(command),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "versions": versions,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def add_run_arguments(parser: argparse.ArgumentParser, output_dir: str) -> None:
    """The flags every benchmark driver shares: the seeds, a subset of its rows, summarising
    the finished runs only, the results file, the run folder, and (after `--`) flags for
    every run."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", default=None, help="run only the rows so named")
    parser.add_argument("--summary-only", action="store_true",
                        help="train nothing: summarise the finished runs (rows without one "
                        "are left out)")
    parser.add_argument("--results", metavar="NAME",
                        help="also write benchmarks/results/NAME.{json,md} (+ .png where drawn)")
    parser.add_argument("--output-dir", type=Path, default=Path(output_dir))
    parser.add_argument("extra", nargs=argparse.REMAINDER)


def publish_report(args: argparse.Namespace, rows: list[dict], report: str,
                   settings: dict) -> Path | None:
    """A driver's report (the flags of `add_run_arguments`): printed, written as
    OUTPUT_DIR/results.md, and, with `--results` and rows to show, as a results file
    (`write_result`, whose .md path it returns)."""
    print(report)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.md").write_text(report)
    if args.results and rows:
        return write_result(args.results, rows, report, settings)
    return None


def write_result(name: str, rows: list[dict], markdown_text: str, extra: dict | None = None,
                 results_dir: Path = RESULTS_DIR) -> Path:
    """Write `<name>.json` and `<name>.md` under `results_dir` (atomically: a reader never
    sees half a file) and return the .md path."""
    meta = provenance()
    stem = results_dir / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    footer = (f"\n_Written by `{meta['command']}` at commit {meta['commit']}"
              f"{' (with uncommitted changes)' if meta['uncommitted_changes'] else ''}, "
              f"{meta['date']}, {meta['device']}, "
              + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "._\n")
    payload = {**meta, **(extra or {}), "rows": rows}
    atomic_write(stem.with_suffix(".json"), json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write(stem.with_suffix(".md"), markdown_text.rstrip("\n") + "\n" + footer)
    return stem.with_suffix(".md")


def render_blocks(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """`text` with every results block replaced by its file's Markdown."""

    def fill(match: re.Match) -> str:
        path = results_dir / f"{match['name']}.md"
        if not path.is_file():
            raise FileNotFoundError(f"results block {match['name']!r}: no {path}; run the "
                                    "benchmark that writes it, or remove the block")
        return match.group(1) + path.read_text() + match.group(4)

    return BLOCK.sub(fill, text)


def block_files(root: Path = ROOT) -> list[Path]:
    """The files whose results blocks are generated: README.md and every Markdown file
    under docs/ (those without a block are left alone)."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def sync(root: Path = ROOT, results_dir: Path = RESULTS_DIR, check: bool = False
         ) -> dict[Path, tuple[int, bool]]:
    """Render the blocks of every file of `block_files(root)`, then (unless `check`)
    rewrite the stale files; a block without its results file stops it before anything is
    written. Returns, per file with blocks, (its number of blocks, whether it was stale)."""
    rendered = {}
    for path in block_files(root):
        text = path.read_text()
        count = sum(1 for _ in BLOCK.finditer(text))
        if not count:
            continue
        try:
            rendered[path] = (text, render_blocks(text, results_dir), count)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{path.relative_to(root)}: {error}") from None
    report = {}
    for path, (text, new, count) in rendered.items():
        if new != text and not check:
            atomic_write(path, new)
        report[path] = (count, new != text)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Rewrite the results blocks of README.md and docs/*.md from "
        "benchmarks/results/.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if any block differs from its file")
    args = parser.parse_args(argv)
    try:
        report = sync(check=args.check)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path, (count, stale) in report.items():
        state = ("STALE" if args.check else "rewritten") if stale else "already in sync"
        print(f"{path.relative_to(ROOT)}: {count} results block(s) from benchmarks/results/ "
              f"({state})")
    if args.check and any(stale for _, stale in report.values()):
        print("run `python benchmarks/results.py` to rewrite them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
