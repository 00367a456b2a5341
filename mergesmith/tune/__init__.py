"""Search merge coefficients against the evaluation.

A tune config is a merge config in which some parameter values are search ranges::

    weight: {search: [0.1, 1.5]}            # a float in [0.1, 1.5]
    density: {search: [0.01, 1.0], log: true}
    weight: [{search: [0, 1]}, {search: [0, 1]}]   # a searchable gradient

Each trial substitutes values, merges in memory from parent tensors read once, loads the result
into a model held in memory and scores it on the tasks; nothing is written per trial. Trials are
proposed by an Optuna sampler (TPE, CMA-ES, or a grid) and recorded in an SQLite study, so a
study that is stopped resumes where it was. Trials run in this process, in ``workers`` local
processes, or on Ray actors; each worker holds the parents once. The best config is written as
YAML, merged to disk and evaluated against its parents (the merge report), and the search is
plotted.

The objective is the weighted mean normalized accuracy (accuracy over the best parent's on the
task) minus ``penalty`` times the total accuracy lost below the base model on any task.
"""

from __future__ import annotations

from mergesmith.tune.executors import Executor as Executor
from mergesmith.tune.executors import RunnerArgs as RunnerArgs
from mergesmith.tune.objective import Objective
from mergesmith.tune.objective import optimistic as optimistic
from mergesmith.tune.runner import KEEP_UNKNOWN as KEEP_UNKNOWN
from mergesmith.tune.runner import TrialRunner
from mergesmith.tune.runner import TrialScores as TrialScores
from mergesmith.tune.space import MAX_GRID as MAX_GRID
from mergesmith.tune.space import SAMPLERS as SAMPLERS
from mergesmith.tune.space import Dimension, search_space, substitute
from mergesmith.tune.space import check_options as check_options
from mergesmith.tune.space import midpoint as midpoint
from mergesmith.tune.study import EXECUTORS as EXECUTORS
from mergesmith.tune.study import TuneResult, tune

_RunnerArgs = RunnerArgs

__all__ = ["Dimension", "Objective", "TrialRunner", "TuneResult", "search_space", "substitute", "tune"]
