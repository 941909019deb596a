"""kneepipe listen / send: the DICOM node grades each film once, refuses strangers, survives broken senders.

The destination here is a pynetdicom storage SCP run by the test (a real DIMSE peer); the
round trip through a real PACS is in test_pacs_orthanc.py.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import replace

import pytest
import yaml
from pacs_films import write_films
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.config import ConfigError, load_config
from kneepipe.dicom.config import Destination, PacsConfig
from kneepipe.dicom.network import SendError, read_instances, send_instances

SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Receiver:
    """A storage SCP that keeps what it is sent: the PACS the node sends its results to."""

    def __init__(self, keep_pixels: bool = True) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.keep_pixels = keep_pixels  # False: only the identifying UIDs of what arrives are kept
        self.received: list = []
        self._lock = threading.Lock()
        ae = AE(ae_title="RESULTS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        if not self.keep_pixels:
            kept = Dataset()
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
                setattr(kept, keyword, dataset.get(keyword))
            dataset = kept
        with self._lock:
            self.received.append(dataset)
        return 0x0000

    def of_class(self, sop_class: str) -> list:
        with self._lock:
            return [ds for ds in self.received if ds.SOPClassUID == sop_class]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture(scope="module")
def configs():
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.config import PipelineConfig

    pipeline_cfg = load_config(PipelineConfig, overrides={"save_crops": False, "thumbnail_size": 0})
    return pipeline_cfg, load_config(DetectConfig), load_config(GradeConfig)


@pytest.fixture(scope="module")
def models(configs):
    from kneepipe.pipeline.run import load_models

    return load_models(configs[1], configs[2])


@pytest.fixture(scope="module")
def films(tmp_path_factory, radiographs_dir):
    folder = tmp_path_factory.mktemp("films")
    write_films(folder, radiographs_dir)
    return folder


@pytest.fixture
def receiver():
    peer = Receiver()
    yield peer
    peer.stop()


def make_node(tmp_path, configs, models, receiver, **keys):
    from kneepipe.dicom.node import DicomNode

    pacs = load_config(
        PacsConfig,
        overrides={
            "port": free_port(),
            "allowed_callers": ["MODALITY"],
            "destination": f"RESULTS@127.0.0.1:{receiver.port}",
            "data": str(tmp_path / "node"),
            "batch_wait_s": 0.3,
            "retry_wait_s": 0.2,
            **keys,
        },
    )
    node = DicomNode(pacs, *configs, detector=models[0], grader=models[1])
    node.start()
    return node


def said(result) -> str:
    """A command's output with the console's line wrapping undone."""
    return " ".join(result.output.split())


def push(node, paths, calling_ae="MODALITY"):
    send_instances(read_instances(paths), Destination("KNEEPIPE", "127.0.0.1", node.port), calling_ae, timeout_s=20)


def test_the_node_config_checks_its_keys():
    with pytest.raises(ConfigError, match="destination"):
        load_config(PacsConfig, overrides={"destination": "ORTHANC@127.0.0.1"})
    with pytest.raises(ConfigError, match="allowed_callers"):
        load_config(PacsConfig, overrides={"allowed_callers": ["A" * 17]})
    with pytest.raises(ConfigError, match="ae_title"):
        load_config(PacsConfig, overrides={"ae_title": "WITH\\BACKSLASH"})
    assert Destination.parse("PACS@10.0.0.1:104") == Destination("PACS", "10.0.0.1", 104)


def test_listen_refuses_to_start_without_allowed_callers():
    result = CliRunner().invoke(app, ["listen"])
    assert result.exit_code == 2 and "allowed_callers is empty" in said(result)


def test_send_names_a_bad_file_and_an_absent_peer(tmp_path):
    notes = tmp_path / "notes.dcm"
    notes.write_text("not DICOM")
    result = CliRunner().invoke(app, ["send", str(notes), "--to", "PACS@127.0.0.1:1"])
    assert result.exit_code == 1 and "notes.dcm: cannot be sent" in said(result)
    result = CliRunner().invoke(app, ["send", str(notes), "--to", "PACS@127.0.0.1"])
    assert result.exit_code == 2 and "AE@host:port" in said(result)


@pytest.mark.slow
def test_each_film_is_graded_once_even_after_a_restart(tmp_path, configs, models, films, receiver, caplog):
    caplog.set_level("INFO", logger="kneepipe.node")
    node = make_node(tmp_path, configs, models, receiver)
    try:
        push(node, sorted(films.glob("*.dcm")))
        assert node.wait_idle(timeout_s=120)
        push(node, [films / "single_m2.dcm"])  # the PACS sends a film again: acknowledged, not graded again
        assert node.wait_idle(timeout_s=30)
    finally:
        node.stop()
    assert len(receiver.of_class(SR_CLASS)) == 2 and len(receiver.of_class(SC_CLASS)) == 2
    assert node.final_counts == {"sent": 2, "not_graded": 1}
    sources = {ds.StudyInstanceUID: ds for ds in read_instances(sorted(films.glob("*.dcm")))}
    for result in receiver.received:
        assert result.StudyInstanceUID in sources and sources[result.StudyInstanceUID].ViewPosition == "AP"
    assert "received before (sent), not graded again" in caplog.text
    assert "not graded (lateral_view" in caplog.text
    assert "Testpatient" not in caplog.text  # instances are named by UID, never by patient
    assert not list((tmp_path / "node/incoming").iterdir())  # films are not kept once their results are sent
    saved = yaml.safe_load((tmp_path / "node/args.yaml").read_text())  # the node's resolved config, beside its data
    assert saved["allowed_callers"] == ["MODALITY"] and "conf" in saved["detect"]

    restarted = make_node(tmp_path, configs, models, receiver)
    try:
        push(restarted, sorted(films.glob("*.dcm")))
        assert restarted.wait_idle(timeout_s=30)
    finally:
        restarted.stop()
    assert len(receiver.received) == 4
    assert restarted.final_counts == {"sent": 2, "not_graded": 1}


@pytest.mark.slow
def test_a_film_received_before_a_stop_is_graded_at_the_next_start(tmp_path, configs, models, films, receiver):
    node = make_node(tmp_path, configs, models, receiver, batch_wait_s=60.0)
    try:
        push(node, [films / "bilateral_m1.dcm"])
    finally:
        started = time.monotonic()
        node.stop()  # the film waits for its batch: not graded yet
    assert time.monotonic() - started < 5
    assert node.final_counts == {"received": 1} and receiver.received == []

    restarted = make_node(tmp_path, configs, models, receiver)
    try:
        assert restarted.wait_idle(timeout_s=120)
    finally:
        restarted.stop()
    assert restarted.final_counts == {"sent": 1}
    assert {ds.SOPClassUID for ds in receiver.received} == {SR_CLASS, SC_CLASS}


@pytest.mark.slow
def test_results_not_delivered_are_sent_at_the_next_start(tmp_path, configs, models, films, receiver):
    node = make_node(tmp_path, configs, models, receiver, send_retries=1)
    receiver.stop()  # the destination is down
    try:
        push(node, [films / "single_m2.dcm"])
        assert node.wait_idle(timeout_s=120)
    finally:
        node.stop()
    assert node.final_counts == {"send_failed": 1}

    back = Receiver()
    try:
        restarted = make_node(tmp_path, configs, models, back)
        try:
            assert restarted.wait_idle(timeout_s=60)
        finally:
            restarted.stop()
        assert restarted.final_counts == {"sent": 1} and len(back.received) == 2
    finally:
        back.stop()


def test_a_caller_not_configured_is_refused(tmp_path, configs, receiver, films, caplog):
    caplog.set_level("WARNING", logger="kneepipe.node")
    node = make_node(tmp_path, configs, (None, None), receiver)
    try:
        with pytest.raises(SendError, match="rejected the association"):
            push(node, [films / "single_m2.dcm"], calling_ae="STRANGER")
    finally:
        node.stop()
    assert node.final_counts == {}
    assert "refused an association from STRANGER" in caplog.text


def test_a_sender_that_disconnects_mid_transfer_leaves_nothing(tmp_path, configs, receiver, films):
    """A film cut off mid-transfer is not entered; the node takes the next sender's films as before."""
    from pynetdicom import AE

    node = make_node(tmp_path, configs, (None, None), receiver, batch_wait_s=60.0)
    try:
        film = read_instances([films / "single_m2.dcm"])[0]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(film.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="KNEEPIPE")
        assert assoc.is_established
        # A P-DATA-TF PDU that announces a megabyte and brings a hundred bytes, then the connection drops.
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBI", 0x04, 0, 1_000_000) + b"\x00" * 100)
        raw.shutdown(socket.SHUT_RDWR)
        raw.close()
        assoc.abort()
        time.sleep(0.5)
        push(node, [films / "bilateral_m1.dcm"])  # the node still takes films
        deadline = time.monotonic() + 10
        while node.journal.counts() != {"received": 1} and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        node.stop()
    assert node.final_counts == {"received": 1}
    assert [path.name for path in (tmp_path / "node/incoming").iterdir()] == [
        f"{read_instances([films / 'bilateral_m1.dcm'])[0].SOPInstanceUID}.dcm"
    ]


def test_send_delivers_files_by_c_store(tmp_path, films, receiver):
    result = CliRunner().invoke(
        app, ["send", str(films / "single_m2.dcm"), "--to", f"RESULTS@127.0.0.1:{receiver.port}"]
    )
    assert result.exit_code == 0, result.output
    assert "sent 1 instance(s)" in said(result) and len(receiver.received) == 1
    assert replace(Destination.parse(f"RESULTS@127.0.0.1:{receiver.port}")).port == receiver.port
