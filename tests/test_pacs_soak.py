"""Soak test of kneepipe listen on loopback: 200 films pushed by 4 concurrent senders.

Nothing may be lost or duplicated, memory must stay flat, and the throughput is printed
(run with ``-s`` to see it). Bounded in count and time: it stops by itself.

    .venv/bin/python -m pytest -q -s tests/test_pacs_soak.py
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import pytest
from pacs_films import knee_film
from test_dicom_node import SC_CLASS, SR_CLASS, Receiver, configs, free_port, models  # noqa: F401 (fixtures)

from kneepipe.config import load_config
from kneepipe.dicom.config import Destination, PacsConfig
from kneepipe.dicom.network import send_instances

FILMS, SENDERS = 200, 4
TIME_LIMIT_S = 300


def rss_mb() -> float:
    """The process's resident memory now, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
def test_200_films_from_4_senders_are_each_graded_once(tmp_path, radiographs_dir, configs, models):  # noqa: F811
    from kneepipe.dicom.node import DicomNode

    films = [
        knee_film(radiographs_dir / "bilateral_0.png", "MONOCHROME2", "AP", patient_id=f"SOAK{number:04d}")
        for number in range(FILMS)
    ]
    receiver = Receiver(keep_pixels=False)
    pacs = load_config(
        PacsConfig,
        overrides={
            "port": free_port(),
            "allowed_callers": [f"SENDER{n}" for n in range(SENDERS)],
            "destination": f"RESULTS@127.0.0.1:{receiver.port}",
            "data": str(tmp_path / "node"),
            "batch_wait_s": 0.5,
        },
    )
    node = DicomNode(pacs, *configs, detector=models[0], grader=models[1])
    node.start()
    memory: list[float] = []
    errors: list[str] = []

    def sender(number: int) -> None:
        mine = films[number::SENDERS]
        try:
            for start in range(0, len(mine), 10):  # an association per 10 films, as a modality sends a study
                target = Destination("KNEEPIPE", "127.0.0.1", node.port)
                send_instances(mine[start : start + 10], target, f"SENDER{number}", timeout_s=60)
        except Exception as err:
            errors.append(f"sender {number}: {err}")

    try:
        started = time.monotonic()
        threads = [threading.Thread(target=sender, args=(n,)) for n in range(SENDERS)]
        for thread in threads:
            thread.start()
        deadline = started + TIME_LIMIT_S
        while any(thread.is_alive() for thread in threads) or not node.wait_idle(timeout_s=2.0, settle_s=0.5):
            memory.append((node.journal.counts().get("sent", 0), rss_mb()))
            assert time.monotonic() < deadline, f"not finished in {TIME_LIMIT_S} s: {node.journal.counts()}"
        received_s = time.monotonic() - started
        memory.append((FILMS, rss_mb()))
    finally:
        node.stop()
        receiver.stop()
    assert errors == []
    assert node.final_counts == {"sent": FILMS}
    results = receiver.received
    assert len(results) == 2 * FILMS and len({ds.SOPInstanceUID for ds in results}) == 2 * FILMS
    assert sorted(ds.StudyInstanceUID for ds in receiver.of_class(SR_CLASS)) == sorted(
        ds.StudyInstanceUID for ds in films
    )
    assert len(receiver.of_class(SC_CLASS)) == FILMS
    # Memory at a quarter, half and all of the films answered: a leak grows with the count, a warm-up does not.
    at = {share: next(mb for done, mb in memory if done >= share * FILMS) for share in (0.25, 0.5, 1.0)}
    print(
        f"\nsoak: {FILMS} films from {SENDERS} senders graded and answered in {received_s:.1f} s "
        f"({FILMS / received_s:.2f} films/s); resident memory {at[0.25]:.0f} MB at a quarter, "
        f"{at[0.5]:.0f} MB at half, {at[1.0]:.0f} MB at the end (peak {max(mb for _, mb in memory):.0f} MB)"
    )
    assert at[1.0] - at[0.5] < 150, f"memory grew by {at[1.0] - at[0.5]:.0f} MB over the second half"
