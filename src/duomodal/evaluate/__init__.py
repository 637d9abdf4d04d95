"""The metrics and the evaluation report (`duomodal eval`).

``metrics`` holds the pure metric functions, ``report`` the document model and the figures,
``run`` the evaluation of trained models on a dataset (VAE, CLIP, curves, the report), ``samples``
its DALL-E part, ``shape`` the two shape judges (an independent CLIP; ink-mask templates).
"""

from duomodal.evaluate.run import EvalError, EvalOptions, EvalResult, headline, run_evaluation

__all__ = ["EvalError", "EvalOptions", "EvalResult", "headline", "run_evaluation"]
