"""Report on run folders: one self-contained HTML file plus its figures as PNGs.

    python scripts/report.py runs/ml1m-text runs/ml-100k-houlsby --output-dir reports/transfer
    python scripts/report.py runs/bench-transfer-ml100k --output-dir reports/sweep \\
        --color-field genre [--no-models]

A RUN_OR_SWEEP is a run folder (config.json + metrics.json) or a folder with run folders
below it. The report: the results table; training curves (every logged loss, validation
NDCG@10); parameters (trainable, total, embedding and non-embedding) and test NDCG@10
against trainable parameters for fine-tuning runs; a 2-D map (PCA, and t-SNE with
scikit-learn) of each run's item vectors coloured by an item field; the statistics of a
collapsed embedding space (effective rank, mean pairwise cosine, norm spread).
Needs matplotlib: pip install 'peftrec[report]'.
"""

from peftrec.downstream.report import report_parser, write_report
from peftrec.pretraining.cli import parse_args, run_main


def main(argv=None):
    return write_report(parse_args(report_parser(__doc__), argv))


if __name__ == "__main__":
    run_main(main)
