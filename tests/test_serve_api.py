"""``kneepipe serve``'s HTTP API without the models: token, host check, size limits, names, content checks.

The worker is built but not started (or started with a recording process), so these tests
need no framework; the browser tests in ``test_serve_browser.py`` run the real models.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_files import make_dicom, save_dicom
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from kneepipe.cli import app as cli_app
from kneepipe.cli_common import EXIT_CONFIG
from kneepipe.config import ConfigError, load_config
from kneepipe.serve.app import create_app, is_loopback
from kneepipe.serve.config import ServeConfig
from kneepipe.serve.server import TokenRequiredError, build_server
from kneepipe.serve.store import RunStore, safe_name
from kneepipe.serve.worker import Worker

LOCAL = "http://127.0.0.1"


def _config(tmp_path: Path, **changes) -> ServeConfig:
    return load_config(ServeConfig, overrides={"data": str(tmp_path / "data"), **changes})


def _client(tmp_path: Path, token: str | None = None, base_url: str = LOCAL, **changes) -> TestClient:
    config = _config(tmp_path, **changes)
    store = RunStore(config.data)
    worker = Worker(store, process=lambda worker, run_id: None, load=None)  # not started: runs stay queued
    return TestClient(create_app(config, store, worker, token), base_url=base_url)


@pytest.fixture(scope="module")
def film(radiographs_dir) -> bytes:
    """A real radiograph (571x456 PNG)."""
    return (radiographs_dir / "bilateral_0.png").read_bytes()


def test_serve_config_checks_its_keys(tmp_path):
    config = load_config(ServeConfig)
    assert config.host == "127.0.0.1" and config.port == 8000 and config.max_file_mb > 0
    with pytest.raises(ConfigError, match="did you mean 'max_file_mb'"):
        load_config(ServeConfig, overrides={"max_file_md": 3})
    with pytest.raises(ConfigError, match="max_file_mb: 50.0 is larger than max_upload_mb"):
        load_config(ServeConfig, overrides={"max_file_mb": 50, "max_upload_mb": 10})
    with pytest.raises(ConfigError, match="port"):
        load_config(ServeConfig, overrides={"port": 70000})


def test_safe_names_never_leave_the_folder():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("..\\..\\windows\\knee.png") == "knee.png"
    assert safe_name("/abs/path/film.dcm") == "film.dcm"
    assert safe_name("..") == "upload" and safe_name("") == "upload" and safe_name("/") == "upload"
    assert safe_name(".hidden.png") == "hidden.png"  # a leading dot would hide it from the pipeline
    assert safe_name("a\x00b\nc.png") == "abc.png"
    assert safe_name("knee;rm -rf $HOME.png") == "knee_rm -rf _HOME.png"
    long = safe_name("x" * 400 + ".jpeg")
    assert len(long) <= 120 and long.endswith(".jpeg")


def test_uploads_are_checked_by_content_and_stored_under_safe_names(tmp_path, film):
    client = _client(tmp_path)
    pixels = cv2.imdecode(np.frombuffer(film, np.uint8), cv2.IMREAD_GRAYSCALE)
    (tmp_path / "source").mkdir()
    dicom = save_dicom(make_dicom(pixels, "MONOCHROME2", 8), tmp_path / "source" / "IM0001").read_bytes()
    files = [
        ("files", ("../../escape.png", film, "image/png")),
        ("files", ("..\\..\\windows.png", film, "image/png")),
        ("files", ("film-named.txt", film, "text/plain")),  # a PNG whatever its name says
        ("files", ("IM0001", dicom, "application/octet-stream")),  # a DICOM without a suffix
        ("files", ("scan.dcm", b"name,grade\nknee,2\n", "application/dicom")),  # text named as a DICOM
        ("files", ("picture.png", b"GIF89a" + bytes(200), "image/png")),
        ("files", ("empty.png", b"", "image/png")),
    ]
    response = client.post("/api/runs", files=files)
    assert response.status_code == 202, response.text
    run = response.json()
    assert [f["name"] for f in run["files"]] == ["escape.png", "windows.png", "film-named.txt", "IM0001"]
    assert [f["original"] for f in run["files"]][:2] == ["../../escape.png", "..\\..\\windows.png"]
    reasons = {r["original"]: r["reason"] for r in run["refused"]}
    assert "not an image" in reasons["scan.dcm"] and "whatever its name says" in reasons["scan.dcm"]
    assert "a GIF image, not a radiograph format" in reasons["picture.png"]
    assert reasons["empty.png"] == "empty file"
    assert run["status"] == "queued" and [f["status"] for f in run["films"]] == ["queued"] * 4
    # Everything written lies under the data folder's run, and the uploads under inputs/.
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and "source" not in p.parts)
    inputs = tmp_path / "data" / "runs" / run["id"] / "inputs"
    assert sorted(p.name for p in inputs.iterdir()) == ["IM0001", "escape.png", "film-named.txt", "windows.png"]
    assert all(p.is_relative_to(tmp_path / "data" / "runs" / run["id"]) for p in written), written
    assert (inputs / "escape.png").read_bytes() == film

    again = client.post("/api/runs", files=[("files", ("a.png", film)), ("files", ("A.png", film))]).json()
    assert [f["name"] for f in again["files"]] == ["a.png", "A-2.png"]  # no upload overwrites another


def test_an_upload_without_a_radiograph_is_refused_in_words(tmp_path):
    client = _client(tmp_path)
    response = client.post("/api/runs", files=[("files", ("notes.png", b"%PDF-1.4 not a film", "image/png"))])
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "no radiograph in this upload (notes.png: a PDF image, not a radiograph format kneepipe reads "
        "(PNG, JPEG, TIFF or DICOM))"
    )
    assert client.get("/api/runs").json() == []  # nothing kept
    missing = client.post("/api/runs", data={"grader": "shipped"})
    assert missing.status_code == 422 and missing.json()["detail"].startswith("the request was not understood: files")


def test_size_limits(tmp_path, film):
    client = _client(tmp_path, max_file_mb=0.05, max_upload_mb=0.5)
    response = client.post("/api/runs", files=[("files", ("big.png", film)), ("files", ("small.png", film[:40_000]))])
    assert response.status_code == 202
    refused = response.json()["refused"]
    assert refused == [{"original": "big.png", "reason": "0.1 MB, larger than the limit of 0.05 MB"}]

    limited = _client(tmp_path / "few", max_files=2)
    refused_count = limited.post("/api/runs", files=[("files", (f"{i}.png", film[:1000])) for i in range(3)])
    assert refused_count.status_code == 413 and "at most 2 are taken" in refused_count.json()["detail"]

    declared = client.post("/api/runs", files=[("files", ("huge.png", film * 6))])  # 0.72 MB, Content-Length
    assert declared.status_code == 413
    assert "larger than the upload limit of 0.5 MB (max_upload_mb" in declared.json()["detail"]

    def chunks():  # no Content-Length: counted while it arrives
        boundary = b"--kneepipe\r\n"
        yield boundary + b'Content-Disposition: form-data; name="files"; filename="s.png"\r\n\r\n'
        for _ in range(10):
            yield film
        yield b"\r\n--kneepipe--\r\n"

    streamed = client.post(
        "/api/runs", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=kneepipe"}
    )
    assert streamed.status_code == 413 and "larger than the upload limit" in streamed.json()["detail"]
    runs = client.get("/api/runs").json()
    assert len(runs) == 1  # the refused uploads kept no run


def test_grader_and_prior_are_checked(tmp_path, film):
    graders = tmp_path / "data" / "graders"
    graders.mkdir(parents=True)
    (graders / "site.npz").write_bytes(b"made by kneepipe adapt")
    (graders / "notes.txt").write_text("not a grader")
    client = _client(tmp_path)
    assert client.get("/api/status").json()["graders"] == ["shipped", "site.npz"]
    upload = [("files", ("k.png", film))]
    for name in ("other.npz", "../graders/site.npz", "notes.txt"):
        response = client.post("/api/runs", files=upload, data={"grader": name})
        assert (
            response.status_code == 400
            and "pick the shipped grader or one of ['site.npz']" in response.json()["detail"]
        ), name
    bad_prior = client.post("/api/runs", files=upload, data={"prior": "0.2,lots,0.2,0.2,0.2"})
    assert bad_prior.status_code == 400 and "not a number" in bad_prior.json()["detail"]
    short_prior = client.post("/api/runs", files=upload, data={"prior": "0.5,0.5"})
    assert short_prior.status_code == 400 and "0.5,0.5" in short_prior.json()["detail"]
    run = client.post("/api/runs", files=upload, data={"grader": "site.npz", "prior": "63,199,139,84,46"}).json()
    assert run["grader"] == "site.npz" and Path(run["grader_file"]) == graders / "site.npz"
    assert run["prior"] == "63,199,139,84,46"


def test_token_is_checked_on_every_request(tmp_path, film):
    client = _client(tmp_path, token="s3cret-token")
    for path in ("/", "/api/status", "/api/runs", "/static/app.js", "/docs", "/openapi.json", "/api/runs/x"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert "needs its access token" in response.json()["detail"] and "no token" in response.json()["detail"]
    assert client.post("/api/runs", files=[("files", ("k.png", film))]).status_code == 401
    wrong = client.get("/api/status", headers={"Authorization": "Bearer s3cret-tokem"})
    assert wrong.status_code == 401 and "a wrong token" in wrong.json()["detail"]
    assert client.get("/api/status", params={"token": "guess"}).status_code == 401
    right = {"Authorization": "Bearer s3cret-token"}
    assert client.get("/api/status", headers=right).status_code == 200
    assert client.post("/api/runs", files=[("files", ("k.png", film))], headers=right).status_code == 202

    # The address printed at start-up: the token once in the query, then a cookie for the page.
    opened = client.get("/?token=s3cret-token", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"
    assert "kneepipe_token=s3cret-token" in opened.headers["set-cookie"]
    assert "httponly" in opened.headers["set-cookie"].lower()
    client.cookies.set("kneepipe_token", "s3cret-token")
    assert client.get("/").status_code == 200 and client.get("/api/runs").status_code == 200


def test_without_a_token_only_loopback_names_are_answered(tmp_path):
    assert _client(tmp_path, base_url="http://localhost:8000").get("/api/status").status_code == 200
    assert _client(tmp_path, base_url="http://[::1]:8000").get("/api/status").status_code == 200
    rebound = _client(tmp_path, base_url="http://attacker.example:8000").get("/api/status")
    assert rebound.status_code == 421 and "not attacker.example" in rebound.text
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20") and not is_loopback("example.org")


def test_binding_off_loopback_needs_a_token(tmp_path, monkeypatch):
    config = _config(tmp_path, host="0.0.0.0")
    with pytest.raises(TokenRequiredError, match="give an access token"):
        build_server(config, None, None, None)
    assert build_server(config, None, None, None, token="t").token == "t"
    monkeypatch.delenv("KNEEPIPE_TOKEN", raising=False)
    result = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--data", str(tmp_path / "d")])
    assert result.exit_code == EXIT_CONFIG
    assert "binding to 0.0.0.0 lets other machines reach the page" in " ".join(result.output.split())


def test_names_in_addresses_cannot_reach_other_files(tmp_path, film):
    client = _client(tmp_path)
    run_id = client.post("/api/runs", files=[("files", ("k.png", film))]).json()["id"]
    (tmp_path / "data" / "secret.txt").write_text("outside the run")
    out = tmp_path / "data" / "runs" / run_id / "out"
    (out / "crops").mkdir(parents=True)
    (out / "crops" / "k_R.png").write_bytes(film)
    (out / "journal.jsonl").write_text('{"image": "k.png", "path": "/srv/knees/outside the run"}\n')
    (out / "args.yaml").write_text("input: /srv/knees/outside the run\n")
    assert client.get(f"/api/runs/{run_id}/files/out/crops/k_R.png").content == film
    for path in (
        "/api/runs/..%2F..%2Fsecret.txt",
        "/api/runs/not-a-run",
        f"/api/runs/{run_id}/files/run.json",
        f"/api/runs/{run_id}/files/inputs/k.png",
        f"/api/runs/{run_id}/files/out/..%2F..%2F..%2Fsecret.txt",
        f"/api/runs/{run_id}/files/out/%2E%2E/run.json",
        f"/api/runs/{run_id}/files/views/../run.json",
        f"/api/runs/{run_id}/files/%2Fetc%2Fpasswd",
        f"/api/runs/{run_id}/files/out/journal.jsonl",  # names server paths
        f"/api/runs/{run_id}/files/out/args.yaml",
        f"/api/runs/{run_id}/files/out/crops/../../inputs/k.png",
    ):
        response = client.get(path)
        assert response.status_code == 404, (path, response.text)
        assert "outside the run" not in response.text
    assert client.get("/api/runs/not-a-run").json() == {"detail": "no run 'not-a-run' in the data folder"}
    assert client.get(f"/api/runs/{run_id}/results.csv").json()["detail"].startswith("results.csv is written when")
    early = client.put(f"/api/runs/{run_id}/corrections", json={"image": "k.png", "knee": 0, "kl_grade": 2})
    assert early.status_code == 409 and early.json()["detail"] == "a run can be corrected once it has finished"
    invalid = client.put(f"/api/runs/{run_id}/corrections", json={"image": "k.png", "knee": 0, "kl_grade": 7})
    assert invalid.status_code == 422 and "kl_grade" in invalid.json()["detail"]


def test_api_documentation_is_served_locally(tmp_path):
    client = _client(tmp_path)
    schema = client.get("/openapi.json").json()
    assert {
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/corrections",
        "/api/runs/{run_id}/results.csv",
    } <= set(schema["paths"])
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "/docs-assets/" in html and "https://" not in html and "http://" not in html, page
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "default-src 'self'" in client.get("/").headers["content-security-policy"]
    page = client.get("/").text + client.get("/static/app.js").text + client.get("/static/app.css").text
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_runs_left_unfinished_are_taken_up_at_the_next_start(tmp_path, film):
    client = _client(tmp_path)
    first = client.post("/api/runs", files=[("files", ("a.png", film))]).json()["id"]
    second = client.post("/api/runs", files=[("files", ("b.png", film))]).json()["id"]
    store = RunStore(tmp_path / "data")
    store.update(first, status="running")  # the server stopped while grading it
    done = store.create("shipped", None)
    store.update(done, status="done")
    taken: list[str] = []
    worker = Worker(store, process=lambda worker, run_id: taken.append(run_id), load=None)
    worker.start()
    worker.stop()
    assert taken == [first, second]
    assert [run["id"] for run in store.runs()] == [done, second, first]


def test_a_failing_run_is_marked_in_words_and_the_next_goes_on(tmp_path, film):
    client = _client(tmp_path)
    bad = client.post("/api/runs", files=[("files", ("a.png", film))]).json()["id"]
    good = client.post("/api/runs", files=[("files", ("b.png", film))]).json()["id"]
    store = RunStore(tmp_path / "data")

    def process(worker, run_id):
        if run_id == bad:
            raise OSError(28, "No space left on device")
        store.update(run_id, status="done")

    worker = Worker(store, process=process, load=None)
    worker.start()
    worker.stop()
    assert store.meta(bad)["status"] == "failed"
    assert store.meta(bad)["message"] == "the run could not be written: No space left on device"
    assert store.meta(good)["status"] == "done"
    failing = Worker(store, process=process, load=lambda: (_ for _ in ()).throw(RuntimeError("grader.npz is damaged")))
    queued = client.post("/api/runs", files=[("files", ("c.png", film))]).json()["id"]
    failing.start()
    failing.stop()
    assert failing.state == "failed" and failing.message == "cannot load the models: grader.npz is damaged"
    assert store.meta(queued)["status"] == "failed" and store.meta(queued)["message"] == failing.message
    server_state = TestClient(create_app(_config(tmp_path), store, failing), base_url=LOCAL)
    refused = server_state.post("/api/runs", files=[("files", ("d.png", film))])
    assert refused.status_code == 503 and refused.json()["detail"] == "cannot load the models: grader.npz is damaged"


def test_corrections_are_kept_beside_the_predictions_and_exported(tmp_path):
    store = RunStore(tmp_path / "data")
    run_id = store.create("shipped", None)
    out = store.folder(run_id) / "out"
    out.mkdir()
    header = "image,side,x1,y1,x2,y2,det_confidence,kl_grade,p0,p1,p2,p3,p4,crop,status,message\n"
    rows = [
        "a.png,R,1,2,3,4,0.9,2,0.1,0.2,0.5,0.1,0.1,crops/a_R.png,ok,\n",
        "a.png,L,5,6,7,8,0.8,1,0.2,0.5,0.1,0.1,0.1,crops/a_L.png,ok,\n",
        "'=b.png,,,,,,,,,,,,,,not_gradable_view,a lateral view\n",
    ]
    (out / "results.csv").write_text(header + "".join(rows))
    predicted = (out / "results.csv").read_text()
    store.correct(run_id, {"image": "a.png", "knee": 1, "kl_grade": 3, "side": "R", "note": "-osteophyte"})
    store.correct(run_id, {"image": "=b.png", "knee": 0, "kl_grade": None, "side": None, "note": "retake AP"})
    store.correct(run_id, {"image": "a.png", "knee": 0, "kl_grade": 0, "side": None, "note": ""})
    store.correct(run_id, {"image": "a.png", "knee": 0, "kl_grade": None, "side": None, "note": ""})  # withdrawn
    exported = list(csv_rows(store.export_results(run_id)))
    assert (out / "results.csv").read_text() == predicted  # the predictions are never written over
    assert [r["kl_grade"] for r in exported] == ["2", "1", ""]
    assert [r["corrected_kl_grade"] for r in exported] == ["", "3", ""]
    assert [r["corrected_side"] for r in exported] == ["", "R", ""]
    assert [r["correction_note"] for r in exported] == ["", "'-osteophyte", "retake AP"]
    assert exported[1]["corrected_at"] and not exported[0]["corrected_at"]
    kept = json.loads((store.folder(run_id) / "corrections.json").read_text())
    assert {(c["image"], c["knee"]) for c in kept} == {("a.png", 1), ("=b.png", 0)}


def csv_rows(text: str):
    import csv

    return csv.DictReader(io.StringIO(text))


def test_the_serve_command_is_listed_and_loads_no_framework():
    import subprocess
    import sys

    code = (
        "import sys; from kneepipe.cli import app; from typer.testing import CliRunner;"
        "r = CliRunner().invoke(app, ['serve', '--help']); assert r.exit_code == 0, r.output;"
        "heavy = {'tensorflow', 'torch', 'fastapi', 'uvicorn'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_start_up_message_says_whether_a_token_is_needed(tmp_path, monkeypatch):
    import kneepipe.serve.server as server_module

    started = []
    monkeypatch.setattr(server_module, "serve_forever", started.append)  # the command would block here
    monkeypatch.setenv("KNEEPIPE_TOKEN", "from-the-environment")
    result = CliRunner().invoke(
        cli_app, ["serve", "--host", "0.0.0.0", "--port", "8123", "--data", str(tmp_path / "d"), "max_file_mb=5"]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "an access token is required on every request: open http://0.0.0.0:8123/?token=<your token>" in output
    assert "from-the-environment" not in output  # the token itself is never printed
    (server,) = started
    assert server.token == "from-the-environment" and server.config.max_file_mb == 5.0
    assert server.store.data_dir == (tmp_path / "d").resolve()

    monkeypatch.delenv("KNEEPIPE_TOKEN")
    result = CliRunner().invoke(cli_app, ["serve", "--data", str(tmp_path / "d"), "detect.conf=0.4"])
    assert result.exit_code == 0, result.output
    assert "listening on this machine only, no token needed: open http://127.0.0.1:8000/" in " ".join(
        result.output.split()
    )
    assert started[-1].token is None
    bad = CliRunner().invoke(cli_app, ["serve", "--data", str(tmp_path / "d"), "grade.presicion=bfloat16"])
    assert bad.exit_code == EXIT_CONFIG and "did you mean 'grade.precision'" in " ".join(bad.output.split())


def test_server_errors_are_told_in_words_without_a_traceback(tmp_path, film, monkeypatch):
    config = _config(tmp_path)
    store = RunStore(config.data)
    worker = Worker(store, process=lambda worker, run_id: None, load=None)
    client = TestClient(create_app(config, store, worker), base_url=LOCAL, raise_server_exceptions=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunStore, "save_upload", disk_full)
    response = client.post("/api/runs", files=[("files", ("k.png", film))])
    assert response.status_code == 507
    assert response.json() == {"detail": "the upload could not be stored: No space left on device"}
    assert store.runs() == [] and list(store.runs_dir.iterdir()) == []  # no half-made run kept

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(RunStore, "runs", broken)
    crashed = client.get("/api/runs")
    assert crashed.status_code == 500
    assert crashed.json() == {
        "detail": "kneepipe could not answer this request (RuntimeError); the server log says why"
    }
    assert "Traceback" not in crashed.text


def test_uploads_are_spooled_under_the_data_folder(tmp_path, monkeypatch):
    import tempfile

    from kneepipe.serve.server import keep_temporary_files_in

    monkeypatch.setattr(tempfile, "tempdir", tempfile.gettempdir())  # restored after the test
    store = RunStore(tmp_path / "data")
    (store.data_dir / "tmp").mkdir()
    (store.data_dir / "tmp" / "left-by-a-killed-server").write_bytes(b"x")
    folder = keep_temporary_files_in(store)
    assert folder == store.data_dir / "tmp" and list(folder.iterdir()) == []
    # Starlette spools a large upload part to a tempfile.SpooledTemporaryFile; it rolls over in this folder.
    assert tempfile.gettempdir() == str(folder)
    with tempfile.NamedTemporaryFile() as spooled:
        assert Path(spooled.name).parent == folder
