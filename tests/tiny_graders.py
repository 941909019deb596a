"""A tiny grader file written by the same code as the shipped one, shared by several test modules."""

from pathlib import Path

from kneepipe.grade.model import Preprocessing, build_grader, save_grader
from kneepipe.runtime import import_keras

TINY = {"width": 0.0625, "middle_blocks": 1}


def save_tiny_grader(path: Path, decision: str = "argmax") -> Path:
    """A randomly initialised grader file: the shipped file's format at 1/500 of its size.

    Seeded, so its weights (and whether a Grad-CAM map is blank) do not hang on which tests ran first.
    """
    import_keras().utils.set_random_seed(0)
    model = build_grader("softmax", architecture_args=TINY)
    record = Preprocessing(input_size=96, head="softmax", architecture_args=TINY, decision=decision)
    return save_grader(model, record, path)
