"""Sweeps: a script run for every combination of a grid and/or a list of flag overrides, for
every seed, one run after another (each in its own process, or as an `accelerate launch`
job), then one table of the results.

    python scripts/sweep.py benchmarks/sweeps/in-domain-ml-1m.yaml [--dry-run | --collect-only]

A sweep file (YAML) names flags as `--config` files do (`batch_size` or `batch-size`):

    script: pretrain_id             # scripts/<name>.py; a `runs` entry may name its own
    output_dir: runs/sweeps/lr      # default: runs/sweeps/<sweep file name>
    base: {dataset: ml-100k, epochs: 10, repeat_bias: true}    # flags of every run
    grid: {lr: [1e-3, 2e-3], batch_size: [64, 128]}           # every combination
    runs:                           # overrides of base, each crossed with the grid
      - {name: plain}               # OUTPUT_DIR/plain,lr=1e-3,batch_size=64/seed0, ...
      - {name: wide, hidden_size: 128, seeds: [0]}             # its own seeds
    seeds: [0, 1, 2]                # default [0]
    launcher: python                # or accelerate: accelerate launch LAUNCH_ARGS scripts/X.py
    launch_args: [--config_file, scripts/accelerate_configs/single_gpu.yaml]

A value `true` gives a switch (`false` leaves it out, or gives `--no-X` where the script has
one), `null` leaves a flag unset, a list gives a flag of several values. Every key, script,
flag and value is checked against the parser the script itself builds before the first run
starts. Each run writes OUTPUT_DIR/<combination>/seed<N>/ (a name may hold `/`: nested
folders): one with a metrics.json is skipped, one with only a config.json (interrupted) is
resumed with `--resume`. The table, OUTPUT_DIR/results.csv and results.md, has one row per
combination: the mean and sample standard deviation over seeds of test and validation
NDCG@10 and HR@10.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import importlib.util
import io
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from peftrec.dataset_tools import atomic_write
from peftrec.dataset_tools.checkpoints import METRICS, RUN_CONFIG
from peftrec.pretraining.cli import (
    CommandLineError,
    add_settings,
    cli_parser,
    parse_args,
    read_yaml,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
KEYS = ("script", "output_dir", "base", "grid", "runs", "seeds", "launcher", "launch_args")
RUN_KEYS = ("name", "script", "seeds")  # the other keys of a `runs` entry are flags
LAUNCHERS = ("python", "accelerate")
# Flags every run gets from the sweep itself.
SET_BY_SWEEP = {"output_dir": "OUTPUT_DIR/<combination>/seed<N>", "seed": "the `seeds` key",
                "resume": "an interrupted run"}
METRIC_COLUMNS = ("test ndcg@10", "test hr@10", "valid ndcg@10", "valid hr@10")
FOLDER_NAME = re.compile(r"[A-Za-z0-9._+=,@-]+")


class SweepFileError(CommandLineError):
    """A bad sweep file: the message names the file and the key."""


class RunFailed(RuntimeError):
    """A run of the sweep exited with an error."""


@dataclass(frozen=True)
class Combination:
    """One setting of the sweep: its script and flags, run once per seed."""

    name: str
    script: str
    argv: tuple[str, ...]  # the flags, as the script takes them
    settings: dict  # flag -> value as the sweep file gave it (for the table's columns)
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Run:
    combination: Combination
    seed: int
    folder: Path

    @property
    def finished(self) -> bool:
        return (self.folder / METRICS).is_file()

    @property
    def started(self) -> bool:
        return (self.folder / RUN_CONFIG).is_file()

    def argv(self) -> list[str]:
        """The script's flags: an interrupted run (config.json, no metrics.json) resumes."""
        resume = ["--resume"] if self.started and not self.finished else []
        return [*self.combination.argv, "--output-dir", str(self.folder),
                "--seed", str(self.seed), *resume]


@dataclass(frozen=True)
class Sweep:
    path: Path
    output_dir: Path
    combinations: tuple[Combination, ...]
    launcher: str = "python"
    launch_args: tuple[str, ...] = ()

    def runs(self) -> list[Run]:
        return [run for combination in self.combinations for run in self.runs_of(combination)]

    def runs_of(self, combination: Combination) -> list[Run]:
        return [Run(combination, seed, self.output_dir / combination.name / f"seed{seed}")
                for seed in combination.seeds]

    def command(self, run: Run) -> list[str]:
        script = str(SCRIPTS / f"{run.combination.script}.py")
        launcher = ([sys.executable] if self.launcher == "python" else
                    [sys.executable, "-m", "accelerate.commands.launch", *self.launch_args])
        return [*launcher, script, *run.argv()]


# ----------------------------------------------------------------------- the sweep file


def load_sweep(path: Path, output_dir: Path | None = None) -> Sweep:
    """Read and check a sweep file: every key, script, flag and value (against the parser
    each script builds) and every combination's whole command line, before anything runs.
    Bad input raises CommandLineError naming the file and the key."""
    path = Path(path)

    def fail(where: str, message: str):
        raise SweepFileError(f"{path}: {where}: {message}")

    if not path.is_file():
        raise CommandLineError(f"{path}: no such sweep file")
    spec = read_yaml(path, str(path))
    if not isinstance(spec, dict):
        raise CommandLineError(f"{path}: a sweep file is a mapping of {', '.join(KEYS)}")
    for key in spec:
        if key not in KEYS:
            fail(str(key), f"unknown key; a sweep file has {', '.join(KEYS)}")
    script = spec.get("script")
    if script is not None:
        _check_script(script, "script", fail)
    seeds = _seeds(spec.get("seeds", [0]), "seeds", fail)
    launcher = spec.get("launcher", "python")
    if launcher not in LAUNCHERS:
        fail("launcher", f"{launcher!r}: one of {', '.join(LAUNCHERS)}")
    launch_args = _launch_args(spec.get("launch_args") or [], launcher, fail)
    base = _flags(spec.get("base") or {}, "base", fail)
    grid = _flags(spec.get("grid") or {}, "grid", fail)
    for values, where in grid.values():
        if not isinstance(values, list) or not values:
            fail(where, f"a non-empty list of values, not {values!r}")
    entries = spec.get("runs")
    if "runs" in spec and (not isinstance(entries, list) or not entries):
        fail("runs", "a non-empty list of mappings (name, script, seeds and flags)")
    combinations, names = [], {}
    for index, entry in enumerate(entries or [{}]):
        where = f"runs[{index}]" if entries else "base"
        if not isinstance(entry, dict):
            fail(where, f"a mapping of name, script, seeds and flags, not {entry!r}")
        own = {key: entry[key] for key in RUN_KEYS if key in entry}
        run_script = own.get("script", script)
        if run_script is None:
            fail("script", "missing: the scripts/<name>.py to run (top level or per run)")
        if "script" in own:
            _check_script(run_script, f"{where}.script", fail)
        run_seeds = _seeds(own["seeds"], f"{where}.seeds", fail) if "seeds" in own else seeds
        overrides = _flags({k: v for k, v in entry.items() if k not in RUN_KEYS}, where, fail)
        if "name" in own:
            name = own["name"]
            if not isinstance(name, str) or not all(
                    FOLDER_NAME.fullmatch(part) and part not in (".", "..")
                    for part in name.split("/")):
                fail(f"{where}.name", f"{name!r} is not a folder name (letters, digits and "
                     "._+=,@- only, / between folders)")
        else:
            name = _auto_name(overrides) if overrides or not grid else ""
        for point in itertools.product(*[[(key, value, f"{where_}[{i}]")
                                          for i, value in enumerate(values)]
                                         for key, (values, where_) in grid.items()]):
            point_flags = {key: (value, point_where) for key, value, point_where in point}
            full_name = ",".join(part for part in (name, _auto_name(point_flags)) if part)
            if full_name in names:
                fail(where, f"the combination {full_name!r} comes twice ({names[full_name]} "
                     "too); give the runs distinct names")
            names[full_name] = where
            flags = {**base, **overrides, **point_flags}
            script_where = f"{where}.script" if "script" in own else "script"
            combinations.append(_combination(full_name, run_script, flags, run_seeds, where,
                                             script_where, fail))
    default_dir = Path("runs") / "sweeps" / path.stem
    output = spec.get("output_dir", default_dir)
    if not isinstance(output, str | Path):
        fail("output_dir", f"a folder, not {output!r}")
    return Sweep(path, Path(output_dir or output), tuple(combinations), launcher, launch_args)


def _check_script(script, where: str, fail: Callable) -> None:
    available = sorted(p.stem for p in SCRIPTS.glob("*.py") if p.stem != "sweep")
    if (not isinstance(script, str) or not re.fullmatch(r"\w+", script)
            or script not in available):
        fail(where, f"unknown script {script!r}; scripts/ has {', '.join(available)}")


def _seeds(value, where: str, fail: Callable) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or any(isinstance(s, bool) or not isinstance(s, int) for s in value)):
        fail(where, f"a non-empty list of integers, not {value!r}")
    if len(set(value)) != len(value):
        fail(where, f"{value}: a seed comes twice")
    return tuple(value)


def _flags(mapping, where: str, fail: Callable) -> dict[str, tuple[object, str]]:
    """flag (with underscores) -> (value, where the sweep file gives it)."""
    if not isinstance(mapping, dict):
        fail(where, f"a mapping of flag: value, not {mapping!r}")
    flags = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name in flags:
            fail(f"{where}.{key}", "the same flag twice (dashes and underscores are the same)")
        if name in SET_BY_SWEEP:
            fail(f"{where}.{key}", f"set by the sweep ({SET_BY_SWEEP[name]}), not a flag to give")
        flags[name] = (value, f"{where}.{key}")
    return flags


def _launch_args(value, launcher: str, fail: Callable) -> tuple[str, ...]:
    if not isinstance(value, list) or any(isinstance(a, dict | list) for a in value):
        fail("launch_args", f"a list of `accelerate launch` arguments, not {value!r}")
    args = tuple(str(a) for a in value)
    if args and launcher != "accelerate":
        fail("launch_args", "only with launcher: accelerate")
    if launcher == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        parser = launch_command_parser()

        def error(message):
            fail("launch_args", f"accelerate launch: {message}")

        parser.error = error
        parser.parse_args([*args, "script.py"])
    return args


def _render(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(_render(v) for v in value)
    return "" if value is None else str(value)


def _auto_name(flags: dict[str, tuple[object, str]]) -> str:
    """A folder name from the flags: `lr=2e-3,batch_size=64`."""
    text = ",".join(f"{key}={_render(value)}" for key, (value, _) in flags.items())
    return re.sub(r"[^A-Za-z0-9._+=,@-]", "-", text)


def _combination(name: str, script: str, flags: dict[str, tuple[object, str]],
                 seeds: tuple[int, ...], where: str, script_where: str,
                 fail: Callable) -> Combination:
    """Check the combination's flags against the script's own parser, then its whole command
    line as the script parses it; an error names the sweep file's key."""
    parser = script_parser(script)
    missing = [option for option in ("--output-dir", "--seed", "--resume")
               if option not in parser._option_string_actions]
    if missing:
        fail(script_where, f"scripts/{script}.py has no {', '.join(missing)}: a sweep runs "
             "scripts that write a run folder (pretrain_*, finetune_full, adapter_*)")
    argv, owners = [], {}
    for key, (value, key_where) in flags.items():
        action = _action(parser, key, script, key_where, fail)
        argv += _tokens(action, value, key_where, fail)
        owners[action.dest] = key_where
    label = (where if not name else f"combination {name!r}" if where == "base"
             else f"{where} ({name!r})")

    def error(message: str):
        found = re.match(r"argument (\S+): (.*)", message, re.DOTALL)
        if found:
            options = found[1].split("/")
            for action in parser._actions:
                if set(action.option_strings) & set(options) and action.dest in owners:
                    fail(owners[action.dest], f"{found[2]} ({found[1]})")
        fail(label, message)

    parser.error = error
    try:
        parse_args(parser, [*argv, "--output-dir", "OUTPUT_DIR", "--seed", str(seeds[0])])
    except SweepFileError:
        raise
    except CommandLineError as problem:  # a check of the script's own, after argparse's
        fail(label, str(problem))
    settings = {key: _render(value) for key, (value, _) in flags.items()}
    return Combination(name or "base", script, tuple(argv), settings, seeds)


def _action(parser: argparse.ArgumentParser, key: str, script: str, where: str,
            fail: Callable) -> argparse.Action:
    options = {option: action for option, action in parser._option_string_actions.items()
               if not isinstance(action, argparse._HelpAction | argparse._VersionAction)}
    action = options.get("--" + key.replace("_", "-")) or options.get("--" + key)
    if action is None:
        known = sorted({o[2:].replace("-", "_") for o in options if o.startswith("--")}
                       - set(SET_BY_SWEEP))
        close = difflib.get_close_matches(key, known, n=1)
        fail(where, f"scripts/{script}.py has no flag --{key.replace('_', '-')}"
             + (f"; did you mean {close[0]}?" if close else ""))
    return action


def _tokens(action: argparse.Action, value, where: str, fail: Callable) -> list[str]:
    """The command-line words of a flag's value."""
    # A switch by its positive name (not --no-X); otherwise the longest (--output-dir).
    option = (action.option_strings[0] if isinstance(action, argparse.BooleanOptionalAction)
              else max(action.option_strings, key=len))
    if value is None:
        return []
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            fail(where, f"{option} is a switch: true or false, not {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [option if value else "--no-" + option[2:]]
        return [option] if value else []
    if isinstance(value, bool):
        fail(where, f"{option} takes a value, not {_render(value)} (YAML reads yes, no, on, "
             "off, true and false as booleans: quote the word)")
    if isinstance(value, dict):
        fail(where, f"{option} takes a value, not a mapping")
    if isinstance(value, list):
        if action.nargs not in ("+", "*") and not isinstance(action.nargs, int):
            fail(where, f"{option} takes one value, not a list")
        if any(isinstance(v, dict | list | bool) or v is None for v in value):
            fail(where, f"{option}: a list of plain values, not {value!r}")
        return [option, *(str(v) for v in value)]
    text = str(value)
    return [f"{option}={text}"] if text.startswith("-") else [option, text]  # "-1" a value


class _Captured(Exception):
    """Carries the parser a script built out of its main()."""


def script_parser(script: str) -> argparse.ArgumentParser:
    """The argument parser scripts/<script>.py builds: its `main([])` runs until it parses
    its flags, and is stopped there (nothing else of the script runs), so a sweep is checked
    against the very flags the script takes. Every script parses before doing anything."""
    main = script_module(script).main
    parse = argparse.ArgumentParser.parse_known_args

    def capture(parser, *args, **kwargs):
        raise _Captured(parser)

    argparse.ArgumentParser.parse_known_args = capture
    try:
        main([])
    except _Captured as captured:
        return captured.args[0]
    finally:
        argparse.ArgumentParser.parse_known_args = parse
    raise CommandLineError(f"scripts/{script}.py parses no flags")


@cache
def script_module(script: str):
    """scripts/<script>.py imported as a module (scripts are not a package); once."""
    path = SCRIPTS / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"peftrec_script_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------- running


def run_command(command: Sequence[str]) -> int:
    """Run one command in its own process (its output goes to the sweep's); its exit code."""
    return subprocess.run(list(command)).returncode


def run_sweep(sweep: Sweep, execute: Callable[[list[str]], int] = run_command) -> None:
    """Run every run of `sweep` in order: finished ones (metrics.json) are skipped,
    interrupted ones (config.json only) resumed. The first failure stops the sweep."""
    runs = sweep.runs()
    for number, run in enumerate(runs, 1):
        label = f"[{number}/{len(runs)}] {run.combination.name} seed {run.seed}"
        if run.finished:
            print(f"{label}: finished, skipped", flush=True)
            continue
        command = sweep.command(run)
        print(f"{label}: {'resuming' if run.started else 'running'}\n+ {shlex.join(command)}",
              flush=True)
        code = execute(command)
        if code != 0:
            raise RunFailed(f"{label} failed (exit code {code}): {run.folder}; run the sweep "
                            "again to resume it")
        if not run.finished:
            raise RunFailed(f"{label} wrote no {METRICS} in {run.folder}")


def print_plan(sweep: Sweep) -> None:
    """Each run's command, and whether running the sweep would skip or resume it."""
    runs = sweep.runs()
    for number, run in enumerate(runs, 1):
        state = "finished, skipped" if run.finished else "resumed" if run.started else "new"
        print(f"# [{number}/{len(runs)}] {run.combination.name} seed {run.seed}: {state}")
        if not run.finished:
            print(shlex.join(sweep.command(run)))


# ------------------------------------------------------------------------- the table


def mean_spread(values: Sequence[float]) -> str:
    """Mean ± sample standard deviation (the value alone for one seed), 4 decimals: the
    format of benchmarks/tables.py's `spread`, which the benchmark drivers use."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def collect(sweep: Sweep) -> list[dict]:
    """One row per combination with a finished run: its name, script, the flags that vary
    across the sweep, the seeds finished and, per metric, the values over those seeds."""
    varying = [key for key in dict.fromkeys(k for c in sweep.combinations for k in c.settings)
               if len({c.settings.get(key, "") for c in sweep.combinations}) > 1]
    rows = []
    for combination in sweep.combinations:
        finished = [run for run in sweep.runs_of(combination) if run.finished]
        if not finished:
            continue
        metrics = [json.loads((run.folder / METRICS).read_text()) for run in finished]
        row = {"name": combination.name, "script": combination.script,
               **{key: combination.settings.get(key, "") for key in varying},
               "seeds": len(finished), "planned_seeds": len(combination.seeds)}
        for column in METRIC_COLUMNS:
            split, metric = column.split()
            row[column] = [m[split][metric] for m in metrics
                           if metric in (m.get(split) or {})]
        rows.append(row)
    return rows


def results_csv(rows: list[dict]) -> str:
    """The rows as CSV: metric columns as `<split>_<metric>_mean` and `_sd` (sample sd; empty
    for one seed)."""
    columns = list(dict.fromkeys(key for row in rows for key in row if key not in METRIC_COLUMNS))
    header = [*columns, *(f"{c.replace(' ', '_')}_{stat}" for c in METRIC_COLUMNS
                          for stat in ("mean", "sd"))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        stats = []
        for column in METRIC_COLUMNS:
            values = row[column]
            stats += [f"{statistics.mean(values):.6f}" if values else "",
                      f"{statistics.stdev(values):.6f}" if len(values) > 1 else ""]
        writer.writerow([*(row.get(c, "") for c in columns), *stats])
    return out.getvalue()


def results_markdown(sweep: Sweep, rows: list[dict]) -> str:
    lines = ["| combination | seeds | " + " | ".join(METRIC_COLUMNS) + " |",
             "|" + "---|" * (2 + len(METRIC_COLUMNS))]
    for row in rows:
        seeds = (str(row["seeds"]) if row["seeds"] == row["planned_seeds"]
                 else f"{row['seeds']} of {row['planned seeds']}")
        cells = [mean_spread(row[c]) if row[c] else "" for c in METRIC_COLUMNS]
        lines.append(f"| {row['name']} | {seeds} | " + " | ".join(cells) + " |")
    runs = sweep.runs()
    done = sum(run.finished for run in runs)
    lines += ["", f"_Sweep `{sweep.path}` ({done} of {len(runs)} runs finished, in "
              f"`{sweep.output_dir}`): mean ± sample standard deviation over seeds; full "
              "ranking, the best checkpoint on validation NDCG@10 tested._"]
    return "\n".join(lines) + "\n"


def write_results(sweep: Sweep) -> str:
    """Write OUTPUT_DIR/results.csv and results.md (each atomically); the Markdown."""
    rows = collect(sweep)
    markdown = results_markdown(sweep, rows)
    for name, text in (("results.csv", results_csv(rows)), ("results.md", markdown)):
        atomic_write(sweep.output_dir / name, text)
    return markdown


# ------------------------------------------------------------------------- the script


@dataclass(kw_only=True)
class SweepSettings:
    """The settings of scripts/sweep.py (a flag each, pretraining.cli); the sweep file
    itself holds the runs'."""

    sweep: Path = field(metadata={"positional": True, "metavar": "SWEEP",
                                  "help": "sweep file (YAML)"})
    output_dir: Path | None = field(default=None, metadata={
        "help": "where the runs and the table go (default: the file's output_dir)"})
    # At most one of these two: the group is exclusive.
    dry_run: bool = field(default=False, metadata={
        "help": "run nothing: print each run's command, and whether it would be skipped "
        "(finished) or resumed"})
    collect_only: bool = field(default=False, metadata={
        "help": "run nothing: write the table of the finished runs"})


RUN_MODES = ("dry_run", "collect_only")


def sweep_parser(description: str) -> argparse.ArgumentParser:
    """Flags of scripts/sweep.py."""
    parser = cli_parser(description)
    add_settings(parser, SweepSettings, exclude=RUN_MODES)
    add_settings(parser.add_mutually_exclusive_group(), SweepSettings, RUN_MODES)
    return parser


def sweep_command(args: argparse.Namespace,
                  execute: Callable[[list[str]], int] = run_command) -> str | None:
    """What scripts/sweep.py does: check the whole sweep file, then plan, run or collect;
    returns the table's Markdown (None for a dry run). A failed run exits 1."""
    sweep = load_sweep(args.sweep, args.output_dir)
    if args.dry_run:
        print_plan(sweep)
        return None
    if not args.collect_only:
        try:
            run_sweep(sweep, execute)
        except RunFailed as failure:
            print(f"error: {failure}", file=sys.stderr)
            sys.exit(1)
    markdown = write_results(sweep)
    print(f"\n{markdown}\nwrote {sweep.output_dir / 'results.csv'} and results.md")
    return markdown
