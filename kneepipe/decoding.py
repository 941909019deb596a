"""Radiographs decoded ahead of the models, in threads, with a bounded number held in memory.

Decoding (PNG/JPEG inflate, DICOM windowing) runs in OpenCV and NumPy, which release
the GIL, so a decode thread overlaps with detection and grading on another core. The
queue between them holds at most ``prefetch`` radiographs: memory stays flat however
many files a batch has.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kneepipe.imaging import MAX_PIXELS, ImageReadError, Radiograph, read_radiograph

_DONE = object()


def read_or_reason(path: Path, max_side: int, max_pixels: int = MAX_PIXELS) -> Radiograph | ImageReadError:
    """Read one radiograph; a file that cannot be read becomes its :class:`ImageReadError`.

    :func:`read_radiograph` already turns any decoder failure into an ``ImageReadError``;
    this is the last guard, so one file never stops a batch.
    """
    try:
        return read_radiograph(path, max_side=max_side, max_pixels=max_pixels)
    except ImageReadError as err:
        return err
    except MemoryError:
        return ImageReadError(path, "not enough memory to decode this image")
    except Exception as err:  # a decoder failing on a damaged file: that file's problem only
        return ImageReadError(path, f"cannot decode ({type(err).__name__}: {err})")


def _read_and_prepare(path: Path, max_side: int, prepare, max_pixels: int) -> tuple[Radiograph | ImageReadError, Any]:
    item = read_or_reason(path, max_side, max_pixels)
    if prepare is None or isinstance(item, ImageReadError):
        return item, None
    try:
        return item, prepare(item)
    except Exception:  # an optional extra: the radiograph is still processed without it
        return item, None


def decoded_radiographs(
    paths: Sequence[Path],
    max_side: int,
    prefetch: int = 32,
    workers: int = 1,
    prepare: Callable[[Radiograph], Any] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Generator[tuple[Path, Radiograph | ImageReadError, Any], None, None]:
    """Yield ``(path, radiograph or read error, prepared)`` in input order, decoding ahead in threads.

    Args:
        paths: the files, in the order results should come.
        max_side: radiographs with a longer side are shrunk on reading.
        prefetch: most decoded radiographs waiting to be consumed.
        workers: decoding threads.
        prepare: optional work on each decoded radiograph done in the decoding thread
            too (e.g. a thumbnail), so it overlaps with the models; its result comes
            third (None for files that could not be read).
        max_pixels: the pixel budget: larger images are refused from their header.

    >>> for path, radiograph, _ in decoded_radiographs(paths, max_side=4096):  # doctest: +SKIP
    ...     print(path, getattr(radiograph, "pixels", radiograph).shape)
    """
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    failure: list[BaseException] = []

    def put(item) -> None:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="kneepipe-decode") as pool:
                in_flight: deque = deque()
                for path in paths:
                    if stop.is_set():
                        break
                    in_flight.append((path, pool.submit(_read_and_prepare, path, max_side, prepare, max_pixels)))
                    while len(in_flight) >= workers and not stop.is_set():
                        done_path, future = in_flight.popleft()
                        put((done_path, *future.result()))
                while in_flight and not stop.is_set():
                    done_path, future = in_flight.popleft()
                    put((done_path, *future.result()))
                for _, future in in_flight:
                    future.cancel()
        except BaseException as err:  # surfaced in the consumer, never swallowed
            failure.append(err)
        finally:
            put(_DONE)

    producer = threading.Thread(target=produce, name="kneepipe-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        producer.join(timeout=30)
