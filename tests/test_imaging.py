"""Reading radiographs: the real shared images, files written here from real pixels, bad input."""

import io
import pickle
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_files import make_dicom, save_dicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from kneepipe.imaging import ImageReadError, Radiograph, area_resize, find_images, list_inputs, read_radiograph
from kneepipe.pipeline.outputs import thumbnail_jpeg


@pytest.fixture(scope="module")
def knee_gray(radiographs_dir: Path) -> np.ndarray:
    """A real bilateral radiograph (bone bright), 456x571 uint8, read independently of kneepipe."""
    rgba = cv2.imread(str(radiographs_dir / "bilateral_0.png"), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (456, 571, 4) and (rgba[..., 3] == 255).all()
    return cv2.cvtColor(rgba, cv2.COLOR_BGRA2GRAY)


@pytest.fixture(scope="module")
def crop(oai_dir: Path) -> np.ndarray:
    """A real 224x224 OAI knee crop."""
    return cv2.imread(str(sorted((oai_dir / "val" / "3").glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def write_image(path: Path, pixels: np.ndarray) -> Path:
    ok, encoded = cv2.imencode(path.suffix, pixels)
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


# --- the real shared radiographs -------------------------------------------------------------


def test_reads_every_shared_radiograph_at_its_header_size(radiographs_dir):
    paths = find_images(radiographs_dir)
    assert len(paths) == 27
    for path in paths:
        radiograph = read_radiograph(path, max_side=5000)
        with Image.open(path) as header:
            width, height = header.size
        assert radiograph.original_size == (width, height), path.name
        assert radiograph.pixels.shape == (height, width), path.name
        assert radiograph.pixels.dtype == np.uint8
        assert radiograph.scale == 1.0
        assert radiograph.bit_depth == 8
        assert radiograph.pixels.std() > 10, f"{path.name} read as a nearly flat image"
        assert radiograph.path == path


def test_rgba_png_becomes_gray(radiographs_dir, knee_gray):
    radiograph = read_radiograph(radiographs_dir / "bilateral_0.png")
    assert radiograph.pixels.shape == (456, 571)
    assert radiograph.pixels.dtype == np.uint8
    # Its alpha is opaque everywhere, so the result is the plain gray conversion of its colours.
    assert np.array_equal(radiograph.pixels, knee_gray)


def test_large_radiograph_is_shrunk_to_max_side(radiographs_dir):
    radiograph = read_radiograph(radiographs_dir / "stage_1_0.jpg", max_side=1024)
    assert radiograph.original_size == (4330, 3548)
    assert max(radiograph.pixels.shape) == 1024
    assert radiograph.scale == pytest.approx(1024 / 4330)
    assert radiograph.pixels.shape == (round(3548 * 1024 / 4330), 1024)
    default = read_radiograph(radiographs_dir / "stage_1_0.jpg")
    assert default.pixels.shape[1] == 4096


# --- PNG / JPEG / TIFF written from real pixels -----------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif", ".TIFF", ".PNG"])
def test_8bit_gray_round_trips_exactly(tmp_path, crop, suffix):
    radiograph = read_radiograph(write_image(tmp_path / f"knee{suffix}", crop))
    assert np.array_equal(radiograph.pixels, crop)
    assert radiograph.original_size == (224, 224)
    assert radiograph.bit_depth == 8


def test_jpeg_gray_is_read_close_to_source(tmp_path, crop):
    radiograph = read_radiograph(write_image(tmp_path / "knee.jpg", crop))
    assert np.abs(radiograph.pixels.astype(int) - crop).mean() < 3


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_uses_a_percentile_window_not_a_divide(tmp_path, crop, suffix):
    # 12 bits of real content sitting high in a 16-bit container, as detectors store it.
    values = crop.astype(np.uint16) * 16 + 20000
    radiograph = read_radiograph(write_image(tmp_path / f"knee16{suffix}", values))
    assert radiograph.bit_depth == 16
    assert np.ptp(values // 256) < 20  # what a naive divide would have kept
    assert radiograph.pixels.min() <= 3 and radiograph.pixels.max() >= 252
    assert correlation(radiograph.pixels, crop) > 0.99


def test_float_tiff_is_windowed(tmp_path, crop):
    values = crop.astype(np.float32) / 255.0 * 0.3 + 0.5
    radiograph = read_radiograph(write_image(tmp_path / "kneef.tiff", values))
    assert radiograph.bit_depth == 32
    assert radiograph.pixels.min() <= 3 and radiograph.pixels.max() >= 252
    assert correlation(radiograph.pixels, crop) > 0.99


def test_rgb_and_16bit_rgb_become_gray(tmp_path, crop):
    tinted = np.dstack([crop, crop // 2 + 60, crop]).astype(np.uint8)
    radiograph = read_radiograph(write_image(tmp_path / "tinted.png", tinted))
    assert np.array_equal(radiograph.pixels, cv2.cvtColor(tinted, cv2.COLOR_BGR2GRAY))
    rgb16 = read_radiograph(write_image(tmp_path / "rgb16.png", tinted.astype(np.uint16) * 200))
    assert rgb16.pixels.ndim == 2 and rgb16.pixels.dtype == np.uint8 and rgb16.bit_depth == 16
    assert correlation(rgb16.pixels, crop) > 0.99


def test_rgba_alpha_is_composited_over_black(tmp_path, crop):
    alpha = np.full(crop.shape, 255, np.uint8)
    alpha[:, 112:] = 0
    alpha[:50, :50] = 128
    rgba = np.dstack([crop, crop, crop, alpha])
    pixels = read_radiograph(write_image(tmp_path / "rgba.png", rgba)).pixels
    assert np.array_equal(pixels[50:, 50:112], crop[50:, 50:112])
    assert not pixels[:, 112:].any()
    expected_half = np.round(crop[:50, :50] * (128 / 255))
    assert np.abs(pixels[:50, :50] - expected_half).max() <= 1


def test_format_comes_from_content_and_odd_paths_work(tmp_path, crop):
    odd = tmp_path / "knee scans #1" / "Röntgen knie (links).jpg"
    odd.parent.mkdir()
    write_image(tmp_path / "real.png", crop)
    odd.write_bytes((tmp_path / "real.png").read_bytes())  # a PNG with a .jpg name
    assert np.array_equal(read_radiograph(odd).pixels, crop)


# --- DICOM written from real pixels ------------------------------------------------------------


def test_dicom_rescale_spacing_laterality_view(tmp_path, knee_gray):
    # A negative slope: ignoring the rescale would read the film inverted.
    stored = (4095 - knee_gray.astype(np.uint16) * 16).astype(np.uint16)
    dataset = make_dicom(
        stored,
        "MONOCHROME2",
        12,
        RescaleSlope=-1,
        RescaleIntercept=4095,
        PixelSpacing=[0.143, 0.15],
        ImageLaterality="R",
        ViewPosition="PA",
    )
    radiograph = read_radiograph(save_dicom(dataset, tmp_path / "knee.dcm"))
    assert radiograph.pixels.shape == knee_gray.shape and radiograph.pixels.dtype == np.uint8
    assert correlation(radiograph.pixels, knee_gray) > 0.99
    assert radiograph.pixels.min() <= 3 and radiograph.pixels.max() >= 252
    assert radiograph.bit_depth == 12
    assert radiograph.pixel_spacing_mm == (0.143, 0.15)
    assert radiograph.laterality == "R"
    assert radiograph.view == "PA"
    assert radiograph.original_size == (571, 456)


def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path, knee_gray):
    stored = ((255 - knee_gray.astype(np.uint16)) * 16).astype(np.uint16)  # bone dark
    pixels = read_radiograph(save_dicom(make_dicom(stored, "MONOCHROME1", 12), tmp_path / "m1.dcm"))
    bone = knee_gray >= np.percentile(knee_gray, 95)
    background = knee_gray <= np.percentile(knee_gray, 5)
    assert pixels.pixels[bone].mean() > pixels.pixels[background].mean() + 150
    assert correlation(pixels.pixels, knee_gray) > 0.99


def test_dicom_window_is_applied(tmp_path, knee_gray):
    stored = knee_gray.astype(np.uint16) * 16
    dataset = make_dicom(stored, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=1024)
    pixels = read_radiograph(save_dicom(dataset, tmp_path / "window.dcm")).pixels
    below, above = stored <= 1536, stored > 2559  # the LINEAR window's edges (PS3.3 C.11.2)
    assert below.sum() > 1000 and above.sum() > 1000
    assert not pixels[below].any()
    assert (pixels[above] == 255).all()
    assert abs(int(pixels[stored == 2048].mean()) - 128) <= 1


def test_dicom_voi_lut_sequence_is_applied(tmp_path, knee_gray):
    stored = knee_gray.astype(np.uint16) * 16
    lut = np.clip((np.arange(4096) - 1024) * 2, 0, 4095)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    dataset = make_dicom(stored, "MONOCHROME2", 12, VOILUTSequence=[item])
    pixels = read_radiograph(save_dicom(dataset, tmp_path / "lut.dcm")).pixels
    expected = np.round(lut[stored] / 4095 * 255)
    assert np.abs(pixels - expected).max() <= 1


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_lossless_compressed_dicom_reads_like_uncompressed(tmp_path, knee_gray, syntax):
    stored = knee_gray.astype(np.uint16) * 16 + 7
    plain = read_radiograph(save_dicom(make_dicom(stored, "MONOCHROME2", 12), tmp_path / "a.dcm"))
    dataset = make_dicom(stored, "MONOCHROME2", 12)
    dataset.compress(syntax)
    compressed = read_radiograph(save_dicom(dataset, tmp_path / "b.dcm"))
    assert np.array_equal(compressed.pixels, plain.pixels)


def test_jpeg_baseline_dicom(tmp_path, knee_gray):
    ok, encoded = cv2.imencode(".jpg", knee_gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    dataset = make_dicom(knee_gray, "MONOCHROME2", 8, ViewPosition="AP", ImageLaterality="L")
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([encoded.tobytes()])
    dataset["PixelData"].VR = "OB"
    radiograph = read_radiograph(save_dicom(dataset, tmp_path / "jpeg.dcm"))
    assert np.abs(radiograph.pixels.astype(int) - knee_gray).mean() < 2
    assert (radiograph.view, radiograph.laterality, radiograph.bit_depth) == ("AP", "L", 8)


def test_rgb_dicom_becomes_gray(tmp_path, knee_gray):
    rgb = np.dstack([knee_gray] * 3)
    path = save_dicom(make_dicom(rgb, "RGB", 8), tmp_path / "rgb.dcm")
    assert np.array_equal(read_radiograph(path).pixels, knee_gray)


def test_dicom_found_by_marker_or_suffix_alone(tmp_path, knee_gray):
    dataset = make_dicom(knee_gray, "MONOCHROME2", 8)
    marker_only = save_dicom(dataset, tmp_path / "IM0001")  # no suffix, only the DICM marker
    assert np.array_equal(read_radiograph(marker_only).pixels, knee_gray)
    no_preamble = tmp_path / "raw.dcm"
    dataset.save_as(no_preamble, enforce_file_format=False)
    assert no_preamble.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(read_radiograph(no_preamble).pixels, knee_gray)


@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        (
            {"Laterality": "L", "ImagerPixelSpacing": [0.2, 0.2], "ViewPosition": "LL"},
            ((0.2, 0.2), "L", "LL"),
        ),
        ({"ImageLaterality": "B", "PixelSpacing": [0.1, 0.12]}, ((0.1, 0.12), None, None)),
        ({}, (None, None, None)),
    ],
)
def test_dicom_facts_fall_back(tmp_path, knee_gray, elements, expected):
    path = save_dicom(make_dicom(knee_gray, "MONOCHROME2", 8, **elements), tmp_path / "f.dcm")
    radiograph = read_radiograph(path)
    assert (radiograph.pixel_spacing_mm, radiograph.laterality, radiograph.view) == expected


# --- bad input -----------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def jpeg_header_only(width: int, height: int) -> bytes:
    frame = struct.pack(">BHHB3B", 8, height, width, 1, 1, 0x11, 0)
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame + b"\xff\xd9"


def tiff_header_only(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def bad_files(tmp_path: Path, radiographs_dir: Path, crop: np.ndarray, knee_gray: np.ndarray):
    """Yield (kind, path, expected words in the reason)."""
    jpeg = (radiographs_dir / "stage_2_8.jpg").read_bytes()
    png = (radiographs_dir / "bilateral_0.png").read_bytes()
    _, tiff = cv2.imencode(".tif", crop)
    tiff = tiff.tobytes()
    pil_tiff = io.BytesIO()
    Image.fromarray(crop).save(pil_tiff, "TIFF")  # IFD first, then the pixel strips
    pil_tiff = pil_tiff.getvalue()
    stored = knee_gray.astype(np.uint16) * 16
    multi = make_dicom(np.stack([stored, stored]), "MONOCHROME2", 12)
    no_pixels = make_dicom(stored, "MONOCHROME2", 12)
    del no_pixels.PixelData
    huge_dicom = make_dicom(stored, "MONOCHROME2", 12)
    huge_dicom.Rows, huge_dicom.Columns = 50000, 50000
    truncated_dicom = tmp_path / "truncated.dcm"
    save_dicom(make_dicom(stored, "MONOCHROME2", 12), truncated_dicom)
    truncated_dicom.write_bytes(truncated_dicom.read_bytes()[:200_000])
    contents = {
        "empty.png": (b"", "empty file"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "cut_near_end.jpg": (jpeg[:-100], "truncated JPEG"),
        "cut.png": (png[: len(png) // 2], "truncated PNG"),
        "cut.tif": (tiff[: len(tiff) // 2], "truncated image header"),  # its IFD is at the end
        "cut_strips.tif": (pil_tiff[: len(pil_tiff) // 2], "cannot decode the TIFF"),
        "cut_header.png": (png[:20], "truncated image header"),
        "bad_marker.jpg": (b"\xff\xd8\xff\xe0\x00\x04ab" + b"x" * 200, "corrupt image header"),
        "notes.png": (b"patient 9001695, left knee, KL 2\n" * 10, "not a PNG, JPEG, TIFF or DICOM"),
        "dot.png": (cv2.imencode(".png", crop[:1, :1])[1].tobytes(), "too small (1x1"),
        "strip.png": (cv2.imencode(".png", crop[:20, :])[1].tobytes(), "too small (224x20"),
        "huge.png": (png_header_only(50000, 60), "too large (50000x60"),
        "huge.jpg": (jpeg_header_only(30000, 30000), "too large (30000x30000"),
        "huge.tif": (tiff_header_only(60, 45000), "too large (60x45000"),
        "knee.bmp": (cv2.imencode(".bmp", crop)[1].tobytes(), "unsupported file type '.bmp'"),
        "knee": (b"patient 9001695, left knee" * 10, "unsupported file type '(no suffix)'"),
        "notes.dcm": (b"not a dicom file at all " * 20, "not a DICOM file"),
    }
    for name, (data, reason) in contents.items():
        (tmp_path / name).write_bytes(data)
        yield name, tmp_path / name, reason
    yield "multi-frame", save_dicom(multi, tmp_path / "multi.dcm"), "multi-frame DICOM (2 frames)"
    yield "no pixels", save_dicom(no_pixels, tmp_path / "sr.dcm"), "has no pixel data"
    yield "huge dicom", save_dicom(huge_dicom, tmp_path / "huge.dcm"), "too large (50000x50000"
    yield "truncated dicom", truncated_dicom, "DICOM pixel data too short"
    yield "missing", tmp_path / "missing.png", "no such file"
    (tmp_path / "folder.png").mkdir()
    yield "folder", tmp_path / "folder.png", "is a folder"


def test_every_bad_input_names_the_file_and_the_reason(tmp_path, radiographs_dir, crop, knee_gray):
    kinds = 0
    for kind, path, reason in bad_files(tmp_path, radiographs_dir, crop, knee_gray):
        with pytest.raises(ImageReadError) as caught:
            read_radiograph(path)
        error = caught.value
        assert error.path == path, kind
        assert reason in error.reason, f"{kind}: {error.reason}"
        assert str(error) == f"{path}: {error.reason}"
        kinds += 1
    assert kinds == 23


def test_read_error_survives_pickling(tmp_path):
    error = pickle.loads(pickle.dumps(ImageReadError(tmp_path / "a.png", "empty file (0 bytes)")))
    assert (error.path, error.reason) == (tmp_path / "a.png", "empty file (0 bytes)")
    assert str(error) == f"{tmp_path / 'a.png'}: empty file (0 bytes)"


def test_radiograph_rejects_non_gray_pixels(tmp_path):
    with pytest.raises(ValueError, match="2-D uint8"):
        Radiograph(np.zeros((40, 40, 3), np.uint8), tmp_path / "a.png", (40, 40))
    with pytest.raises(ValueError, match="2-D uint8"):
        Radiograph(np.zeros((40, 40), np.uint16), tmp_path / "a.png", (40, 40))


# --- find_images ---------------------------------------------------------------------------------


def test_find_images_walks_a_folder(tmp_path, crop, knee_gray):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    wanted = [
        write_image(tmp_path / "a.PNG", crop),
        write_image(tmp_path / "b" / "c.jpeg", crop),
        write_image(tmp_path / "b" / "deep" / "d.TIF", crop),
        save_dicom(make_dicom(knee_gray, "MONOCHROME2", 8), tmp_path / "b" / "deep" / "IM0001"),
        save_dicom(make_dicom(knee_gray, "MONOCHROME2", 8), tmp_path / "b" / "e.dicom"),
    ]
    write_image(tmp_path / ".hidden.png", crop)
    write_image(tmp_path / ".cache" / "f.png", crop)
    write_image(tmp_path / "g.bmp", crop)
    (tmp_path / "notes.txt").write_text("not an image")
    bmp = tmp_path / "g.bmp"  # an image kneepipe does not read: listed, so reading it says why
    assert find_images(tmp_path) == sorted([*wanted, bmp])
    skipped = {entry.path.name: entry for entry in list_inputs(tmp_path).skipped}
    assert sorted(skipped) == [".cache", ".hidden.png", "notes.txt"]
    assert skipped[".cache"].hidden and "hidden folder" in skipped[".cache"].reason
    assert not skipped["notes.txt"].hidden and "not an image (a .txt file" in skipped["notes.txt"].reason
    assert find_images(wanted[0]) == [wanted[0]]
    assert find_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images(tmp_path / "missing")


def test_presentation_lut_shape_inverse_is_shown_as_a_viewer_shows_it(tmp_path, knee_gray):
    bone_dark = ((255 - knee_gray.astype(np.uint16)) * 16).astype(np.uint16)
    bone = knee_gray >= np.percentile(knee_gray, 95)
    background = knee_gray <= np.percentile(knee_gray, 5)
    cases = {
        "m2_inverse": make_dicom(bone_dark, "MONOCHROME2", 12, PresentationLUTShape="INVERSE"),
        "m1_inverse": make_dicom(bone_dark, "MONOCHROME1", 12, PresentationLUTShape="INVERSE"),  # DX's pairing
    }
    for name, dataset in cases.items():
        radiograph = read_radiograph(save_dicom(dataset, tmp_path / f"{name}.dcm"))
        assert radiograph.pixels[bone].mean() > radiograph.pixels[background].mean() + 150, name
        assert correlation(radiograph.pixels, knee_gray) > 0.99, name
        assert any("INVERSE" in note for note in radiograph.notes) == (name == "m2_inverse")


def test_a_dicom_window_that_cannot_be_applied_is_noted(tmp_path, knee_gray):
    stored = knee_gray.astype(np.uint16) * 16
    dataset = make_dicom(stored, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=0)
    radiograph = read_radiograph(save_dicom(dataset, tmp_path / "zero_width.dcm"))
    assert any("DICOM window could not be applied" in note for note in radiograph.notes), radiograph.notes
    assert correlation(radiograph.pixels, knee_gray) > 0.99  # the percentile window still shows the knee
    plain = read_radiograph(save_dicom(make_dicom(stored, "MONOCHROME2", 12), tmp_path / "plain.dcm"))
    assert plain.notes == ()


@pytest.mark.parametrize("side", [192, 640])
def test_area_resize_of_a_real_film_matches_one_area_resize_within_rounding(radiographs_dir, side):
    """A whole factor first, then the rest (3356 x 4096 to 192: 21 then 1.02; to 640: 6 then 1.07)."""
    film = read_radiograph(radiographs_dir / "stage_1_0.jpg").pixels
    height, width = film.shape
    size = (side, round(height * side / width))
    fast = area_resize(film, size)
    exact = cv2.resize(film, size, interpolation=cv2.INTER_AREA)
    assert fast.shape == exact.shape == (size[1], size[0])
    difference = np.abs(fast.astype(int) - exact)[2:-2, 2:-2]
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 7  # a bilinear shrink: 1.58 and 8 at 192


def test_a_report_thumbnail_is_the_film_shrunk_to_its_size_with_its_scale(radiographs_dir):
    radiograph = read_radiograph(radiographs_dir / "stage_1_0.jpg")
    data, scale = thumbnail_jpeg(radiograph, 640)
    thumbnail = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    width, height = radiograph.original_size
    assert max(thumbnail.shape) == 640 and scale == pytest.approx(thumbnail.shape[1] / width)
    exact = cv2.resize(radiograph.pixels, thumbnail.shape[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(thumbnail.astype(int) - exact).mean() < 2.0  # JPEG at quality 85 and the two-step shrink
