"""Recipe tuning on val with Optuna (``vpeft tune``): TPE sampling, pruning, resumable studies.

See :mod:`vpeft.tune.study` for the protocol and :mod:`vpeft.tune.space` for the search-space syntax.
"""

from __future__ import annotations

from .space import Param, SearchSpace, parse_space
from .study import PRUNERS, TuneConfig, run_tune

__all__ = ["Param", "SearchSpace", "parse_space", "TuneConfig", "run_tune", "PRUNERS"]
