"""Preparing synthetic logs of growing size: the pandas (in-memory) and the duckdb
(out-of-core) engines of scripts/prepare_data.py, wall time and peak memory.

Each log is generated once into `--work-dir` (kept for later runs) with
scripts/generate_synthetic.py's defaults and `--items` items. Each preparation is the real
command, `scripts/prepare_data.py --input ... --engine E`, in its own process; its peak
memory is that process's peak resident set (`os.wait4`), its time the wall time. The pandas
engine runs up to `--pandas-max` interactions. Where both engines ran on a log, the
`same folder` column says whether their dataset fingerprints are equal. The machine is
shared, so each row records the 1-minute load average before and after it.

    python benchmarks/preparation.py --sizes 1000000 10000000 100000000 \\
        --results preparation/synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results import ROOT, write_result
from tables import markdown

from peftrec.dataset_tools import SyntheticConfig, write_synthetic_log

COLUMNS = ("interactions", "engine", "seconds", "peak MB", "users", "items",
           "interactions kept", "same folder", "load before", "load after")


def synthetic_log(work: Path, interactions: int, items: int) -> Path:
    """The log of `interactions` rows, generated on first use."""
    folder = work / f"log-{interactions}-items-{items}"
    if not (folder / "interactions.tsv").is_file():
        write_synthetic_log(SyntheticConfig(num_interactions=interactions, num_items=items),
                            folder)
    return folder


def prepare(log: Path, output: Path, engine: str, k_core: int) -> dict:
    """Run scripts/prepare_data.py on `log` in a child process; its time and peak memory."""
    command = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"),
               "--input", str(log / "interactions.tsv"), "--items", str(log / "items.tsv"),
               "--format", "tsv", "--user-col", "user_id", "--item-col", "item_id",
               "--time-col", "timestamp", "--k-core", str(k_core), "--engine", engine,
               "--output", str(output)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    errors = child.stderr.read().decode()
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{errors}")
    info = json.loads((output / "dataset_info.json").read_text())
    return {"engine": engine, "seconds": seconds, "peak MB": usage.ru_maxrss // 1024,
            "users": info["statistics"]["users"], "items": info["statistics"]["items"],
            "interactions kept": info["statistics"]["interactions"],
            "fingerprint": info["fingerprint"], "load before": load_before,
            "load after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="interactions per synthetic log")
    parser.add_argument("--items", type=int, default=100_000, help="catalog size")
    parser.add_argument("--k-core", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=["pandas", "duckdb"],
                        choices=["pandas", "duckdb"])
    parser.add_argument("--pandas-max", type=int, default=10_000_000,
                        help="largest log the pandas engine is run on (it needs ~0.3 GB per "
                        "million interactions)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/peftrec-preparation"),
                        help="where the logs are generated (once) and prepared")
    parser.add_argument("--results", metavar="NAME",
                        help="also write benchmarks/results/NAME.{json,md}")
    args = parser.parse_args(argv)
    rows = []
    for interactions in args.sizes:
        log = synthetic_log(args.work_dir, interactions, args.items)
        ran = []
        for engine in args.engines:
            if engine == "pandas" and interactions > args.pandas_max:
                continue
            output = args.work_dir / f"prepared-{interactions}-{engine}"
            ran.append({"interactions": interactions,
                        **prepare(log, output, engine, args.k_core)})
            shutil.rmtree(output)
            print(json.dumps(ran[-1]), flush=True)
        for row in ran:
            row["same folder"] = len({r["fingerprint"] for r in ran}) == 1 if len(ran) > 1 else ""
        rows += ran
    table = markdown(rows, COLUMNS)
    print(table)
    if args.results:
        settings = {"items": args.items, "k_core": args.k_core, "cpus": os.cpu_count(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                       / 2**30, 1)}
        note = (f"Synthetic logs (scripts/generate_synthetic.py defaults, {args.items:,} items), "
                f"prepared with `--k-core {args.k_core}` by scripts/prepare_data.py in a fresh "
                "process each; peak MB is that process's peak resident memory; `same folder`: "
                "the engines' dataset fingerprints are equal. Load: 1-minute load average of "
                f"the shared {os.cpu_count()}-core machine before and after each row.")
        path = write_result(args.results, rows, f"{table}\n\n{note}\n", settings)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
