"""The round trip through a real PACS: Orthanc forwards films to kneepipe listen and gets SR and overlay back.

Films are written by the test from the shared real radiographs (MONOCHROME1 and MONOCHROME2,
bilateral and single-knee, and a lateral with its ViewPosition), uploaded to Orthanc, and
forwarded by Orthanc to the node (C-STORE). The node sends each gradable film's SR and
Secondary Capture back to Orthanc, by C-STORE in one test and by STOW-RS in the other; the
test then queries Orthanc.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from orthanc_server import Orthanc, free_port, orthanc_missing
from pacs_films import FILMS, PATIENT_NAME, write_films
from test_dicom_export import dciodvfy_errors
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.config import load_config
from kneepipe.dicom.config import PacsConfig
from kneepipe.dicom.read import read_report

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "-")]


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, node_port):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), {"kneepipe": ("KNEEPIPE", "127.0.0.1", node_port)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def models():
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.pipeline.run import load_models

    configs = (
        load_config(PipelineConfig, overrides={"save_crops": False, "thumbnail_size": 0}),
        load_config(DetectConfig),
        load_config(GradeConfig),
    )
    return configs, load_models(configs[1], configs[2])


def start_node(tmp_path, models, port: int, destination: str, callers=("ORTHANC",)):
    from kneepipe.dicom.node import DicomNode

    configs, (detector, grader) = models
    pacs = load_config(
        PacsConfig,
        overrides={
            "port": port,
            "allowed_callers": list(callers),
            "destination": destination,
            "data": str(tmp_path / "node"),
            "batch_wait_s": 1.0,
        },
    )
    node = DicomNode(pacs, *configs, detector=detector, grader=grader)
    node.start()
    return node


def node_results(tmp_path) -> dict[str, list[dict[str, str]]]:
    """The node's results.csv rows of graded knees, by SOP Instance UID."""
    rows: dict[str, list[dict[str, str]]] = {}
    for table in (tmp_path / "node/runs").glob("*/results.csv"):
        with open(table, newline="") as handle:
            for row in csv.DictReader(handle):
                if row["status"] == "ok":
                    rows.setdefault(row["image"].removesuffix(".dcm"), []).append(row)
    return rows


def check_results_in_study(orthanc, tmp_path, source, expected_rows, kind):
    """The film's study in Orthanc holds one SR and one SC (new series each) with the node's grades."""
    series = orthanc.study_series(source.StudyInstanceUID)
    modalities = sorted(item["MainDicomTags"]["Modality"] for item in series)
    if kind != "graded":
        assert modalities == ["DX"], f"{kind} film got results: {modalities}"
        return
    assert modalities == ["DX", "OT", "SR"]
    assert len(expected_rows) >= 1
    for item in series:
        assert len(item["Instances"]) == 1
        if item["MainDicomTags"]["Modality"] == "DX":
            continue
        assert item["MainDicomTags"]["SeriesInstanceUID"] != source.SeriesInstanceUID
        path = tmp_path / f"{item['Instances'][0]}.dcm"
        path.write_bytes(orthanc.instance_file(item["Instances"][0]))
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(path) == [], path.name
        if item["MainDicomTags"]["Modality"] == "SR":
            knees = sorted(read_report(path), key=lambda knee: knee["side"])
            rows = sorted(expected_rows, key=lambda row: row["side"])
            assert [(k["side"], k["kl_grade"]) for k in knees] == [(r["side"], int(r["kl_grade"])) for r in rows]
            for knee, row in zip(knees, rows, strict=True):
                assert knee["probabilities"] == pytest.approx([float(row[f"p{g}"]) for g in range(5)], abs=1e-4)
                assert knee["source_sop_instance_uid"] == source.SOPInstanceUID


def listen(tmp_path, port: int, destination: str) -> subprocess.Popen:
    """``kneepipe listen --config pacs.yaml`` in its own process, once it says it is listening."""
    config = tmp_path / "pacs.yaml"
    config.write_text(
        f"ae_title: KNEEPIPE\nhost: 127.0.0.1\nport: {port}\nallowed_callers: [ORTHANC]\n"
        f"destination: {destination}\ndata: {tmp_path / 'node'}\nbatch_wait_s: 1.0\n"
    )
    log = open(tmp_path / "listen.log", "w")  # noqa: SIM115 (the process writes it; closed with the test's folder)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "kneepipe"), "listen", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if "listening on" in (tmp_path / "listen.log").read_text():
            return process
        time.sleep(0.2)
    raise AssertionError(f"kneepipe listen did not start: {(tmp_path / 'listen.log').read_text()[-3000:]}")


def wait_for_results(orthanc, sources, timeout_s: float = 180) -> None:
    """Until Orthanc holds an SR for every gradable film (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    graded = [source for name, source in sources.items() if FILMS[name][3] == "graded"]
    while time.monotonic() < deadline:
        modalities = [
            {item["MainDicomTags"]["Modality"] for item in orthanc.study_series(source.StudyInstanceUID)}
            for source in graded
        ]
        if all({"SR", "OT"} <= found for found in modalities):
            return
        time.sleep(0.5)


def test_orthanc_forwards_films_and_gets_sr_and_overlay_back(tmp_path, radiographs_dir, orthanc, node_port):
    sources = write_films(tmp_path / "films", radiographs_dir)
    process = listen(tmp_path, node_port, f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}")
    try:
        ids = [orthanc.upload(tmp_path / "films" / f"{name}.dcm") for name in sources]
        orthanc.store_to("kneepipe", ids)
        wait_for_results(orthanc, sources)
        time.sleep(1.0)  # the lateral's refusal is journaled in the same batch
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        log = (tmp_path / "listen.log").read_text()
    assert process.returncode == 0, log
    assert "instances in the journal: 1 not_graded, 2 sent" in log, log
    assert PATIENT_NAME.split("^")[0] not in log
    rows = node_results(tmp_path)
    for name, source in sources.items():
        check_results_in_study(orthanc, tmp_path, source, rows.get(source.SOPInstanceUID, []), FILMS[name][3])
        assert source.SOPInstanceUID in log  # every instance is named in the log


def test_results_reach_orthanc_by_stow_rs(tmp_path, radiographs_dir, orthanc, models):
    sources = write_films(tmp_path / "films", radiographs_dir, names=("single_m2",))
    node = start_node(tmp_path, models, free_port(), f"{orthanc.url}/dicom-web", callers=("MODALITY",))
    try:
        sent = CliRunner().invoke(
            app, ["send", str(tmp_path / "films"), "--to", f"KNEEPIPE@127.0.0.1:{node.port}", "--ae", "MODALITY"]
        )
        assert sent.exit_code == 0, sent.output
        assert node.wait_idle(timeout_s=120)
    finally:
        node.stop()
    assert node.final_counts == {"sent": 1}
    source = sources["single_m2"]
    orthanc.upload(tmp_path / "films/single_m2.dcm")  # the film itself, as the PACS holds it
    check_results_in_study(orthanc, tmp_path, source, node_results(tmp_path)[source.SOPInstanceUID], "graded")
