"""Every script's flags are generated from config dataclass fields by the one generator
(`pretraining.cli.add_settings`), with help text, and a `--config` file can give any of
them, required ones and positional arguments included (issue 26 item 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from peftrec.downstream.report import report_parser
from peftrec.downstream.serving import recommend_parser
from peftrec.downstream.sweep import script_parser, sweep_parser
from peftrec.pretraining.cli import parse_args
from tests.helpers import ROOT

SCRIPTS = sorted(path.stem for path in (ROOT / "scripts").glob("*.py"))

# The only flags declared by hand: --config and --debug, the parser's own (cli_parser),
# which are not settings of a job (where the settings come from; how errors are shown).
HAND_DECLARED = {"pretraining/cli.py": {"--config", "--debug"}}


def imported_modules(script: Path) -> list[Path]:
    """The files of the peftrec modules `script` imports (where its parser is built)."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    files = []
    for name in sorted(names):
        if name.startswith("peftrec."):
            path = ROOT / name.removeprefix("peftrec.").replace(".", "/")
            files.append(path.with_suffix(".py") if path.with_suffix(".py").is_file()
                         else path / "__init__.py")
    return files


def flags_declared_by_hand(path: Path) -> set[str]:
    """The flag names `add_argument` is called with as written-out strings in `path` (the
    generator computes its names from the fields)."""
    return {node.args[0].value
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument" and node.args
            and isinstance(node.args[0], ast.Constant)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_declares_a_flag_by_hand(script):
    path = ROOT / "scripts" / f"{script}.py"
    for source in [path, *imported_modules(path)]:
        name = source.relative_to(ROOT).as_posix()
        declared = flags_declared_by_hand(source) - HAND_DECLARED.get(name, set())
        assert not declared, (f"{name} declares {sorted(declared)} by hand: make each a "
                              "field of a config dataclass, added by add_settings")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_none_ends_with_default_none(script):
    parser = script_parser(script)
    assert not [line for line in parser.format_help().splitlines()
                if line.rstrip().endswith("(default: None)")]
    for action in parser._actions:
        assert action.help, f"scripts/{script}.py: {action.option_strings} has no help"


def test_the_config_file_gives_recommends_required_flags_and_exclusive_choice(tmp_path):
    config = tmp_path / "recommend.yaml"
    config.write_text("run: runs/base\noutput: recs.jsonl\nusers: [u1, 2]\n")
    args = parse_args(recommend_parser("t"), ["--config", str(config)])
    assert (args.run, args.output, args.users) == (Path("runs/base"), Path("recs.jsonl"),
                                                   ["u1", "2"])
    # A flag of the exclusive group replaces the file's choice in it.
    args = parse_args(recommend_parser("t"), ["--config", str(config), "--histories", "h.jsonl"])
    assert (args.users, args.histories) == (None, Path("h.jsonl"))


def test_the_config_file_gives_reports_positional_runs(tmp_path):
    config = tmp_path / "report.yaml"
    config.write_text("runs: [runs/a, runs/b]\noutput-dir: reports/x\nmodels: false\n")
    args = parse_args(report_parser("t"), ["--config", str(config)])
    assert (args.runs, args.output_dir, args.models) == (
        [Path("runs/a"), Path("runs/b")], Path("reports/x"), False)
    args = parse_args(report_parser("t"), ["--config", str(config), "runs/c", "--models"])
    assert (args.runs, args.models) == ([Path("runs/c")], True)


def test_a_positional_argument_left_out_everywhere_is_argparses_error(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("dry-run: true\n")
    with pytest.raises(SystemExit):
        parse_args(sweep_parser("t"), ["--config", str(config)])
    assert "the following arguments are required: SWEEP" in capsys.readouterr().err
    config.write_text("sweep: grid.yaml\ndry-run: true\n")
    args = parse_args(sweep_parser("t"), ["--config", str(config)])
    assert (args.sweep, args.dry_run, args.collect_only) == (Path("grid.yaml"), True, False)



def test_the_config_file_gives_the_fine_tuning_and_evaluation_settings(tmp_path):
    """--pretrained and --run are required flags a file may give; the fine-tuning scripts'
    own settings (baseline, matching, strategy, method) are fields like the others."""
    from peftrec.downstream.cli import adapter_config, finetune_parser
    from peftrec.pretraining.cli import evaluate_parser

    config = tmp_path / "finetune.yaml"
    config.write_text("pretrained: runs/base\nzero-shot: true\nmatch_items_by: title,year\n"
                      "freeze-matched-items: true\nfreeze: embeddings\nsource-dataset: ml-1m\n")
    args = parse_args(finetune_parser("t"), ["--config", str(config)])
    assert (args.pretrained, args.zero_shot, args.from_scratch, args.match_items_by,
            args.freeze_matched_items, args.freeze, args.source_dataset) == (
        Path("runs/base"), True, False, ("title", "year"), True, ("embeddings",), "ml-1m")
    # The command line's baseline replaces the file's; a switch's --no- form undoes it.
    args = parse_args(finetune_parser("t"), ["--config", str(config), "--from-scratch",
                                             "--no-freeze-matched-items"])
    assert (args.from_scratch, args.zero_shot, args.freeze_matched_items) == (True, False, False)

    config.write_text("pretrained: runs/base\nmethod: pfeiffer\nreduction-factor: 4\n")
    args = parse_args(finetune_parser("t", ("houlsby", "pfeiffer")), ["--config", str(config)])
    adapter = adapter_config(args)
    assert (type(adapter).__name__, adapter.reduction_factor, adapter.non_linearity) == (
        "PfeifferConfig", 4, "relu")  # unset: pfeiffer's own default, not houlsby's

    config = tmp_path / "evaluate.yaml"
    config.write_text("run: runs/base\noutput: metrics.json\n")
    args = parse_args(evaluate_parser("t"), ["--config", str(config)])
    assert (args.run, args.output, args.dataset) == (Path("runs/base"), Path("metrics.json"),
                                                     None)


def test_a_setting_several_methods_share_is_one_flag_showing_the_first_methods_default():
    from peftrec.downstream.cli import finetune_parser

    parser = finetune_parser("t", ("houlsby", "pfeiffer"))
    actions = [action for action in parser._actions if "--non-linearity" in action.option_strings]
    assert len(actions) == 1 and actions[0].default is None
    assert actions[0].help.endswith("(houlsby default: 'swish')")
