"""kneepipe: Kellgren-Lawrence grading of knee osteoarthritis on plain radiographs.

Stage 1 (:mod:`kneepipe.detect`) finds each knee joint and crops it; stage 2
(:mod:`kneepipe.grade`) grades the crop; :mod:`kneepipe.pipeline` chains them.
Importing this package loads no deep-learning framework.
"""

__version__ = "0.1.0"

KL_GRADES = (0, 1, 2, 3, 4)
