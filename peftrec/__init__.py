"""peftrec: parameter-efficient transfer learning for sequential recommendation.

An installed copy holds its subpackages (`peftrec.adapters`, `peftrec.pretraining`, ...) in
this folder. In a source checkout they are the repository's top-level folders, which
pyproject.toml maps into this namespace; the lines below make a checkout that is only on
PYTHONPATH (a benchmark's clean worktree, the GPU machine's copy) import the same way.
"""

from pathlib import Path

_checkout = Path(__file__).resolve().parents[1]
if (_checkout / "pyproject.toml").is_file() and (_checkout / "pretraining").is_dir():
    __path__.append(str(_checkout))
