"""The metrics and the evaluation report (`duomodal eval`).

``metrics`` holds the pure metric functions, ``report`` the document model and the figures,
``context`` the options and what every part of one evaluation shares, ``run`` the evaluation of
trained models on a dataset (VAE, CLIP, curves, the report), ``samples`` its DALL-E part, ``shape``
the two shape judges (an independent CLIP; ink-mask templates).
"""

from duomodal.evaluate.context import EvalError, EvalOptions, EvalResult
from duomodal.evaluate.run import headline, run_evaluation

__all__ = ["EvalError", "EvalOptions", "EvalResult", "headline", "run_evaluation"]
