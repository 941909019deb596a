"""``kneepipe run --engine ray``: the same results as the local engine, on a Ray cluster started here.

The shared real radiographs plus bad files are graded by both engines; the Ray runs must
write the local run's ``results.csv`` byte for byte, journal every film once (also when an
actor is killed mid-run and its step retried), and resume, or be resumed by, the local engine.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.cli_common import EXIT_CONFIG, EXIT_FILE_ERRORS
from kneepipe.config import load_config
from kneepipe.detect.config import DetectConfig
from kneepipe.grade.config import GradeConfig
from kneepipe.imaging import InputListing
from kneepipe.pipeline.config import PipelineConfig
from kneepipe.pipeline.ray_engine import run_pipeline_ray
from kneepipe.pipeline.records import image_record
from kneepipe.pipeline.run import Film, RunInputs, RunJournal, RunPlan, find_run_inputs, run_pipeline

BAD_FILES = {  # name -> words of the reason its error row gives
    "truncated.jpg": "truncated",
    "notes.png": "not a PNG, JPEG, TIFF or DICOM",
    "empty.png": "empty file",
}


class Killed(Exception):
    """Stands for a kill of the driver."""


@pytest.fixture(scope="module")
def cluster():
    """A two-CPU Ray instance on this machine, for the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def raw(tmp_path_factory, radiographs_dir: Path) -> Path:
    """The shared real radiographs and three files that cannot be read."""
    folder = tmp_path_factory.mktemp("raw")
    for path in sorted(radiographs_dir.iterdir()):
        if path.is_file():
            shutil.copy(path, folder / path.name)
    jpeg = (radiographs_dir / "stage_2_7.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.png").write_text("patient 9001695, left knee, KL 2\n" * 20)
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def configs():
    return load_config(PipelineConfig), load_config(DetectConfig), load_config(GradeConfig)


@pytest.fixture(scope="module")
def models(configs):
    from kneepipe.pipeline.run import load_models

    return load_models(configs[1], configs[2])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, raw, configs, models):
    """The local engine's run folder: what every Ray run must equal."""
    out = tmp_path_factory.mktemp("local") / "out"
    run_pipeline(raw, out, *configs, detector=models[0], grader=models[1])
    return out


def test_the_journal_takes_each_film_once(tmp_path):
    """A step that comes back twice (its task retried after its results were sent) adds nothing the second time."""
    films = [Film(tmp_path / f"{name}.png", f"{name}.png", name) for name in ("a", "b", "c")]
    found = RunInputs(tmp_path, tmp_path, [film.path for film in films], InputListing())
    plan = RunPlan(found, tmp_path, films, films[1:], {}, None, None)  # a.png journaled before
    seen = []
    journal = RunJournal(plan, progress=lambda done, total: seen.append((done, total)))
    step = [image_record(film.name, film.path) for film in films[1:]]
    assert journal.write(step) == 2 and journal.write(step) == 0 and journal.write(step[:1]) == 0
    assert journaled_names(tmp_path) == ["b.png", "c.png"]
    assert seen == [(1, 3), (3, 3), (3, 3), (3, 3)]


def journaled_names(out: Path) -> list[str]:
    return [json.loads(line)["image"] for line in (out / "journal.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_cli_on_ray_writes_the_local_results(tmp_path, cluster, raw, local_run):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(raw), "--out", str(out), "--engine", "ray", "--no-progress"])
    assert result.exit_code == EXIT_FILE_ERRORS, result.output  # the three bad files
    assert (out / "results.csv").read_text() == (local_run / "results.csv").read_text()
    with (out / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    graded = [row for row in rows if row["status"] == "ok"]
    assert len(graded) >= 10 and all(row["kl_grade"] in "01234" for row in graded)
    for name, words in BAD_FILES.items():
        (row,) = [row for row in rows if row["image"] == name]
        assert row["status"] == "error" and words in row["message"], row
    assert sorted(journaled_names(out)) == sorted(journaled_names(local_run))  # each film once
    ray_records = {json.loads(line)["image"]: json.loads(line) for line in (out / "journal.jsonl").open()}
    local_records = {json.loads(line)["image"]: json.loads(line) for line in (local_run / "journal.jsonl").open()}
    assert ray_records == local_records  # the same logits, boxes, crops and messages
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["engine"] == "ray" and args["ray_actor_cpus"] == 2.0
    summary = json.loads((out / "summary.json").read_text())
    local_summary = json.loads((local_run / "summary.json").read_text())
    assert summary["shift"]["shift_knees"] == local_summary["shift"]["shift_knees"] == len(graded)
    assert summary["shift"]["shift_score"] == pytest.approx(local_summary["shift"]["shift_score"], abs=1e-6)


@pytest.mark.slow
def test_an_interrupted_ray_run_on_a_list_is_resumed_by_the_local_engine(
    tmp_path, cluster, raw, configs, models, local_run
):
    """The films named by a list on storage: stopped after one step on Ray, finished locally."""
    detector, grader = models
    films = tmp_path / "films.txt"  # beside the films' folder: names are raw/<file>
    copied = shutil.copytree(raw, tmp_path / raw.name)
    lines = [f"# {len(list(copied.iterdir()))} films", ""]
    for i, path in enumerate(sorted(copied.iterdir())):
        lines.append(f"file://{path}" if i % 2 else f"{raw.name}/{path.name}")
    films.write_text("\n".join([*lines, f"{raw.name}/notes.png"]) + "\n")  # a film listed twice is read once
    out = tmp_path / "out"

    def kill_after_a_step(done, total):
        if done > 0:
            raise Killed

    with pytest.raises(Killed):
        run_pipeline_ray(
            films, out, *configs, progress=kill_after_a_step, detector=detector, grader=grader, steps_per_task=1
        )
    assert not (out / "results.csv").exists()
    before = journaled_names(out)
    assert len(before) == configs[0].batch  # one step of films came back and was journaled

    resumed = run_pipeline(films, out, *configs, detector=detector, grader=grader)
    assert (resumed.resumed, resumed.processed) == (len(before), 30 - len(before))
    names = journaled_names(out)
    assert sorted(names) == sorted(f"{raw.name}/{name}" for name in journaled_names(local_run))
    # The same rows in the same order, but for the names (and so the crops' names) under raw/.
    with (out / "results.csv").open(newline="") as handle, (local_run / "results.csv").open(newline="") as local:
        listed, folder = list(csv.DictReader(handle)), list(csv.DictReader(local))
    assert [row["image"] for row in listed] == [f"{raw.name}/{row['image']}" for row in folder]
    ignored = {"image", "crop"}
    assert [{k: v for k, v in row.items() if k not in ignored} for row in listed] == [
        {k: v for k, v in row.items() if k not in ignored} for row in folder
    ]


def test_an_address_needs_the_ray_engine(tmp_path, radiographs_dir):
    result = CliRunner().invoke(app, ["run", str(radiographs_dir), "--out", str(tmp_path), "--address", "auto"])
    assert result.exit_code == EXIT_CONFIG and "--engine ray" in result.output
    assert not list(tmp_path.iterdir())  # refused before anything was loaded or written


def test_a_list_names_each_film_once_and_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "films").mkdir()
    lists = tmp_path / "lists"
    lists.mkdir()
    listed = lists / "films.txt"
    listed.write_text(
        "# films on the shared storage\n"
        "\n"
        "../films/a.png\n"
        f"{tmp_path}/films/a.png\n"  # the same film again
        f"file://{tmp_path}/films/b%20c.png\n"
        "local.png\n"
        "/mnt/elsewhere/IM0001\n"
        "/mnt/other/IM0001\n"
    )
    found = find_run_inputs(listed, tmp_path / "out")
    assert found.files == [
        tmp_path / "films/a.png",
        tmp_path / "films/b c.png",
        lists / "local.png",
        Path("/mnt/elsewhere/IM0001"),
        Path("/mnt/other/IM0001"),
    ]  # listed files that are missing get their error row when read
    assert found.root == lists
    listed.write_text("a.png\ns3://bucket/knees/b.png\n")
    with pytest.raises(ValueError, match=r"films.txt:2: s3://bucket/knees/b.png: s3:// storage cannot be read"):
        find_run_inputs(listed, tmp_path / "out")


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_its_step_graded_once(tmp_path, cluster, raw, configs, models, local_run):
    """A local run stopped after one step, resumed on Ray while the actor's process is killed mid-step."""
    detector, grader = models
    out = tmp_path / "out"

    def stop_after_a_step(done, total):
        if done > 0:
            raise Killed

    with pytest.raises(Killed):
        run_pipeline(raw, out, *configs, progress=stop_after_a_step, detector=detector, grader=grader)
    done_locally = len(journaled_names(out))

    kills: list[int] = []
    written = {path for path in out.rglob("*") if path.is_file()}
    killer = threading.Thread(target=_kill_an_actor_mid_step, args=(out, written, kills), daemon=True)
    killer.start()
    run = run_pipeline_ray(raw, out, *configs, detector=detector, grader=grader, steps_per_task=1)
    killer.join(timeout=5)
    assert kills and kills[0] < 30, "the actor was not killed while steps were left"
    assert run.resumed == done_locally
    names = journaled_names(out)
    assert len(names) == len(set(names)) == 30  # the retried step is journaled once
    assert (out / "results.csv").read_text() == (local_run / "results.csv").read_text()


def _kill_an_actor_mid_step(out: Path, written: set[Path], kills: list[int]) -> None:
    """SIGKILL the model-holding actor's process once it is saving a step's crops; note how many films were journaled.

    The signal is the actor's own output (a file the run folder did not hold before), not
    the journal: on a fast machine the driver may receive every remaining step at once.
    """
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        crops = out / "crops"
        if crops.is_dir() and any(path not in written for path in crops.rglob("*")):
            journaled = len(journaled_names(out))
            for process in psutil.Process().children(recursive=True):
                try:
                    if "FilmGrader" in " ".join(process.cmdline()):
                        process.send_signal(signal.SIGKILL)
                        kills.append(journaled)
                        return
                except psutil.Error:
                    continue
        time.sleep(0.01)
