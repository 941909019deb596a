"""``kneepipe serve`` used as a person uses it: the real command, the real models, a real browser.

The server runs as its own process (``kneepipe serve``), so a restart is a real one. The
browser is the Debian ``chromium`` package driven by Playwright through ``executable_path``
(no browser download); CI installs it, so a missing chromium fails these tests. Screenshots
go to ``$KNEEPIPE_TEST_OUTPUT`` (default: pytest's temporary folder), never into the repository.

The load test runs on loopback against the restarted server: 20 concurrent clients upload
100 films in all, one request per film; it checks that no upload is lost, each film is
graded once and the server's memory stays flat, and reports the latency percentiles.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from dicom_files import make_dicom, save_dicom

import kneepipe

pytestmark = pytest.mark.slow

FILMS = {  # name -> what the page must show (tests/data/radiograph_annotations.csv)
    "bilateral_0.png": "bilateral",
    "arthritis_7.jpg": "single",
    "arthritis_3.jpg": "lateral",
    "stage_1_5.jpg": "foot",
}
BAD_FILE = ("notes.png", b"name,kl_grade\nknee,2\n")  # text, named as a PNG
STARTUP_S = 240  # the models load in the background; the page answers at once
RUN_S = 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """``kneepipe serve`` in a process of its own, on a free loopback port."""

    def __init__(self, data: Path, log: Path, *overrides: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "from kneepipe.cli import app; app()", "serve", "--port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if k != "KNEEPIPE_TOKEN"}
        self.log = log
        self.process = subprocess.Popen(
            [*command, "--data", str(data), *overrides], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 60
        while True:  # the page answers before the models have loaded
            try:
                if self.client.get("/api/status").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, f"kneepipe serve exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"kneepipe serve did not answer: {self.log.read_text()[-3000:]}"
            time.sleep(0.3)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while (status := self.client.get("/api/status").json())["worker"] != "ready":
            assert status["worker"] != "failed", status["message"]
            assert time.monotonic() < deadline, "the models did not load in time"
            time.sleep(0.5)

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    """Where screenshots and the load test's figures go (outside the repository)."""
    folder = Path(os.environ.get("KNEEPIPE_TEST_OUTPUT") or tmp_path_factory.mktemp("serve-output"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-data")


@pytest.fixture(scope="module")
def server(data_dir, tmp_path_factory):
    serve = ServeProcess(data_dir, tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed for the browser tests (apt-get install chromium; .ci/run installs it)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.elsewhere = []  # every request that leaves the server: there must be none
    page.on(
        "request",
        lambda request: (
            page.elsewhere.append(request.url) if not request.url.startswith((server.url, "data:", "blob:")) else None
        ),
    )
    page.console_errors = []  # a script error or a refused load (the page's content security policy)
    page.on("console", lambda message: page.console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    yield page
    context.close()


def _results(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_a_reader_uploads_films_sees_the_grades_corrects_one_and_downloads(
    server, page, radiographs_dir, tmp_path, output_dir
):
    bad = tmp_path / BAD_FILE[0]
    bad.write_bytes(BAD_FILE[1])
    page.goto(server.url + "/")
    assert page.title() == "kneepipe"
    server.wait_ready()
    page.set_input_files("#files", [str(radiographs_dir / name) for name in FILMS] + [str(bad)])
    assert page.inner_text("#picked").startswith("5 file(s)")
    page.click("#upload")
    page.wait_for_selector("#run-status.done", timeout=RUN_S * 1000)
    page.wait_for_load_state("networkidle")

    # The bad file: refused by its content, in words.
    assert page.inner_text("#refused") == (
        "notes.png was not taken: not an image: its content is not PNG, JPEG, TIFF or DICOM (whatever its name says)"
    )
    films = {film.get_attribute("data-image"): film for film in page.query_selector_all("#films .film[data-image]")}
    assert sorted(films) == sorted(FILMS)
    bilateral = films["bilateral_0.png"]
    assert bilateral.get_attribute("data-status") == "ok"
    assert [k.get_attribute("data-side") for k in bilateral.query_selector_all(".knee")] == ["R", "L"]
    assert films["arthritis_7.jpg"].get_attribute("data-status") == "ok"
    assert len(films["arthritis_7.jpg"].query_selector_all(".knee")) >= 1
    for name in ("arthritis_3.jpg", "stage_1_5.jpg"):  # a lateral view and a foot: findings with a reason
        film = films[name]
        assert film.get_attribute("data-status") in ("lateral_view", "no_knee"), name
        assert film.query_selector(".badge").inner_text() in ("lateral view", "no knee found")
        assert film.query_selector(".message").inner_text().strip(), name
        assert not film.query_selector_all(".knee")
    # Every knee shows its crop, heat map, five probability bars and a grade; every image loaded.
    for knee in page.query_selector_all(".knee"):
        assert len(knee.query_selector_all(".bars .bar")) == 5
        assert knee.query_selector(".grade").inner_text().startswith("KL ")
        assert knee.query_selector("img[alt='Grad-CAM heat map']")
    broken = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    assert broken == []
    assert page.query_selector_all(".radiograph svg rect")  # the boxes drawn on the films
    page.screenshot(path=str(output_dir / "serve-run.png"), full_page=True)

    # Correct the left knee of bilateral_0.png and check the exported results.csv.
    run_id = page.inner_text("#run-title").removeprefix("Run ")
    run = server.client.get(f"/api/runs/{run_id}").json()
    predicted = run["films"][[f["image"] for f in run["films"]].index("bilateral_0.png")]["knees"][1]["kl_grade"]
    corrected = (predicted + 2) % 5
    knee = bilateral.query_selector(".knee[data-knee='1']")
    knee.query_selector("select[name=kl_grade]").select_option(str(corrected))
    knee.query_selector("textarea[name=note]").fill("=osteophytes checked on the lateral view")
    knee.query_selector("button[type=submit]").click()
    page.wait_for_selector(".film[data-image='bilateral_0.png'] .knee[data-knee='1'] .saved:text('saved')")
    assert f"Corrected: KL {corrected}" in page.inner_text(".film[data-image='bilateral_0.png'] .knee[data-knee='1']")
    lateral = page.query_selector(".film[data-image='arthritis_3.jpg'] form.correction")
    lateral.query_selector("textarea[name=note]").fill("lateral view: ask for an AP film")
    lateral.query_selector("button[type=submit]").click()
    page.wait_for_selector(".film[data-image='arthritis_3.jpg'] .saved:text('saved')")
    with page.expect_download() as download:
        page.click("#download-results")
    exported = _results(Path(download.value.path()).read_text())
    rows = [row for row in exported if row["image"] == "bilateral_0.png"]
    assert [row["kl_grade"] for row in rows][1] == str(predicted)  # the prediction stays
    assert [row["corrected_kl_grade"] for row in rows] == ["", str(corrected)]
    assert rows[1]["correction_note"] == "'=osteophytes checked on the lateral view"  # a formula is shown as text
    assert {row["image"] for row in exported} == set(FILMS)
    assert [row["correction_note"] for row in exported if row["image"] == "arthritis_3.jpg"] == [
        "lateral view: ask for an AP film"
    ]
    on_disk = (server.client.get(f"/api/runs/{run_id}/files/out/results.csv")).status_code
    assert on_disk == 200
    pipeline_csv = _results(server.client.get(f"/api/runs/{run_id}/files/out/results.csv").text)
    assert "corrected_kl_grade" not in pipeline_csv[0]  # the pipeline's own table is never written over
    with page.expect_popup() as popup:
        page.click("#download-report")
    report = popup.value
    report.wait_for_load_state()
    assert "bilateral_0.png" in report.content() and "Grad-CAM" in report.content()
    report.close()

    # Reload: the run, its grades and the correction are still there, and listed with earlier runs.
    page.reload()
    page.wait_for_selector(".film[data-image='bilateral_0.png'] .knee")
    assert page.inner_text("#run-title") == f"Run {run_id}"
    assert f"Corrected: KL {corrected}" in page.inner_text(".film[data-image='bilateral_0.png']")
    assert page.query_selector(f"#runs a[data-run='{run_id}']")
    page.screenshot(path=str(output_dir / "serve-reloaded.png"), full_page=False)
    page.query_selector(".film[data-image='bilateral_0.png']").screenshot(path=str(output_dir / "serve-corrected.png"))

    # An upload with no radiograph at all: the page says why, in words.
    page.set_input_files("#files", [str(bad)])
    page.click("#upload")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == (
        "The upload was refused: no radiograph in this upload (notes.png: not an image: its content is not PNG, "
        "JPEG, TIFF or DICOM (whatever its name says))"
    )
    page.screenshot(path=str(output_dir / "serve-refused.png"), full_page=False)

    # The refused upload answers 400, which the browser logs; anything else is an error on the page.
    assert [e for e in page.console_errors if "400 (Bad Request)" not in e] == []
    page.goto(server.url + "/docs")
    page.wait_for_selector(".opblock")
    assert "/api/runs/{run_id}/corrections" in page.inner_text("body")
    page.screenshot(path=str(output_dir / "serve-docs.png"), full_page=False)
    assert page.elsewhere == []  # nothing fetched from another host: it works offline


def test_a_folder_graded_by_a_site_grader_with_a_known_prior(
    server, data_dir, page, radiographs_dir, tmp_path, output_dir
):
    # A site grader is any grader file in the graders folder; here a copy of the shipped one.
    graders = data_dir / "graders"
    graders.mkdir(exist_ok=True)
    shutil.copyfile(Path(kneepipe.__file__).parent / "weights" / "grader.npz", graders / "site.npz")
    folder = tmp_path / "clinic"
    for part in ("monday", "tuesday"):  # one name in two subfolders: both kept, under unique names
        (folder / part).mkdir(parents=True)
        shutil.copyfile(radiographs_dir / "bilateral_0.png", folder / part / "bilateral_0.png")
    pixels = cv2.imread(str(radiographs_dir / "bilateral_0.png"), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
    (folder / "wednesday").mkdir()
    save_dicom(make_dicom(pixels, "MONOCHROME2", 12), folder / "wednesday" / "IM0001")  # a DICOM without suffix
    server.wait_ready()
    page.goto(server.url + "/")
    page.wait_for_selector("#grader option[value='site.npz']", state="attached")
    page.select_option("#grader", "site.npz")
    page.fill("#prior", "1,1,1,1,1")
    page.set_input_files("#folder", str(folder))
    assert page.inner_text("#picked").startswith("3 file(s)")
    page.click("#upload")
    # Each film shows its state while the run waits or is graded (the site grader loads first).
    page.wait_for_selector("#films .film[data-image]")
    states = page.eval_on_selector_all("#films .film", "films => films.map(f => f.dataset.status)")
    assert len(states) == 3 and set(states) <= {"queued", "grading", "graded, finishing the run", "ok"}, states
    if "ok" not in states:  # results and report are offered once the run has finished
        assert not page.is_visible("#download-results") and not page.is_visible("#download-report")
    page.screenshot(path=str(output_dir / "serve-progress.png"), full_page=False)
    page.wait_for_selector("#run-status.done", timeout=RUN_S * 1000)
    assert "grader site.npz" in page.inner_text("#run-facts")
    assert "known prior 1,1,1,1,1" in page.inner_text("#run-facts")
    run_id = page.inner_text("#run-title").removeprefix("Run ")
    run = server.client.get(f"/api/runs/{run_id}").json()
    assert run["grader_version"].startswith("site.npz@")
    films = {film["image"]: film for film in run["films"]}
    assert sorted(films) == ["IM0001", "bilateral_0-2.png", "bilateral_0.png"]
    assert [len(film["knees"]) for film in films.values()] == [2, 2, 2]
    assert [film["status"] for film in films.values()] == ["ok"] * 3
    # The known prior moves the probabilities away from the same knees graded with the training prior.
    shipped = [r for r in server.client.get("/api/runs").json() if r["grader"] == "shipped" and r["status"] == "done"]
    assert shipped, "the first browser test leaves a run graded with the shipped grader"
    before = server.client.get(f"/api/runs/{shipped[-1]['id']}").json()
    knee = next(f for f in before["films"] if f["image"] == "bilateral_0.png")["knees"][0]
    with_prior = films["bilateral_0.png"]["knees"][0]
    assert with_prior["box"] == knee["box"]
    assert abs(sum(with_prior["probabilities"]) - 1) < 1e-3
    assert max(abs(a - b) for a, b in zip(with_prior["probabilities"], knee["probabilities"], strict=True)) > 0.01


def test_after_a_restart_the_runs_are_there_and_20_clients_upload_100_films(
    server, data_dir, browser, radiographs_dir, tmp_path_factory, output_dir
):
    runs = [server.client.get(f"/api/runs/{run['id']}").json() for run in server.client.get("/api/runs").json()]
    corrected = [run for run in runs if run["status"] == "done" and run["corrections"]]
    assert corrected, "the first browser test leaves a finished run with a correction"
    before = server.client.get(f"/api/runs/{corrected[0]['id']}/results.csv").text
    server.stop()

    # A real restart, lighter for the load: no heat maps or report per run.
    restarted = ServeProcess(
        data_dir, tmp_path_factory.mktemp("serve-log") / "restart.log", "gradcam=false", "report=false"
    )
    try:
        kept = {run["id"]: run for run in restarted.client.get("/api/runs").json()}
        assert {run["id"] for run in runs} <= set(kept) and kept[corrected[0]["id"]]["status"] == "done"
        assert restarted.client.get(f"/api/runs/{corrected[0]['id']}/results.csv").text == before  # corrections too
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{restarted.url}/#run={corrected[0]['id']}")
        page.wait_for_selector(".film .knee")
        assert "Corrected: KL" in page.inner_text("#films")
        context.close()

        restarted.wait_ready()
        figures = _load(restarted, data_dir, radiographs_dir, clients=20, films=100)
    finally:
        restarted.stop()
    (output_dir / "serve-load.json").write_text(json.dumps(figures, indent=2))
    print("\nload test:", json.dumps(figures, indent=2))
    assert figures["uploads_accepted"] == 100 and figures["runs_done"] == 100
    assert figures["films_graded_once"] == 100 and figures["films_graded_twice"] == 0
    assert figures["rss_growth_mb"] < 150, figures  # flat: no growth with the number of runs (measured 32 MB)
    assert figures["status_ms"]["p95"] < 2000, figures  # the page stays responsive while the queue is worked off


def _load(server: ServeProcess, data: Path, radiographs_dir: Path, clients: int, films: int) -> dict:
    """``clients`` threads upload ``films`` real films in all, one request per film; poll until all are graded."""
    import psutil

    sources = []
    for name in ("bilateral_0.png", "arthritis_2.jpg", "arthritis_7.jpg", "stage_1_1.jpg", "stage_2_2.jpg"):
        pixels = cv2.imread(str(radiographs_dir / name), cv2.IMREAD_GRAYSCALE)
        scale = 640 / max(pixels.shape)
        small = cv2.resize(pixels, None, fx=min(1.0, scale), fy=min(1.0, scale), interpolation=cv2.INTER_AREA)
        sources.append(cv2.imencode(".png", small)[1].tobytes())
    upload_s: list[float] = []
    run_ids: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for k in range(films // clients):
                number = index * (films // clients) + k
                started = time.perf_counter()
                try:
                    response = http.post(
                        "/api/runs", files=[("files", (f"film_{number:03d}.png", sources[number % len(sources)]))]
                    )
                except httpx.HTTPError as err:
                    with lock:
                        errors.append(repr(err))
                    continue
                with lock:
                    upload_s.append(time.perf_counter() - started)
                    if response.status_code == 202:
                        run_ids.append(response.json()["id"])
                    else:
                        errors.append(response.text)

    process = psutil.Process(server.process.pid)
    rss: list[tuple[int, float]] = []  # (runs done, MB)
    status_s: list[float] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + RUN_S
    done_at: dict[str, float] = {}
    while True:
        tick = time.perf_counter()
        server.client.get("/api/status")
        status_s.append(time.perf_counter() - tick)
        runs = {run["id"]: run for run in server.client.get("/api/runs").json()}
        with lock:
            ours = list(run_ids)
        for run_id in ours:
            if runs.get(run_id, {}).get("status") in ("done", "failed") and run_id not in done_at:
                done_at[run_id] = time.perf_counter() - started
        rss.append((len(done_at), process.memory_info().rss / 1e6))
        uploading = any(thread.is_alive() for thread in threads)
        if not uploading and len(done_at) == len(ours):
            break
        assert time.monotonic() < deadline, f"the load test stopped itself: {len(done_at)} of {len(ours)} runs done"
        time.sleep(0.25)
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    assert not errors, errors[:3]

    graded = {}
    for run_id in run_ids:
        run = server.client.get(f"/api/runs/{run_id}").json()
        assert run["status"] == "done", run["message"]
        graded[run_id] = run["films"]
    journal_counts = [_journal_lines(data, run_id) for run_id in run_ids]
    # RSS once the first tenth of the runs is done (models warm) against the end.
    warm = [mb for count, mb in rss if count >= len(run_ids) // 10]
    return {
        "clients": clients,
        "uploads_accepted": len(run_ids),
        "runs_done": sum(1 for run_id in run_ids if run_id in done_at),
        "films_graded_once": sum(count == 1 for count in journal_counts),
        "films_graded_twice": sum(count > 1 for count in journal_counts),
        "knees_graded": sum(len(film["knees"]) for films_ in graded.values() for film in films_),
        "seconds": round(seconds, 1),
        "films_per_s": round(len(run_ids) / seconds, 2),
        "upload_ms": _percentiles(upload_s),
        "upload_to_graded_s": {k: round(v / 1000, 1) for k, v in _percentiles(list(done_at.values())).items()},
        "status_ms": _percentiles(status_s),
        "rss_mb_warm": round(warm[0], 1),
        "rss_mb_end": round(warm[-1], 1),
        "rss_mb_peak": round(max(mb for _, mb in rss), 1),
        "rss_growth_mb": round(warm[-1] - warm[0], 1),
    }


def _journal_lines(data: Path, run_id: str) -> int:
    """How many times the run's film was graded: its lines in the pipeline's journal."""
    journal = data / "runs" / run_id / "out" / "journal.jsonl"
    return sum(1 for line in journal.read_text().splitlines() if line.strip())


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = np.sort(np.asarray(values, dtype=float)) * 1000
    return {
        "p50": round(float(np.percentile(ordered, 50)), 1),
        "p95": round(float(np.percentile(ordered, 95)), 1),
        "p99": round(float(np.percentile(ordered, 99)), 1),
        "max": round(float(ordered[-1]), 1),
        "mean": round(statistics.fmean(ordered), 1),
    }
