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

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

_prepared = False
_verbose = False


def set_verbosity(verbose: bool) -> None:
    """Show (``verbose``) or hide the frameworks' start-up logs and OpenCV's decoder warnings.

    Hidden by default: TensorFlow's oneDNN and CUDA lines and ``cuInit`` errors on a CPU
    machine say nothing a user can act on. Call before the frameworks load; an explicit
    ``TF_CPP_MIN_LOG_LEVEL`` in the environment is kept unless ``verbose``.
    """
    global _verbose
    _verbose = verbose
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging
    import warnings

    # pydicom warns of values it repairs (a frame count of 0); what it cannot repair, kneepipe reports.
    logging.getLogger("pydicom").setLevel(logging.DEBUG if verbose else logging.ERROR)
    warnings.filterwarnings("default" if verbose else "ignore", category=UserWarning, module=r"pydicom(\.|$)")
    try:
        import cv2

        cv2.utils.logging.setLogLevel(
            cv2.utils.logging.LOG_LEVEL_WARNING if verbose else cv2.utils.logging.LOG_LEVEL_SILENT
        )
    except (ImportError, AttributeError):
        pass


@contextlib.contextmanager
def native_logs_hidden() -> Iterator[None]:
    """Keep what native libraries print on stderr while loading off the terminal (unless verbose).

    TensorFlow's C++ start-up lines ignore ``TF_CPP_MIN_LOG_LEVEL`` (they are printed
    before its logging starts), so the process's stderr is pointed at a scratch file while
    the models load. If loading fails, what was printed is shown after all. kneepipe's own
    warnings (a compiled network passed over and why, a check turned off) are held and
    shown once stderr is back.
    """
    if _verbose:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    held = _HeldWarnings()
    logger = logging.getLogger("kneepipe")
    logger.addHandler(held)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            logger.removeHandler(held)
            if failed:
                capture.seek(0)
                sys.stderr.write(capture.read().decode("utf-8", "replace"))
            for record in held.records:
                sys.stderr.write(f"warning: {record.getMessage()}\n")


class _HeldWarnings(logging.Handler):
    """Keeps the warning records logged while stderr points elsewhere."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def prepare_frameworks() -> None:
    """Import torch and ``torchvision.ops`` ahead of TensorFlow; quiet TensorFlow's logs.

    Safe to call any number of times. Keeps Ultralytics offline and quiet about
    settings it would otherwise try to sync.
    """
    global _prepared
    if _prepared:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if _verbose else "3")
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
