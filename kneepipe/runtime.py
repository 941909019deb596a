"""Loading the deep-learning frameworks in one safe order.

The detector runs on torch (Ultralytics) and the grader on Keras (TensorFlow by
default). With TensorFlow imported first, the first YOLO prediction imports
``torchvision.ops``, which loads triton's native library and crashes the process
(exit 139). Importing torch and ``torchvision.ops`` before TensorFlow avoids it, so
every kneepipe code path that needs either framework calls
:func:`prepare_frameworks` first; the order then never depends on which stage a
caller happens to load first.
"""

from __future__ import annotations

import os
import sys

_prepared = False


def prepare_frameworks() -> None:
    """Import torch and ``torchvision.ops`` ahead of TensorFlow; quiet TensorFlow's logs.

    Safe to call any number of times. Keeps Ultralytics offline and quiet about
    settings it would otherwise try to sync.
    """
    global _prepared
    if _prepared:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("YOLO_OFFLINE", "True")
    if "tensorflow" in sys.modules and "torchvision.ops" not in sys.modules:
        import warnings

        warnings.warn(
            "TensorFlow was imported before torchvision.ops; running the detector in this "
            "process may crash. Import kneepipe's stages before TensorFlow.",
            RuntimeWarning,
            stacklevel=2,
        )
    try:
        import torch  # noqa: F401
        import torchvision.ops  # noqa: F401
    except ImportError:  # a grader-only install on another Keras backend
        pass
    _prepared = True


def import_keras():
    """Return the ``keras`` module, loaded after :func:`prepare_frameworks`."""
    prepare_frameworks()
    import keras

    return keras
