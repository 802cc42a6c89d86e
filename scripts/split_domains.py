"""Split one dataset into two item-disjoint domains (source and target dataset folders).

    python scripts/split_domains.py --dataset ml-1m --field release_year --source-range ,1990 \\
        --source-output data/ml-1m-old --target-output data/ml-1m-new
    python scripts/split_domains.py --dataset data/mydata --field genre \\
        --source-values Comedy,Drama --source-output data/comedy --target-output data/other

Every item goes to exactly one domain: to the source when its --field value matches the
rule, otherwise to the target. --source-values: the value, or for a multi-valued field
(values separated by spaces, '|' or ',', e.g. ML-1M's genre "Comedy Romance") its FIRST
value, is one of the listed values. --source-range LO,HI: LO <= value < HI, either bound
may be empty (',1990' means < 1990, '1990,' means >= 1990); every value must be numeric.
A user may be in both domains; each domain keeps its own interactions (same order and
timestamps), re-indexes its items from 1, and drops users left with fewer than 3
interactions (no k-core is re-run). The built-in pair ml-1m-old / ml-1m-new is this split
of ml-1m by --source-range ,1990 and works as --dataset in every script.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from peftrec.dataset_tools import SplitRule, describe_split, split_domains
from peftrec.dataset_tools.domains import RULE_SETTINGS, SplitSettings
from peftrec.pretraining.cli import RunSettings, add_settings, cli_parser, parse_args, run_main


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_parser(__doc__)
    add_settings(parser, SplitSettings, exclude=RULE_SETTINGS)
    add_settings(parser.add_mutually_exclusive_group(required=True), SplitSettings,
                 RULE_SETTINGS)
    add_settings(parser, RunSettings, ("cache_dir",))
    return parse_args(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_arguments(argv)
    rule = (SplitRule.values(args.field, args.source_values.split(","))
            if args.source_values is not None
            else SplitRule.parse_range(args.field, args.source_range))
    folders = split_domains(args.dataset, args.source_output, args.target_output, rule,
                            source_name=args.source_name, target_name=args.target_name,
                            cache_dir=args.cache_dir)
    print(describe_split(*folders))


if __name__ == "__main__":
    run_main(main, main_process_only=True)
