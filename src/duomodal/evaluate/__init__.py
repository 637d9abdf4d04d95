"""The metrics and the evaluation report (`duomodal eval`).

``metrics`` holds the pure metric functions, ``report`` the document model and the figures,
``run`` and ``samples`` the evaluation of trained models on a dataset.
"""

from duomodal.evaluate.run import EvalError, EvalOptions, EvalResult, run_evaluation

__all__ = ["EvalError", "EvalOptions", "EvalResult", "run_evaluation"]
