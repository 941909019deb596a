"""A corpus of bad and odd inputs, written by the tests, through ``detect``, ``grade`` and ``run``.

Each case is one entry under one input folder with the status and the words of the message
``kneepipe run`` must give it. The three commands run once each over the whole folder (the
shipped models loaded once for the module), and every case is then checked in all three
outputs: its status, its message, that the batch completed, and the commands' exit codes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from dicom_files import make_dicom, save_dicom
from PIL import Image
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.cli_common import EXIT_CONFIG, EXIT_CRASH, EXIT_FAILED, EXIT_FILE_ERRORS, EXIT_OK, EXIT_STRICT_REFUSED

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_LINK_NOTE = "link to a file outside the input folder"


@dataclass(frozen=True)
class Case:
    """One corpus entry: its name under the input folder, and what ``run`` must say of it."""

    name: str
    status: str  # ok, no_knee, lateral_view, overexposed, underexposed, error, skipped
    words: str = ""  # in the message ("" for ok rows without a note)
    hidden: bool = False

    @property
    def grade_status(self) -> str:
        """``grade`` reads every image as a crop: what the detector refuses, it grades."""
        return "ok" if self.status in ("ok", "no_knee", "lateral_view", "overexposed", "underexposed") else self.status


def _png(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


def _png_header_only(width: int, height: int, bit_depth: int = 8) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _jpeg_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def _dicom_bytes(dataset: pydicom.Dataset, preamble: bool = True) -> bytes:
    buffer = io.BytesIO()
    if preamble:
        dataset.save_as(buffer, enforce_file_format=True)
    else:
        dataset.preamble = None
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=False)
    return buffer.getvalue()


def build_corpus(folder: Path, outside: Path, radiographs_dir: Path, oai_dir: Path) -> list[Case]:
    """Write the corpus under ``folder`` (and link targets under ``outside``); return its cases."""
    folder.mkdir(parents=True)
    outside.mkdir(parents=True)
    cases: list[Case] = []
    film_png = (radiographs_dir / "bilateral_0.png").read_bytes()  # 571x456 RGBA, two knees
    knees = cv2.cvtColor(cv2.imread(str(radiographs_dir / "bilateral_0.png")), cv2.COLOR_BGR2GRAY)
    film_jpeg = cv2.imencode(".jpg", knees, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()

    def write(name: str, data: bytes, status: str, words: str = "", hidden: bool = False) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cases.append(Case(name, status, words, hidden))

    def dicom(name: str, status: str, words: str, preamble: bool = True, pixels=None, **elements) -> None:
        dataset = make_dicom(knees if pixels is None else pixels, "MONOCHROME2", 8)
        for tag, (vr, value) in elements.pop("raw", {}).items():
            dataset.add_new(tag, vr, value)  # a value of the wrong kind, as damaged files carry
        for keyword, value in elements.items():
            setattr(dataset, keyword, value)
        write(name, _dicom_bytes(dataset, preamble), status, words)

    # --- films that must be graded, whatever their name, format or encoding -----------------------
    write("film.png", film_png, "ok")
    write("FILM_UPPER.PNG", film_png, "ok")
    write("film_jpeg.jpg", film_jpeg, "ok")
    write("png_named.jpg", film_png, "ok")  # content decides, not the suffix
    write("jpeg_named.png", film_jpeg, "ok")
    write("IM_PNG_NO_SUFFIX", film_png, "ok")
    write("film_16bit.png", _png(knees.astype(np.uint16) * 257 + 100), "ok")
    gray_alpha = io.BytesIO()
    Image.fromarray(np.dstack([knees, np.full_like(knees, 255)]), "LA").save(gray_alpha, "PNG")
    write("film_gray_alpha.png", gray_alpha.getvalue(), "ok")
    write("film.tif", cv2.imencode(".tif", knees)[1].tobytes(), "ok")
    write("film_float.tiff", cv2.imencode(".tiff", knees.astype(np.float32) / 255)[1].tobytes(), "ok")
    pages = io.BytesIO()
    Image.fromarray(knees).save(pages, "TIFF", save_all=True, append_images=[Image.fromarray(255 - knees)] * 2)
    write("multipage.tif", pages.getvalue(), "ok", "multi-page TIFF (3 pages): only page 1 was read")
    turned = np.ascontiguousarray(np.rot90(knees, 1))  # stored turned; EXIF 6 turns it back upright
    write("phone_photo_exif6.jpg", _jpeg_with_orientation(turned, 6), "ok", "EXIF orientation 6 applied")
    write("phone_photo_exif3.jpg", _jpeg_with_orientation(knees[::-1, ::-1].copy(), 3), "ok", "EXIF orientation 3")
    write("=cmd()+A1.png", film_png, "ok")  # a formula to a spreadsheet
    write("+SUM(1).png", film_png, "ok")
    write("-rf.png", film_png, "ok")
    write("@import.png", film_png, "ok")
    write("a b.png", film_png, "ok")  # a b.png and a_b.png must not share a crop
    write("a_b.png", film_png, "ok")
    write("set 1/x.png", film_png, "ok")
    write("set_1/x.png", film_png, "ok")
    write("x" * 246 + ".png", film_png, "ok")  # a 250-byte name
    write("[bold]markup[/bold].png", film_png, "ok")
    write("emoji :x: name.png", film_png, "ok")
    write("Röntgen knie (links) #1.png", film_png, "ok")
    write('comma, quote" name.png', film_png, "ok")
    write("deep/er/and/deeper/still/film.png", film_png, "ok")
    write("folder.png/inside.png", film_png, "ok")  # a folder with an image suffix is searched
    dicom("dicom_ok.dcm", "ok", "")
    dicom("IM0001", "ok", "")  # no suffix, DICM marker
    dicom("IM0002_NO_PREAMBLE", "ok", "", preamble=False)  # no suffix, no preamble, no marker
    # MONOCHROME1 stores bone dark: the film's grey levels inverted, which reading undoes.
    dicom("dicom_monochrome1.dcm", "ok", "", pixels=255 - knees, PhotometricInterpretation="MONOCHROME1")
    dicom("dicom_bad_window.dcm", "ok", "", WindowWidth="100", raw={0x00281050: ("LO", "zz")})
    dicom("dicom_bad_spacing.dcm", "ok", "", raw={0x00280030: ("LO", "a\\b")})
    dicom("dicom_frames_zero.dcm", "ok", "", raw={0x00280008: ("LO", "0")})
    three = np.full((420, 900), 20, np.uint8)
    for i, crop_path in enumerate(sorted((oai_dir / "val" / "0").glob("*.png"))[:3]):
        three[100:324, 40 + i * 290 : 264 + i * 290] = cv2.imread(str(crop_path), cv2.IMREAD_GRAYSCALE)
    write("three_knees.png", _png(three), "ok", "3 knee-like objects found; the 2 most confident were graded")

    # --- findings: read, but not gradable -----------------------------------------------------------
    write("foot.jpg", (radiographs_dir / "stage_1_5.jpg").read_bytes(), "no_knee", "no knee")
    write("black.png", _png(np.zeros((300, 300), np.uint8)), "underexposed", "under-exposed")
    write("white.png", _png(np.full((300, 300), 255, np.uint8)), "overexposed", "over-exposed")
    dicom("lateral.dcm", "lateral_view", "lateral view", ViewPosition="LL")

    # --- damaged DICOMs: one named error row each ----------------------------------------------------
    dicom("frames_ab.dcm", "error", "tag NumberOfFrames is not a whole number ('ab')", raw={0x00280008: ("LO", "ab")})
    dicom("slope_abc.dcm", "error", "tag RescaleSlope is not a number ('abc')", raw={0x00281053: ("LO", "abc")})
    dicom("intercept_x.dcm", "error", "tag RescaleIntercept is not a number", raw={0x00281052: ("LO", "x")})
    dicom("columns_ab.dcm", "error", "tag Columns is not a whole number", raw={0x00280011: ("LO", "ab")})
    dicom("rows_mismatch.dcm", "error", "the Rows/Columns tags do not match the data", Rows=100)
    dicom("rows_too_many.dcm", "error", "DICOM pixel data too short", Rows=900)
    dicom("samples_3.dcm", "error", "DICOM pixel data too short", SamplesPerPixel=3, PlanarConfiguration=0)
    dicom("bits_allocated_12.dcm", "error", "Bits Allocated", BitsAllocated=12)
    dicom("bits_stored_20.dcm", "error", "Bits Stored", BitsStored=20)
    dicom("palette.dcm", "error", "photometric interpretation PALETTE COLOR", PhotometricInterpretation="PALETTE COLOR")
    dicom("huge_rows.dcm", "error", "image too large (50000x50000", Rows=50000, Columns=50000)
    multi = make_dicom(np.stack([knees, knees]), "MONOCHROME2", 8)
    write("multiframe.dcm", _dicom_bytes(multi), "error", "multi-frame DICOM (2 frames)")
    report = make_dicom(knees, "MONOCHROME2", 8)
    del report.PixelData
    write("report_only.dcm", _dicom_bytes(report), "error", "has no pixel data")
    whole = _dicom_bytes(make_dicom(knees, "MONOCHROME2", 8))
    write("truncated.dcm", whole[: len(whole) // 2], "error", "DICOM pixel data too short")
    write("notes.dcm", b"not a dicom file at all " * 20, "error", "not a DICOM file")
    write("empty.dcm", b"", "error", "empty file")

    # --- damaged or refused rasters ------------------------------------------------------------------
    jpeg = (radiographs_dir / "stage_2_7.jpg").read_bytes()
    write("empty.png", b"", "error", "empty file (0 bytes)")
    write("truncated.jpg", jpeg[: len(jpeg) // 2], "error", "truncated JPEG")
    write("half_decodes_grey.jpg", jpeg[: len(jpeg) // 2] + b"\xff\xd9", "error", "only partly decoded")
    corrupt = bytearray(jpeg)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 4000] = bytes(4000)
    write("corrupt_middle.jpg", bytes(corrupt), "error", "only partly decoded")
    write("truncated.png", film_png[: len(film_png) // 2], "error", "truncated PNG")
    bad_crc = bytearray(film_png)
    bad_crc[100:200] = bytes(100)
    write("bad_data.png", bytes(bad_crc), "error", "cannot decode the PNG data (truncated or corrupt: libpng error")
    write("header_only.png", film_png[:20], "error", "truncated image header")
    write("bad_marker.jpg", b"\xff\xd8\xff\xe0\x00\x04ab" + b"x" * 200, "error", "corrupt image header")
    write("text_as.png", b"patient 9001695, left knee, KL 2\n" * 20, "error", "not a PNG, JPEG, TIFF or DICOM")
    write("[/]broken [red]x[/red].png", b"[/] not an image [bold]", "error", "file starts with b'[/] not '")
    write("dot.png", _png(knees[:1, :1]), "error", "image too small (1x1")
    write("strip.png", _png(knees[:20, :]), "error", "image too small (571x20")
    write("giant_60000.png", _png_header_only(60000, 60000), "error", "image too large (60000x60000")
    write("budget_20000_16bit.png", _png_header_only(20000, 20000, 16), "error", "over the pixel budget")
    write("sparse_300mb.png", _png_header_only(1000, 1000), "error", "file too large (300 MB")
    os.truncate(folder / "sparse_300mb.png", 300 << 20)  # sparse: no disk used, refused before reading
    tiff = cv2.imencode(".tif", knees)[1].tobytes()
    write("cut.tif", tiff[: len(tiff) // 2], "error", "truncated image header")
    write("knee.bmp", cv2.imencode(".bmp", knees)[1].tobytes(), "error", "a BMP image")
    write("knee.gif", b"GIF89a" + bytes(200), "error", "a GIF image")
    write("BMP_NO_SUFFIX", cv2.imencode(".bmp", knees)[1].tobytes(), "error", "a BMP image")

    # --- entries that are not radiographs: skipped, each with its reason ---------------------------------
    write(".hidden.png", film_png, "skipped", "hidden file", hidden=True)
    write(".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(100), "skipped", "hidden file", hidden=True)
    write(".cache/f.png", film_png, "skipped", "hidden", hidden=True)
    cases[-1] = Case(".cache", "skipped", "hidden folder, not searched", hidden=True)
    write("radiograph.txt", b"KL grade 2, left knee\n", "skipped", "not an image (a .txt file")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("knee.png", film_png)
    write("archive.zip", archive.getvalue(), "skipped", "not an image (a .zip file")
    write("Thumbs.db", bytes(512), "skipped", "not an image (a .db file")
    write("README", b"scans of 2024\n", "skipped", "not an image (no suffix")
    (folder / "empty_folder.png").mkdir()
    cases.append(Case("empty_folder.png", "skipped", "empty folder"))
    os.mkfifo(folder / "pipe.png")
    cases.append(Case("pipe.png", "skipped", "not a regular file (a FIFO)"))
    (folder / "loop_a.png").symlink_to("loop_b.png")
    (folder / "loop_b.png").symlink_to("loop_a.png")
    cases += [Case("loop_a.png", "skipped", "link loop"), Case("loop_b.png", "skipped", "link loop (following")]
    (folder / "self_loop.png").symlink_to("self_loop.png")
    cases.append(Case("self_loop.png", "skipped", "link loop"))
    (folder / "dangling.png").symlink_to("gone.png")
    cases.append(Case("dangling.png", "skipped", "broken link (its target gone.png does not exist)"))
    (folder / "zero.png").symlink_to("/dev/zero")
    cases.append(Case("zero.png", "skipped", "not a regular file (link to a device)"))
    (folder / "linked_folder").symlink_to(outside)
    cases.append(Case("linked_folder", "skipped", "link to a folder (links to folders are not followed)"))

    # --- links to files: followed, noted when they leave the input folder --------------------------------
    (outside / "outside_film.png").write_bytes(film_png)
    (folder / "outside_link.png").symlink_to(outside / "outside_film.png")
    cases.append(Case("outside_link.png", "ok", OUTSIDE_LINK_NOTE))
    (folder / "inside_link.png").symlink_to("film.png")
    cases.append(Case("inside_link.png", "ok", ""))
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "passwd.png").symlink_to(outside / "passwd")
    cases.append(Case("passwd.png", "error", "file starts with b'root:x:0'"))
    (folder / "passwd_no_suffix").symlink_to(outside / "passwd")
    cases.append(Case("passwd_no_suffix", "skipped", "not an image (no suffix"))
    return cases


@pytest.fixture(scope="module")
def models():
    """The shipped detector and grader, loaded once for the module."""
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.run import load_models

    return load_models(load_config(DetectConfig), load_config(GradeConfig))


@pytest.fixture(scope="module")
def loaded_once(models):
    """Every command gets the module's models instead of loading its own."""
    from kneepipe.detect.predict import JointDetector
    from kneepipe.grade.predict import Grader
    from kneepipe.pipeline import run as run_module

    detector, grader = models
    patch = pytest.MonkeyPatch()
    patch.setattr(run_module, "load_models", lambda *args, **kwargs: (detector, grader))
    patch.setattr(JointDetector, "load", classmethod(lambda cls, *args, **kwargs: detector))
    patch.setattr(Grader, "load", classmethod(lambda cls, *args, **kwargs: grader))
    yield models
    patch.undo()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, radiographs_dir, oai_dir) -> tuple[Path, list[Case]]:
    base = tmp_path_factory.mktemp("corpus")
    cases = build_corpus(base / "in", base / "outside", radiographs_dir, oai_dir)
    return base / "in", cases


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _as_written(name: str) -> str:
    """A name as the CSV holds it: formula-like text gets a leading quote (OWASP)."""
    return "'" + name if name[:1] in "=+-@" else name


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def _rows_by_image(path: Path) -> dict[str, list[dict[str, str]]]:
    """The rows of an output CSV, grouped by their ``image`` column."""
    rows: dict[str, list[dict[str, str]]] = {}
    for row in _read_csv(path):
        rows.setdefault(row["image"], []).append(row)
    return rows


@pytest.fixture(scope="module")
def run_result(corpus, loaded_once, tmp_path_factory):
    folder, _ = corpus
    out = tmp_path_factory.mktemp("run") / "out"
    result = _invoke(["run", str(folder), "--out", str(out), "--no-progress"])
    rows = _rows_by_image(out / "results.csv") if (out / "results.csv").exists() else {}
    return result, out, rows


@pytest.fixture(scope="module")
def detect_result(corpus, loaded_once, tmp_path_factory):
    folder, _ = corpus
    out = tmp_path_factory.mktemp("detect") / "crops"
    result = _invoke(["detect", str(folder), "--out", str(out), "--no-progress"])
    return result, out, _rows_by_image(out / "joints.csv")


@pytest.fixture(scope="module")
def grade_result(corpus, loaded_once, tmp_path_factory):
    folder, _ = corpus
    out = tmp_path_factory.mktemp("grade") / "grades"
    result = _invoke(["grade", str(folder), "--out", str(out)])
    rows = {row["crop"]: row for row in _read_csv(out / "grades.csv")}
    return result, out, rows


def test_the_corpus_is_large_and_varied(corpus):
    _, cases = corpus
    assert len(cases) >= 80
    statuses = {case.status for case in cases}
    assert statuses == {"ok", "no_knee", "lateral_view", "overexposed", "underexposed", "error", "skipped"}
    assert len({case.name for case in cases}) == len(cases)


def pytest_generate_tests(metafunc):
    """One test per corpus case and command: the case names come from writing the corpus once, aside."""
    if "case_name" in metafunc.fixturenames:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            from conftest import SHARED_DATA

            names = [
                case.name
                for case in build_corpus(
                    Path(scratch) / "in", Path(scratch) / "out", SHARED_DATA / "radiographs", SHARED_DATA / "oai-kl224"
                )
            ]
        metafunc.parametrize("case_name", names, ids=[repr(name)[1:-1][:60] for name in names])


@pytest.mark.slow
def test_run_gives_every_entry_its_row(corpus, run_result, case_name):
    _, cases = corpus
    case = next(c for c in cases if c.name == case_name)
    result, out, rows = run_result
    assert result.exit_code == EXIT_FILE_ERRORS, result.output  # errors in the corpus: 3, the batch complete
    case_rows = rows.get(_as_written(case.name))
    assert case_rows, f"{case.name}: no row in results.csv"
    if case.status == "ok":
        assert all(row["status"] == "ok" for row in case_rows), case_rows
        assert len(case_rows) == 2, case_rows  # every ok film here shows two knees
        for row in case_rows:
            assert case.words in row["message"], row
            assert row["kl_grade"] in "01234" and abs(sum(float(row[f"p{g}"]) for g in range(5)) - 1) < 1e-3
            assert (out / row["crop"]).is_file()
            assert len(Path(row["crop"]).name.encode()) < 120
    else:
        (row,) = case_rows
        assert row["status"] == case.status, row
        assert case.words in row["message"], row
        assert row["kl_grade"] == "" and row["crop"] == ""


@pytest.mark.slow
def test_detect_gives_every_entry_its_row(corpus, detect_result, case_name):
    folder, cases = corpus
    case = next(c for c in cases if c.name == case_name)
    result, out, rows = detect_result
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    case_rows = rows.get(str(folder / case.name))
    assert case_rows, f"{case.name}: no row in joints.csv"
    if case.status == "ok":
        assert [row["status"] for row in case_rows] == ["ok", "ok"], case_rows
        assert all(case.words in row["message"] for row in case_rows), case_rows
        assert all((out / row["crop"]).is_file() for row in case_rows)
    else:
        (row,) = case_rows
        assert (row["status"], case.words in row["message"]) == (case.status, True), row


@pytest.mark.slow
def test_grade_gives_every_entry_its_row(corpus, grade_result, case_name):
    folder, cases = corpus
    case = next(c for c in cases if c.name == case_name)
    result, _, rows = grade_result
    assert result.exit_code == EXIT_FILE_ERRORS, result.output
    row = rows.get(str(folder / case.name))
    assert row, f"{case.name}: no row in grades.csv"
    assert row["status"] == case.grade_status, row
    if case.grade_status == "ok":
        assert row["kl_grade"] in "01234"
    else:
        assert case.words in row["message"] and row["kl_grade"] == "", row


@pytest.mark.slow
def test_the_run_summary_counts_and_names_what_it_skipped(corpus, run_result):
    _, cases = corpus
    result, out, rows = run_result
    summary = json.loads((out / "summary.json").read_text())
    hidden = [c for c in cases if c.status == "skipped" and c.hidden]
    skipped = [c for c in cases if c.status == "skipped" and not c.hidden]
    assert (summary["skipped"], summary["skipped_hidden"]) == (len(skipped), len(hidden))
    assert summary["links_outside_input"] == ["outside_link.png", "passwd.png"]
    assert summary["refused"] == {
        status: sum(c.status == status for c in cases)
        for status in ("error", "no_knee", "lateral_view", "overexposed", "underexposed")
    }
    assert f"skipped: {len(skipped)} entries that are not radiographs, and {len(hidden)} hidden" in result.output
    # Names and messages are printed as written: no markup eaten, no emoji made, no MarkupError.
    assert "b'root:x:0" in result.output and "❌" not in result.output
    assert "bad_data.png" in result.output and "frames_ab.dcm" in result.output
    assert "[/]broken [red]x[/red].png: not a PNG" in " ".join(result.output.split())
    assert "... and 10 more (see results.csv)" in result.output  # 40 refused, the first 30 named
    assert len(rows) == len(cases)


@pytest.mark.slow
def test_crops_never_collide_and_csv_cells_never_run(corpus, run_result):
    _, _, rows = run_result
    crops = [row["crop"] for image_rows in rows.values() for row in image_rows if row["crop"]]
    assert len(crops) == len(set(crops))
    for name in ("a b.png", "a_b.png", "set 1/x.png", "set_1/x.png"):
        assert len(rows[name]) == 2
    text = "\n".join(",".join(row.values()) for image_rows in rows.values() for row in image_rows)
    for formula in ("=cmd()+A1.png", "+SUM(1).png", "-rf.png", "@import.png"):
        assert "'" + formula in text
    for cell in (cell for image_rows in rows.values() for row in image_rows for cell in row.values()):
        assert not cell.startswith(("=", "+", "@")) and not (cell.startswith("-") and not cell[1:2].isdigit())


@pytest.mark.slow
def test_exif_orientation_reads_the_film_upright(corpus, run_result):
    _, _, rows = run_result
    upright = sorted((row["side"], float(row["x1"])) for row in rows["film_jpeg.jpg"])
    for name in ("phone_photo_exif6.jpg", "phone_photo_exif3.jpg"):
        assert sorted(row["side"] for row in rows[name]) == ["L", "R"]
        turned = sorted((row["side"], float(row["x1"])) for row in rows[name])
        assert all(abs(a[1] - b[1]) < 25 for a, b in zip(upright, turned, strict=True)), (name, turned)


# --- exit codes, the same rule for detect, grade and run ------------------------------------------------


@pytest.fixture
def clean_folder(tmp_path, radiographs_dir) -> Path:
    """Films that all get a result: two graded, a foot (no knee), a lateral DICOM, a text file, a hidden file."""
    folder = tmp_path / "clean"
    folder.mkdir()
    film = (radiographs_dir / "bilateral_0.png").read_bytes()
    (folder / "a.png").write_bytes(film)
    (folder / "b.png").write_bytes(film)
    shutil.copy(radiographs_dir / "stage_1_5.jpg", folder / "foot.jpg")
    knees = cv2.imread(str(radiographs_dir / "bilateral_0.png"), cv2.IMREAD_GRAYSCALE)
    save_dicom(make_dicom(knees, "MONOCHROME2", 8, ViewPosition="LL"), folder / "lateral.dcm")
    (folder / "notes.txt").write_text("to do")
    (folder / ".DS_Store").write_bytes(bytes(16))
    return folder


@pytest.mark.slow
def test_findings_exit_0_and_strict_makes_them_fail(clean_folder, tmp_path, loaded_once):
    for strict, code in ((False, EXIT_OK), (True, EXIT_STRICT_REFUSED)):
        flag = ["--strict"] if strict else []
        run = _invoke(["run", str(clean_folder), "--out", str(tmp_path / f"run{strict}"), "--no-progress", *flag])
        assert run.exit_code == code, run.output
        detect = _invoke(["detect", str(clean_folder), "--out", str(tmp_path / f"det{strict}"), "--no-progress", *flag])
        assert detect.exit_code == code, detect.output
    # grade has no findings: a skipped text file is the only thing --strict can fail on.
    graded = _invoke(["grade", str(clean_folder), "--out", str(tmp_path / "g")])
    assert graded.exit_code == EXIT_OK, graded.output
    strict = _invoke(["grade", str(clean_folder), "--out", str(tmp_path / "g2"), "--strict"])
    assert strict.exit_code == EXIT_STRICT_REFUSED, strict.output
    (clean_folder / "notes.txt").unlink()
    hidden_only = _invoke(["grade", str(clean_folder), "--out", str(tmp_path / "g3"), "--strict"])
    assert hidden_only.exit_code == EXIT_OK, hidden_only.output  # hidden files never fail a batch


@pytest.mark.slow
def test_a_crash_has_its_own_exit_code(clean_folder, tmp_path, loaded_once, monkeypatch, capsys):
    from kneepipe.pipeline import run as run_module

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in finish_run")

    monkeypatch.setattr(run_module, "finish_run", broken)
    with pytest.raises(SystemExit) as exited:
        app(["run", str(clean_folder), "--out", str(tmp_path / "out"), "--no-progress"])
    assert exited.value.code == EXIT_CRASH
    err = capsys.readouterr().err
    assert "RuntimeError: a bug in finish_run" in err and "kneepipe crashed" in err


def test_exit_codes_are_one_table_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for code, words in (
        (EXIT_OK, "every file got a result"),
        (EXIT_FAILED, "could not run"),
        (EXIT_CONFIG, "bad configuration"),
        (EXIT_FILE_ERRORS, "could not be read or processed"),
        (EXIT_STRICT_REFUSED, "--strict"),
        (EXIT_CRASH, "crashed"),
    ):
        assert any(line.startswith(f"| {code} |") and words in line for line in readme.splitlines()), code


# --- output folders: only what kneepipe wrote is removed --------------------------------------------------


@pytest.mark.slow
def test_overwrite_removes_only_what_kneepipe_wrote(clean_folder, tmp_path, loaded_once):
    out = tmp_path / "out"
    first = _invoke(["run", str(clean_folder), "--out", str(out), "--no-progress"])
    assert first.exit_code == EXIT_OK, first.output
    written = sorted(p.name for p in (out / "crops").iterdir())
    assert written == ["a_L.png", "a_R.png", "b_L.png", "b_R.png"]
    (out / "crops" / "my_precious.png").write_bytes(b"the user's own")
    (out / "my_notes.txt").write_text("the user's own")
    (clean_folder / "b.png").unlink()
    other = _invoke(["run", str(clean_folder), "--out", str(out), "--no-progress"])
    assert other.exit_code == EXIT_CONFIG and "--overwrite" in other.output
    again = _invoke(["run", str(clean_folder), "--out", str(out), "--no-progress", "--overwrite"])
    assert again.exit_code == EXIT_OK, again.output
    assert sorted(p.name for p in (out / "crops").iterdir()) == ["a_L.png", "a_R.png", "my_precious.png"]
    assert (out / "my_notes.txt").read_text() == "the user's own"

    users = tmp_path / "users_folder"
    users.mkdir()
    (users / "thesis.docx").write_bytes(b"years of work")
    refused = _invoke(["run", str(clean_folder), "--out", str(users), "--no-progress"])
    assert refused.exit_code == EXIT_CONFIG and "not a kneepipe run (thesis.docx)" in refused.output
    assert sorted(p.name for p in users.iterdir()) == ["thesis.docx"]


# --- resume after a kill, with a file that errors ------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_run_with_a_bad_file_resumes_without_redoing_it(tmp_path, radiographs_dir, models):
    from kneepipe.config import load_config
    from kneepipe.detect.config import DetectConfig
    from kneepipe.grade.config import GradeConfig
    from kneepipe.pipeline.config import PipelineConfig
    from kneepipe.pipeline.run import run_pipeline
    from kneepipe.pipeline.state import read_journal

    folder = tmp_path / "films"
    folder.mkdir()
    film = (radiographs_dir / "bilateral_0.png").read_bytes()
    for name in ("a.png", "c.png", "d.png", "e.png"):
        (folder / name).write_bytes(film)
    (folder / "b_broken.dcm").write_bytes(b"not a dicom " * 30)  # errors, in the first step
    configs = (load_config(PipelineConfig, overrides={"batch": 2}), load_config(DetectConfig), load_config(GradeConfig))
    detector, grader = models

    class Killed(Exception):
        pass

    def kill_after_two(done, total):
        if done >= 2:
            raise Killed

    out = tmp_path / "out"
    with pytest.raises(Killed):
        run_pipeline(folder, out, *configs, progress=kill_after_two, detector=detector, grader=grader)
    journal = read_journal(out / "journal.jsonl")
    assert sorted(journal) == ["a.png", "b_broken.dcm"] and journal["b_broken.dcm"]["status"] == "error"
    seen = []
    resumed = run_pipeline(
        folder, out, *configs, progress=lambda done, total: seen.append(done), detector=detector, grader=grader
    )
    assert (resumed.resumed, resumed.processed) == (2, 3) and seen[0] == 2 and seen[-1] == 5
    rows = _read_csv(out / "results.csv")
    assert [(r["image"], r["status"]) for r in rows if r["image"] == "b_broken.dcm"] == [("b_broken.dcm", "error")]
    assert sorted({r["image"] for r in rows}) == ["a.png", "b_broken.dcm", "c.png", "d.png", "e.png"]
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 5  # nothing processed twice, the bad file included


# --- labels and config messages, before any model loads --------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"image;side;kl_grade\na.png;R;2\n", None),  # semicolons: read as such
        (b" image , side , kl_grade \na.png, R ,2.0\n", None),  # spaces and 2.0: accepted
        (b"image,side,kl_grade\n\xe9t\xe9.png,R,2\n", ":2: not UTF-8 text (byte 0xe9)"),
        (b"image,side,kl_grade\na.png,R,2.5\n", ":2: kl_grade must be 0-4"),
        (
            b"image,side,kl_grade,x1,y1,x2,y2\na.png,R,1,0,0,10,10\na.png,R,2,0,0,10,10\n",
            ":3: a.png side R is labelled twice with different grades (KL2 here, KL1 on line 2)",
        ),
        (b"image,side,kl_grade,x1,y1,x2,y2\na.png,R,1,10,0,0,10\n", ":2: the box is inverted"),
        (b"image,side,kl_grade,x1,y1,x2,y2\na.png,R,1,0,0,nan,10\n", ":2: the box x1,y1,x2,y2 must be finite"),
        (b"image,side,kl_grade\na.png,R\n", ":2: 2 fields, but the header has 3"),
    ],
    ids=["semicolon", "spaces-and-2.0", "latin-1", "grade-2.5", "duplicate-knee", "inverted-box", "nan-box", "short"],
)
def test_labels_errors_name_the_file_and_line_before_models_load(tmp_path, monkeypatch, content, expected):
    from kneepipe.pipeline import run as run_module
    from kneepipe.pipeline.evaluate import LabelledKnee, read_labels

    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    if expected is None:
        assert read_labels(labels) == [LabelledKnee("a.png", "R", 2)]
        return

    def no_models(*args, **kwargs):
        raise AssertionError("the models were loaded before the labels were checked")

    monkeypatch.setattr(run_module, "load_models", no_models)
    (tmp_path / "in").mkdir()
    result = _invoke(["run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--labels", str(labels)])
    assert result.exit_code == EXIT_FAILED, result.output
    assert f"{labels}{expected}" in " ".join(result.output.split()).replace(f"{labels} ", str(labels))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["detect.conf=.nan"], "detect.conf: nan is not a finite number"),
        (["detect.conf=.inf"], "detect.conf: inf is not a finite number"),
        (["grade.adapt_prior_alpha=.nan"], "grade.adapt_prior_alpha: nan is not a finite number"),
        (["match_iou=-.inf"], "match_iou: -inf is not a finite number"),
        (["detect.conf"], "override 'detect.conf' is not of the form detect.key=value"),
        (["detect.cnf=0.3"], "unknown key 'detect.cnf'"),
        (["detect.conf=2"], "detect.conf: 2.0 is out of range"),
    ],
)
def test_config_refuses_nan_and_keeps_the_stage_prefix(tmp_path, overrides, expected):
    (tmp_path / "in").mkdir()
    result = _invoke(["run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *overrides])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert expected in " ".join(result.output.split()), result.output


# --- memory and the terminal --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_film_at_the_pixel_budget_decodes_in_little_memory(tmp_path):
    from kneepipe.imaging import MAX_PIXELS

    width, height = 10000, MAX_PIXELS // 10000  # 16-bit, at the budget: decoded, shrunk, windowed
    ramp = (np.arange(width, dtype=np.uint32) * 6 % 65536).astype(np.uint16)
    film = np.broadcast_to(ramp[None, :], (height, width))
    cv2.imwrite(str(tmp_path / "big.png"), np.ascontiguousarray(film), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    del film
    script = f"""
import resource
from kneepipe.imaging import read_radiograph
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
radiograph = read_radiograph({str(tmp_path / "big.png")!r})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(radiograph.pixels.shape, radiograph.original_size, (after - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"({round(4096 * height / width)}, 4096) ({width}, {height})" in done.stdout, done.stdout
    extra_mb = int(done.stdout.split()[-1])
    assert extra_mb < 2 * 2 * MAX_PIXELS / 2**20, f"decoding a film at the budget took {extra_mb} MB more"


@pytest.mark.slow
def test_framework_start_up_noise_stays_off_the_terminal(tmp_path, oai_dir):
    crops = tmp_path / "crops"
    crops.mkdir()
    shutil.copy(next((oai_dir / "val" / "2").glob("*.png")), crops / "knee.png")
    (crops / "notes.txt").write_text("x")
    command = [str(Path(sys.executable).parent / "kneepipe"), "grade", str(crops), "--out", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    for noise in ("oneDNN", "cuda", "cuInit", "absl", "WARNING: All log messages"):
        assert noise not in done.stderr, done.stderr
    assert "graded 1 crops" in done.stderr and "1 entries skipped (0 hidden)" in done.stderr


def test_kneepipe_warnings_while_models_load_reach_the_terminal_and_native_noise_does_not(capfd):
    import logging

    from kneepipe.runtime import native_logs_hidden, set_verbosity

    set_verbosity(False)
    handlers = list(logging.getLogger("kneepipe").handlers)
    with native_logs_hidden():
        os.write(2, b"oneDNN custom operations are on\n")
        logging.getLogger("kneepipe.detect.predict").warning("detect.runtime openvino-int8: no INT8 network")
        logging.getLogger("kneepipe.detect.predict").info("an aside")
    err = capfd.readouterr().err
    assert "warning: detect.runtime openvino-int8: no INT8 network" in err
    assert "oneDNN" not in err and "an aside" not in err
    assert logging.getLogger("kneepipe").handlers == handlers  # outside the block, warnings go where they went


@pytest.mark.slow
def test_an_output_that_cannot_be_written_fails_cleanly(clean_folder, tmp_path, loaded_once):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    for command in (
        ["run", str(clean_folder), "--out", str(blocked), "--no-progress"],
        ["detect", str(clean_folder), "--out", str(blocked), "--no-progress"],
        ["grade", str(clean_folder), "--out", str(blocked)],
    ):
        result = _invoke(command)
        assert result.exit_code == EXIT_FAILED, (command[0], result.output)
        assert "cannot write" in result.output and "a_file" in result.output, result.output
