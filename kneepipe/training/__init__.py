"""Training: the detector's composites and trainer, the grader's recipe and its two trainers, calibration.

Nothing on the inference path (``kneepipe detect``, ``grade``, ``run``, ``audit``) imports
this package. Its training-only dependencies come with the ``[train]`` extra
(``pip install "kneepipe[train]"``).
"""
