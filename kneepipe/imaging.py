"""Read any knee radiograph (PNG, JPEG, TIFF or DICOM) into the one array type every stage uses.

Every later stage sees a :class:`Radiograph`: 2-D ``uint8`` grayscale pixels with the facts
a later stage needs (source file, stored size, downscale factor, pixel spacing, laterality,
view, bit depth). A file that cannot be read raises :class:`ImageReadError` naming the file
and the reason, so a batch can report it and go on with the rest.

Why the conversions are what they are:

* 16-bit and float images reach 8 bits through a window (the DICOM VOI LUT or window when
  the file has one, else a robust 0.5-99.5 percentile window), never through a divide by
  256, which throws away most of a radiograph's contrast.
* MONOCHROME1 DICOMs store bone dark; they are inverted so bone is bright everywhere.
* The size is read from the file header before any pixel is decoded, so an absurd image is
  refused without decoding it; images longer than ``max_side`` are shrunk with area
  interpolation and :attr:`Radiograph.scale` records by how much.
* The format is told by the file's content, not its suffix (DICOMs often have none).
* Pixels are kept as stored: a JPEG's EXIF orientation tag is not applied, so boxes found
  on the pixels map straight back onto the file.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np

if TYPE_CHECKING:  # pydicom loads when a DICOM is read, not with the package
    import pydicom

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUPPORTED_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES

MIN_SIDE = 32  # px; nothing smaller can show a knee joint
MAX_SIDE_LIMIT = 40_000  # px; refused from the header, before decoding
MAX_PIXELS = 400_000_000
PERCENTILE_WINDOW = (0.5, 99.5)  # % of pixels clipped at each end for windowless images

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# JPEG start-of-frame markers carry the image size (C4, C8 and CC are other segments).
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageReadError(Exception):
    """A file that cannot become a :class:`Radiograph`; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keeps the error intact across process pools
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class Radiograph:
    """One radiograph as every stage sees it.

    Attributes:
        pixels: 2-D ``uint8`` grayscale, bone bright.
        path: the file it was read from.
        original_size: ``(width, height)`` as stored in the file.
        scale: ``pixels`` size / original size; below 1 when a large image was shrunk
            on reading (source pixel = pixel / scale).
        pixel_spacing_mm: ``(row, column)`` spacing of the source pixels in mm, in DICOM's
            order, when the file states it.
        laterality: ``"R"`` or ``"L"`` when the file states it.
        view: the view position (``"AP"``, ``"PA"``, ``"LAT"``, ...) when the file states it.
        bit_depth: bits per sample as stored (DICOM *Bits Stored*).
    """

    pixels: np.ndarray = field(repr=False)
    path: Path
    original_size: tuple[int, int]
    scale: float = 1.0
    pixel_spacing_mm: tuple[float, float] | None = None
    laterality: Literal["R", "L"] | None = None
    view: str | None = None
    bit_depth: int = 8

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.dtype != np.uint8:
            got = f"{self.pixels.dtype} {self.pixels.shape}"
            raise ValueError(f"Radiograph pixels must be 2-D uint8, got {got}")


def read_radiograph(path: str | os.PathLike, max_side: int = 4096) -> Radiograph:
    """Read a PNG, JPEG, TIFF or DICOM radiograph as 2-D ``uint8`` grayscale.

    Args:
        path: the image file; DICOMs are recognised by suffix or by their ``DICM`` marker.
        max_side: longest side of the returned pixels; larger images are shrunk.

    Raises:
        ImageReadError: the file is missing, empty, truncated, not a supported image,
            too small or too large, multi-frame, or has no pixel data.

    >>> radiograph = read_radiograph("knee.dcm")  # doctest: +SKIP
    >>> radiograph.pixels.dtype, radiograph.laterality
    (dtype('uint8'), 'R')
    """
    if max_side < MIN_SIDE:
        raise ValueError(f"max_side must be at least {MIN_SIDE}, got {max_side}")
    path = Path(path)
    data = _read_file(path)
    facts: dict = {}
    if _is_dicom(path, data):
        gray, bit_depth, facts = _decode_dicom(path, data)
    else:
        gray, bit_depth = _decode_raster(path, data)
    height, width = gray.shape
    scale = 1.0
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = cv2.resize(gray, new_size, interpolation=cv2.INTER_AREA)
    return Radiograph(
        pixels=np.ascontiguousarray(gray),
        path=path,
        original_size=(width, height),
        scale=scale,
        bit_depth=bit_depth,
        **facts,
    )


def find_images(root: str | os.PathLike) -> list[Path]:
    """List the radiographs to read: ``root`` itself if a file, else every image under it.

    A folder is searched recursively for the supported suffixes (any case) and for files
    of another or no suffix that carry the DICOM ``DICM`` marker; hidden files and folders
    are skipped. A single file is returned as is, so reading it reports what is wrong.

    Raises:
        FileNotFoundError: ``root`` does not exist.

    >>> find_images("radiographs/")  # doctest: +SKIP
    [PosixPath('radiographs/a.png'), PosixPath('radiographs/series/IM0001')]
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            candidate = Path(folder) / name
            if name.startswith(".") or not candidate.is_file():
                continue
            if candidate.suffix.lower() in SUPPORTED_SUFFIXES or _has_dicom_marker(candidate):
                found.append(candidate)
    return sorted(found)


def _read_file(path: Path) -> bytes:
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if not path.exists():
        raise ImageReadError(path, "no such file")
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
            if not head:
                raise ImageReadError(path, "empty file (0 bytes)")
            suffix = path.suffix.lower()
            if not _is_dicom(path, head) and suffix not in RASTER_SUFFIXES:
                raise ImageReadError(
                    path,
                    f"unsupported file type '{suffix or '(no suffix)'}' "
                    f"(supported: {' '.join(SUPPORTED_SUFFIXES)}, or a DICOM 'DICM' marker)",
                )
            return head + handle.read()
    except OSError as err:
        raise ImageReadError(path, f"cannot read the file ({err.strerror or err})") from err


def _is_dicom(path: Path, data: bytes) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM"


def _has_dicom_marker(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _check_size(path: Path, width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        reason = f"image too small ({width}x{height} px; need at least {MIN_SIDE} px a side)"
        raise ImageReadError(path, reason)
    if max(width, height) > MAX_SIDE_LIMIT or width * height > MAX_PIXELS:
        raise ImageReadError(
            path,
            f"image too large ({width}x{height} px; refusing more than {MAX_SIDE_LIMIT} px "
            f"a side or {MAX_PIXELS // 1_000_000} megapixels)",
        )


def _decode_raster(path: Path, data: bytes) -> tuple[np.ndarray, int]:
    """PNG/JPEG/TIFF bytes -> (2-D uint8, stored bit depth), size checked from the header."""
    kind, width, height = _raster_header(path, data)
    _check_size(path, width, height)
    # Some decoders return a partly grey image for a cut-off file; the end markers don't lie.
    if kind == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker after the image data)")
    if kind == "PNG" and data.rfind(b"IEND") == -1:
        raise ImageReadError(path, "truncated PNG (no IEND chunk)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(path, f"cannot decode the {kind} data (truncated or corrupt)")
    if image.shape[:2] != (height, width):
        raise ImageReadError(
            path,
            f"decoded as {image.shape[1]}x{image.shape[0]}, header says {width}x{height}",
        )
    bit_depth = image.dtype.itemsize * 8
    gray = _to_gray(path, image)
    if gray.dtype != np.uint8:
        gray = _percentile_window(gray)
    return gray, bit_depth


def _raster_header(path: Path, data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the first bytes, without decoding any pixel."""
    try:
        if data.startswith(_PNG_SIGNATURE):
            if data[12:16] != b"IHDR":
                raise ValueError("first chunk is not IHDR")
            return ("PNG", *struct.unpack_from(">II", data, 16))
        if data.startswith(b"\xff\xd8\xff"):
            return ("JPEG", *_jpeg_size(data))
        if data[:4] in _TIFF_SIGNATURES:
            return ("TIFF", *_tiff_size(data))
    except struct.error:
        raise ImageReadError(path, "truncated image header (the file ends inside it)") from None
    except ValueError as err:
        raise ImageReadError(path, f"corrupt image header ({err})") from None
    start = repr(data[:8])
    raise ImageReadError(path, f"not a PNG, JPEG, TIFF or DICOM image (file starts with {start})")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {offset}")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
        elif marker in _JPEG_SOF_MARKERS:
            height, width = struct.unpack_from(">HH", data, offset + 5)
            return width, height
        elif marker == 0xDA:  # image data starts: no frame header came before it
            break
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
        else:
            offset += 2 + struct.unpack_from(">H", data, offset + 2)[0]
    raise ValueError("no JPEG frame header")


def _tiff_size(data: bytes) -> tuple[int, int]:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte offsets and counts
    ifd, count_format, entry_size, value_at = (
        (struct.unpack_from(order + "Q", data, 8)[0], "Q", 20, 12)
        if big
        else (struct.unpack_from(order + "I", data, 4)[0], "H", 12, 8)
    )
    count = struct.unpack_from(order + count_format, data, ifd)[0]
    first_entry = ifd + struct.calcsize(count_format)
    sizes = {}
    for index in range(count):
        entry = first_entry + index * entry_size
        tag, value_type = struct.unpack_from(order + "HH", data, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength
            value_format = {3: "H", 4: "I", 16: "Q"}.get(value_type)
            if value_format is None:
                raise ValueError(f"TIFF tag {tag} has unexpected type {value_type}")
            sizes[tag] = struct.unpack_from(order + value_format, data, entry + value_at)[0]
    if len(sizes) < 2:
        raise ValueError("TIFF has no image width and length")
    return sizes[256], sizes[257]


def _to_gray(path: Path, image: np.ndarray) -> np.ndarray:
    """OpenCV's BGR(A) or gray(+alpha) -> one gray channel; alpha composited over black."""
    if image.dtype not in (np.uint8, np.uint16, np.float32):
        image = image.astype(np.float32)
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    alpha = None
    if channels == 1:
        gray = image[..., 0]
    elif channels == 2:
        gray, alpha = image[..., 0], image[..., 1]
    elif channels == 3:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif channels == 4:
        gray, alpha = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY), image[..., 3]
    else:
        raise ImageReadError(path, f"unsupported image with {channels} channels")
    if alpha is None:
        return gray
    # Transparent means no film there: black, like the background of a radiograph.
    opaque = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(alpha.dtype, 1.0)
    composited = gray.astype(np.float32) * (alpha.astype(np.float32) / opaque)
    return composited.round().astype(np.uint8) if gray.dtype == np.uint8 else composited


def _percentile_window(values: np.ndarray) -> np.ndarray:
    """Window high-depth pixels to 8 bits between robust percentiles of their values."""
    step = max(1, int(np.sqrt(values.size / 1_000_000)))  # ~1 M samples are plenty
    sample = values[::step, ::step].astype(np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = np.percentile(sample, PERCENTILE_WINDOW)
    if high <= low:  # mostly flat: fall back to the full range
        low, high = sample.min(), sample.max()
    return _scale_to_uint8(values, low, high)


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def _decode_dicom(path: Path, data: bytes) -> tuple[np.ndarray, int, dict]:
    """DICOM bytes -> (2-D uint8, bits stored, Radiograph facts), following PS3.4 N.2."""
    import pydicom

    has_marker = data[128:132] == b"DICM"
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=not has_marker)
    except Exception as err:  # pydicom raises many kinds for a damaged file
        raise ImageReadError(path, f"not a readable DICOM file ({err})") from err
    if "PixelData" not in dataset:
        if not has_marker:
            raise ImageReadError(path, "not a DICOM file (no 'DICM' marker and no pixel data)")
        raise ImageReadError(path, "DICOM file has no pixel data (not an image object)")
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        reason = f"multi-frame DICOM ({frames} frames) is not supported; export one frame"
        raise ImageReadError(path, reason)
    _check_size(path, int(dataset.get("Columns") or 0), int(dataset.get("Rows") or 0))
    try:
        stored = dataset.pixel_array
    except Exception as err:  # missing decoder, truncated or corrupt data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ImageReadError(path, f"cannot decode the DICOM pixel data ({name}: {err})") from err

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _dicom_window(stored, dataset)
        if photometric == "MONOCHROME1":  # stored with bone dark
            gray = 255 - gray
    elif stored.ndim == 3 and stored.shape[2] == 3:  # RGB, or YBR that pydicom made RGB
        gray = cv2.cvtColor(stored, cv2.COLOR_RGB2GRAY)
        if gray.dtype != np.uint8:
            gray = _percentile_window(gray)
    else:
        raise ImageReadError(path, f"unsupported DICOM photometric interpretation {photometric}")
    bit_depth = int(dataset.get("BitsStored") or stored.dtype.itemsize * 8)
    return gray, bit_depth, _dicom_facts(dataset)


def _dicom_window(stored: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    """Modality LUT/rescale, then the file's VOI LUT or window, else a percentile window."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(stored, dataset)
    has_lut = bool(dataset.get("VOILUTSequence"))
    if has_lut or ("WindowCenter" in dataset and "WindowWidth" in dataset):
        if has_lut and values.dtype.kind == "f":  # a LUT is indexed by whole numbers
            values = np.rint(values).astype(np.int64)
        try:
            windowed = apply_voi_lut(values, dataset)
            low, high = _voi_output_range(dataset)
        except (ValueError, NotImplementedError, AttributeError, TypeError, IndexError):
            pass  # an unusable window: the percentile window still gives a sound image
        else:
            if high > low:
                return _scale_to_uint8(windowed, low, high)
    if values.dtype == np.uint8:  # 8-bit values without a window are display values already
        return values
    return _percentile_window(values)


def _voi_output_range(dataset: pydicom.Dataset) -> tuple[float, float]:
    """The lowest and highest value the file's VOI LUT or window can output."""
    from pydicom.pixels import apply_voi_lut

    if dataset.get("VOILUTSequence"):
        entries, first_mapped = dataset.VOILUTSequence[0].LUTDescriptor[:2]
        probe = np.arange(first_mapped, first_mapped + (entries or 65536), dtype=np.int64)
    else:  # far below and above any window: the window's own floor and ceiling
        probe = np.array([-1e12, 1e12])
    with np.errstate(over="ignore"):
        output = apply_voi_lut(probe, dataset)
    return float(output.min()), float(output.max())


def _dicom_facts(dataset: pydicom.Dataset) -> dict:
    facts: dict = {"pixel_spacing_mm": None, "laterality": None, "view": None}
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = dataset.get(keyword)
        try:
            row, column = float(spacing[0]), float(spacing[1])
        except (TypeError, ValueError, IndexError):
            continue
        if row > 0 and column > 0:
            facts["pixel_spacing_mm"] = (row, column)
            break
    for keyword in ("ImageLaterality", "Laterality"):
        side = str(dataset.get(keyword) or "").strip().upper()
        if side in ("R", "L"):
            facts["laterality"] = side
            break
    facts["view"] = str(dataset.get("ViewPosition") or "").strip().upper() or None
    return facts
