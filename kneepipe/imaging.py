"""Read any knee radiograph (PNG, JPEG, TIFF or DICOM) into the one array type every stage uses.

Every later stage sees a :class:`Radiograph`: 2-D ``uint8`` grayscale pixels with the facts
a later stage needs (source file, stored size, downscale factor, pixel spacing, laterality,
view, bit depth, notes). A file that cannot be read raises :class:`ImageReadError` naming
the file and the reason, so a batch can report it and go on with the rest; no other
exception leaves :func:`read_radiograph`, whatever the file holds.

Why the conversions are what they are:

* 16-bit and float images reach 8 bits through a window (the DICOM VOI LUT or window when
  the file has one, else a robust 0.5-99.5 percentile window), never through a divide by
  256, which throws away most of a radiograph's contrast.
* MONOCHROME1 DICOMs store bone dark; they are inverted so bone is bright everywhere.
* The size is read from the file header before any pixel is decoded, so an image over the
  pixel budget (``max_pixels``) is refused without decoding it; images longer than
  ``max_side`` are shrunk with area interpolation before any windowing (which keeps the
  memory a large film costs to about twice its decoded size) and :attr:`Radiograph.scale`
  records by how much.
* The format is told by the file's content, not its suffix (DICOMs often have none, and
  a DICOM may lack its 128-byte preamble).
* A JPEG's or TIFF's EXIF orientation tag is applied, so a film is read the way a viewer
  shows it; boxes are then in the upright image's pixels, and a note says so.
* A JPEG that decodes only partly (libjpeg warns of corrupt or missing data and fills the
  rest with flat grey) is refused, not graded.

:func:`list_inputs` walks a folder and says what it will read and what it skips and why:
hidden entries, files that are no image, links that lead nowhere or to folders, FIFOs and
devices. Links to files are followed (also out of the folder; such files are noted).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

if TYPE_CHECKING:  # pydicom loads when a DICOM is read, not with the package
    import pydicom

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUPPORTED_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES

MIN_SIDE = 32  # px; nothing smaller can show a knee joint
MAX_SIDE_LIMIT = 40_000  # px; refused from the header, before decoding
MAX_PIXELS = 80_000_000  # the default pixel budget (detect.yaml's max_pixels): a 43x43 cm film at 0.05 mm is 74 MP
PERCENTILE_WINDOW = (0.5, 99.5)  # % of pixels clipped at each end for windowless images

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# JPEG start-of-frame markers carry the image size (C4, C8 and CC are other segments).
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Image formats kneepipe recognises but does not read: a clear error beats "not an image".
_OTHER_IMAGE_SIGNATURES = {
    b"BM": "BMP",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"\xffO\xffQ": "JPEG 2000",
    b"%PDF": "PDF",
}
# Two-letter value representations that may follow the first tag of a DICOM without preamble.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
# libjpeg's warnings when it fills a damaged or cut-off scan with flat grey instead of failing.
_JPEG_DAMAGE_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file", "JPEG datastream contains no image")
_STDERR_LOCK = threading.Lock()
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_WORDS = {
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped upside down",
    5: "mirrored and rotated 90°",
    6: "rotated 90°",
    7: "mirrored and rotated 270°",
    8: "rotated 270°",
}


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
        original_size: ``(width, height)`` as stored in the file (upright, after any EXIF
            orientation).
        scale: ``pixels`` size / original size; below 1 when a large image was shrunk
            on reading (source pixel = pixel / scale).
        pixel_spacing_mm: ``(row, column)`` spacing of the source pixels in mm, in DICOM's
            order, when the file states it.
        laterality: ``"R"`` or ``"L"`` when the file states it.
        view: the view position (``"AP"``, ``"PA"``, ``"LAT"``, ...) when the file states it.
        bit_depth: bits per sample as stored (DICOM *Bits Stored*).
        notes: what a reader of the results should know about how the file was read
            (an EXIF orientation applied, only the first page of a multi-page TIFF).
    """

    pixels: np.ndarray = field(repr=False)
    path: Path
    original_size: tuple[int, int]
    scale: float = 1.0
    pixel_spacing_mm: tuple[float, float] | None = None
    laterality: Literal["R", "L"] | None = None
    view: str | None = None
    bit_depth: int = 8
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pixels.ndim != 2 or self.pixels.dtype != np.uint8:
            got = f"{self.pixels.dtype} {self.pixels.shape}"
            raise ValueError(f"Radiograph pixels must be 2-D uint8, got {got}")


def read_radiograph(path: str | os.PathLike, max_side: int = 4096, max_pixels: int = MAX_PIXELS) -> Radiograph:
    """Read a PNG, JPEG, TIFF or DICOM radiograph as 2-D ``uint8`` grayscale.

    Args:
        path: the image file; the format is told by its content (DICOMs with or without
            their preamble and ``DICM`` marker).
        max_side: longest side of the returned pixels; larger images are shrunk.
        max_pixels: the pixel budget: larger images are refused from their header,
            before any pixel is decoded.

    Raises:
        ImageReadError: the file is missing, empty, truncated, only partly decodable, not
            a supported image, too small or over the pixel budget, multi-frame, has no
            pixel data or a damaged header; any other failure of a decoder on the file
            becomes an ``ImageReadError`` too.

    >>> radiograph = read_radiograph("knee.dcm")  # doctest: +SKIP
    >>> radiograph.pixels.dtype, radiograph.laterality  # doctest: +SKIP
    (dtype('uint8'), 'R')
    """
    if max_side < MIN_SIDE:
        raise ValueError(f"max_side must be at least {MIN_SIDE}, got {max_side}")
    path = Path(path)
    try:
        return _read(path, max_side, max_pixels)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(path, "not enough memory to decode this image") from None
    except RecursionError:
        raise ImageReadError(path, "cannot decode: the file's structure nests too deeply (damaged file)") from None
    except Exception as err:  # a decoder failing on a damaged file: that file's problem only
        raise ImageReadError(path, f"cannot decode the file ({type(err).__name__}: {err})") from err


def _read(path: Path, max_side: int, max_pixels: int) -> Radiograph:
    head = _check_file(path, max_pixels)
    facts: dict = {}
    notes: list[str] = []
    if sniff_format(head) == "DICOM" or path.suffix.lower() in DICOM_SUFFIXES:
        gray, size, bit_depth, facts = _decode_dicom(path, head, max_side, max_pixels)
        notes = list(facts.pop("notes", ()))
    else:
        gray, size, bit_depth, notes = _decode_raster(path, _read_bytes(path), max_side, max_pixels)
    width, height = size
    return Radiograph(
        pixels=np.ascontiguousarray(gray),
        path=path,
        original_size=(width, height),
        scale=gray.shape[1] / width,
        bit_depth=bit_depth,
        notes=tuple(notes),
        **facts,
    )


def sniff_format(head: bytes) -> str | None:
    r"""The image format a file's first bytes (at least 132) show, or None.

    ``PNG``, ``JPEG``, ``TIFF`` and ``DICOM`` (with the ``DICM`` marker, or without the
    preamble: a first tag of group 0002 or 0008) are read; ``BMP``, ``GIF``, ``JPEG 2000``
    and ``PDF`` are recognised only to say they are not.

    >>> sniff_format(b"\x89PNG\r\n\x1a\n" + bytes(124))
    'PNG'
    """
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in _TIFF_SIGNATURES:
        return "TIFF"
    if head[128:132] == b"DICM" or _looks_like_bare_dicom(head):
        return "DICOM"
    for signature, kind in _OTHER_IMAGE_SIGNATURES.items():
        if head.startswith(signature):
            return kind
    return None


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM data set without the preamble: its first tag is (0002,xxxx) or (0008,xxxx)."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    element = struct.unpack_from("<H", head, 2)[0]
    if element > 0x0100:
        return False
    if head[4:6] in _DICOM_VRS:  # explicit VR
        return True
    length = struct.unpack_from("<I", head, 4)[0]  # implicit VR: a plausible value length
    return 0 < length < 1024


@dataclass(frozen=True)
class SkippedEntry:
    """An entry under an input folder that is not read, and why (``hidden`` ones are counted apart)."""

    path: Path
    reason: str
    hidden: bool = False


@dataclass
class InputListing:
    """What :func:`list_inputs` found: the files to read, the entries skipped, and notes.

    Attributes:
        files: the files to read, sorted (each gets a result: read, or an error saying why not).
        skipped: every other entry under the folder, with the reason it is not read.
        outside_links: files reached through a link that points out of the input folder.
    """

    files: list[Path] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)
    outside_links: list[Path] = field(default_factory=list)


def list_inputs(root: str | os.PathLike, exclude: tuple[str | os.PathLike, ...] = ()) -> InputListing:
    """Every entry under ``root``: the files to read, and each skipped entry with its reason.

    ``root`` itself, if a file, is returned to be read as is (reading it says what is wrong).
    A folder is searched recursively. Read: files with an image suffix (any case), and files
    of another or no suffix whose content is an image (a DICOM without preamble included).
    Skipped, each with a reason: hidden files and folders (name starting with ``.``; counted
    apart), files that are no image, empty folders, FIFOs, sockets and devices (never
    opened), broken links and link loops, links to folders (not followed, so a walk can
    never loop), and the ``exclude`` folders (a run's own output folder).

    Links to files are followed wherever they point; those pointing out of ``root`` are
    listed in ``outside_links`` so a summary can say so.

    Raises:
        FileNotFoundError: ``root`` does not exist.

    >>> listing = list_inputs("radiographs/")  # doctest: +SKIP
    >>> listing.files, [(entry.path.name, entry.reason) for entry in listing.skipped]  # doctest: +SKIP
    ([PosixPath('radiographs/a.png')], [('notes.txt', 'not an image (a .txt file; ...)')])
    """
    root = Path(root)
    listing = InputListing()
    if root.is_file():
        listing.files.append(root)
        return listing
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    excluded = {_resolved(Path(folder)) for folder in exclude}
    _walk(root, root.resolve(), excluded, listing, set())
    listing.files.sort()
    listing.skipped.sort(key=lambda entry: entry.path)
    return listing


def find_images(root: str | os.PathLike) -> list[Path]:
    """The files :func:`list_inputs` would read under ``root`` (``root`` itself if a file).

    >>> find_images("radiographs/")  # doctest: +SKIP
    [PosixPath('radiographs/a.png'), PosixPath('radiographs/series/IM0001')]
    """
    return list_inputs(root).files


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _walk(folder: Path, real_root: Path, excluded: set[Path], listing: InputListing, seen: set[Path]) -> None:
    real_folder = _resolved(folder)
    if real_folder in seen:  # a bind mount or similar showing a folder twice
        listing.skipped.append(SkippedEntry(folder, "folder already searched under another name"))
        return
    seen.add(real_folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as err:
        listing.skipped.append(SkippedEntry(folder, f"cannot list the folder ({err.strerror or err})"))
        return
    if not entries and folder != Path(real_root) and real_folder != real_root:
        listing.skipped.append(SkippedEntry(folder, "empty folder"))
    for entry in entries:
        path = Path(folder) / entry.name
        if entry.name.startswith("."):
            kind = "folder, not searched" if entry.is_dir(follow_symlinks=False) else "file"
            listing.skipped.append(SkippedEntry(path, f"hidden {kind} (name starts with '.')", hidden=True))
            continue
        if entry.is_dir(follow_symlinks=False):
            if _resolved(path) in excluded:
                listing.skipped.append(SkippedEntry(path, "the run's own output folder"))
            else:
                _walk(path, real_root, excluded, listing, seen)
            continue
        reason = _entry_reason(path, entry.is_symlink())
        if reason:
            listing.skipped.append(SkippedEntry(path, reason))
            continue
        if entry.is_symlink() and not _is_within(_resolved(path), real_root):
            listing.outside_links.append(path)
        if path.suffix.lower() in SUPPORTED_SUFFIXES:
            listing.files.append(path)
            continue
        head = _head(path)
        if isinstance(head, str):
            listing.skipped.append(SkippedEntry(path, head))
        elif sniff_format(head) is not None:
            listing.files.append(path)
        else:
            kind = f"a {path.suffix} file" if path.suffix else "no suffix"
            listing.skipped.append(
                SkippedEntry(path, f"not an image ({kind}; content is not PNG, JPEG, TIFF or DICOM)")
            )


def _entry_reason(path: Path, is_link: bool) -> str | None:
    """Why an entry that is not a folder is skipped without opening it, or None for a regular file."""
    try:
        info = path.stat()  # follows links
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "link loop (following the link leads back to it; it never reaches a file)"
        if is_link and err.errno == errno.ENOENT:
            return f"broken link (its target {os.readlink(path)} does not exist)"
        return f"cannot read the entry ({err.strerror or err})"
    if stat.S_ISREG(info.st_mode):
        return None
    if stat.S_ISDIR(info.st_mode):
        return "link to a folder (links to folders are not followed)"
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(info.st_mode)
        else "a socket"
        if stat.S_ISSOCK(info.st_mode)
        else "a device"
        if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
        else "a special file"
    )
    return f"not a regular file ({'link to ' if is_link else ''}{kind}); not read"


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _head(path: Path) -> bytes | str:
    """The first 132 bytes of a regular file, or why they cannot be read."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)
    except OSError as err:
        return f"cannot read the file ({err.strerror or err})"


def _check_file(path: Path, max_pixels: int) -> bytes:
    """The first 132 bytes of a file that may be an image; anything else is refused with the reason."""
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if not path.exists():
        raise ImageReadError(path, "broken link (its target does not exist)" if path.is_symlink() else "no such file")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file (FIFO, socket or device); not read")
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
            if not head:
                raise ImageReadError(path, "empty file (0 bytes)")
            kind = sniff_format(head)
            suffix = path.suffix.lower()
            if kind in _OTHER_IMAGE_SIGNATURES.values():
                raise ImageReadError(
                    path,
                    f"unsupported file type '{suffix or '(no suffix)'}' (a {kind} image; kneepipe reads PNG, JPEG, "
                    "TIFF and DICOM: convert it to PNG)",
                )
            if kind is None and suffix not in SUPPORTED_SUFFIXES:
                raise ImageReadError(
                    path,
                    f"unsupported file type '{suffix or '(no suffix)'}' "
                    f"(supported: {' '.join(SUPPORTED_SUFFIXES)}, or the content of one of them)",
                )
            # The most data a film within the budget decodes to (16-bit gray), plus room for headers:
            # a larger file is refused before it is read into memory.
            size, limit = os.fstat(handle.fileno()).st_size, 2 * max_pixels + (64 << 20)
            if size > limit:
                raise ImageReadError(
                    path,
                    f"file too large ({size >> 20} MB; the pixel budget allows {limit >> 20} MB): refused before "
                    "reading; raise detect.max_pixels to read it",
                )
            return head
    except OSError as err:
        raise ImageReadError(path, f"cannot read the file ({err.strerror or err})") from err


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ImageReadError(path, f"cannot read the file ({err.strerror or err})") from err


def _check_size(path: Path, width: int, height: int, max_pixels: int = MAX_PIXELS, bytes_per_pixel: int = 1) -> None:
    """Refuse from the header what is too small, over the pixel budget, or too much data to decode.

    Besides ``max_pixels``, the decoded data may be at most that of a 16-bit grayscale film
    at the budget (2 bytes a pixel): a colour or 16-bit colour image of the same size
    would cost its decoder three to four times the memory.
    """
    if width < MIN_SIDE or height < MIN_SIDE:
        reason = f"image too small ({width}x{height} px; need at least {MIN_SIDE} px a side)"
        raise ImageReadError(path, reason)
    if max(width, height) > MAX_SIDE_LIMIT or width * height > max_pixels:
        raise ImageReadError(
            path,
            f"image too large ({width}x{height} px = {width * height / 1e6:.0f} megapixels; over the pixel budget "
            f"of {max_pixels / 1e6:g} megapixels or {MAX_SIDE_LIMIT} px a side; refused before decoding: "
            "raise detect.max_pixels to read it)",
        )
    decoded = width * height * bytes_per_pixel
    if decoded > 2 * max_pixels:
        raise ImageReadError(
            path,
            f"image too large to decode within the memory budget ({width}x{height} px of {bytes_per_pixel} bytes = "
            f"{decoded >> 20} MB decoded; the budget is {(2 * max_pixels) >> 20} MB, a 16-bit grayscale film of "
            f"{max_pixels / 1e6:g} megapixels: save it as grayscale, or raise detect.max_pixels)",
        )


def area_resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` shrunk to ``size`` (width, height) by area averaging, by a whole factor first.

    OpenCV averages by a whole factor on a fast path; by a fractional one, on a film of
    several megapixels, it takes about four times as long. So the film is first averaged
    by the largest whole factor that fits (its last rows and columns, fewer than the
    factor, are left out), then by what remains: the one-step pixels within rounding.

    >>> film = np.arange(60 * 90, dtype=np.uint8).reshape(60, 90)
    >>> area_resize(film, (32, 21)).shape
    (21, 32)
    """
    height, width = pixels.shape[:2]
    step = int(min(width / size[0], height / size[1]))
    if step >= 2:
        pixels = cv2.resize(
            pixels[: height // step * step, : width // step * step],
            (width // step, height // step),
            interpolation=cv2.INTER_AREA,
        )
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def _shrink(values: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink with area interpolation so the longer side is at most ``max_side`` (any dtype OpenCV resizes)."""
    height, width = values.shape[:2]
    if max(height, width) <= max_side:
        return values
    scale = max_side / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if values.dtype not in (np.uint8, np.uint16, np.int16, np.float32):
        values = values.astype(np.float32)
    return cv2.resize(values, new_size, interpolation=cv2.INTER_AREA)


def _decode_raster(path: Path, data: bytes, max_side: int, max_pixels: int) -> tuple[np.ndarray, tuple, int, list]:
    """PNG/JPEG/TIFF bytes -> (2-D uint8, upright size, stored bit depth, notes), size checked from the header."""
    kind, width, height, bytes_per_pixel = _raster_header(path, data)
    _check_size(path, width, height, max_pixels, bytes_per_pixel)
    notes = []
    # Some decoders return a partly grey image for a cut-off file; the end markers don't lie.
    if kind == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker after the image data)")
    if kind == "PNG" and data.rfind(b"IEND") == -1:
        raise ImageReadError(path, "truncated PNG (no IEND chunk)")
    image, printed = _imdecode_watching_stderr(np.frombuffer(data, np.uint8))
    if kind == "JPEG":
        damage = next((line for line in printed.splitlines() if line.startswith(_JPEG_DAMAGE_WARNINGS)), None)
        if damage:
            raise ImageReadError(
                path, f"damaged JPEG, only partly decoded (libjpeg: {damage.strip()}); part of the film would be blank"
            )
    if image is None:
        said = next((line.strip() for line in printed.splitlines() if line.strip()), "")
        raise ImageReadError(path, f"cannot decode the {kind} data (truncated or corrupt{': ' + said if said else ''})")
    if image.shape[:2] != (height, width):
        raise ImageReadError(
            path,
            f"decoded as {image.shape[1]}x{image.shape[0]}, header says {width}x{height}",
        )
    if kind == "TIFF":
        pages = _tiff_pages(data)
        if pages > 1:
            notes.append(f"multi-page TIFF ({pages} pages): only page 1 was read")
    bit_depth = image.dtype.itemsize * 8
    gray = _to_gray(path, image)
    del image
    if kind in ("JPEG", "TIFF"):
        orientation = _exif_orientation(data)
        if orientation in _ORIENTATION_WORDS:
            gray = _orient(gray, orientation)
            notes.append(
                f"EXIF orientation {orientation} applied (stored {_ORIENTATION_WORDS[orientation]}); "
                "boxes are in the upright image's pixels"
            )
    size = (gray.shape[1], gray.shape[0])
    gray = _shrink(gray, max_side)
    if gray.dtype != np.uint8:
        gray = _percentile_window(gray)
    return gray, size, bit_depth, notes


def _imdecode_watching_stderr(buffer: np.ndarray) -> tuple[np.ndarray | None, str]:
    """``cv2.imdecode``, and what the codec libraries printed meanwhile.

    libjpeg does not fail on a damaged scan: it prints a warning on the process's stderr
    and fills the rest of the image with flat grey, and OpenCV returns that image; libpng
    prints why it gave up. The printed line is the only signal, so stderr is captured
    around the decode (one image at a time; anything else written meanwhile is dropped),
    which also keeps these lines off the user's terminal.
    """
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable stderr: decode without watching
            return cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED), ""
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            return image, capture.read(65536).decode("utf-8", "replace")


def _exif_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag (1-8) of a JPEG or TIFF, or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            value = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # no EXIF, or EXIF Pillow cannot parse: read as stored
        return None
    return int(value) if isinstance(value, int) else None


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (2-8) so the image is upright, as viewers (and Pillow's exif_transpose) show it."""
    oriented = {
        2: lambda p: p[:, ::-1],
        3: lambda p: p[::-1, ::-1],
        4: lambda p: p[::-1],
        5: lambda p: p.T,
        6: lambda p: np.rot90(p, -1),  # stored turned 90° counter-clockwise: turn it back clockwise
        7: lambda p: p[::-1, ::-1].T,
        8: lambda p: np.rot90(p, 1),
    }[orientation](pixels)
    return np.ascontiguousarray(oriented)


def _raster_header(path: Path, data: bytes) -> tuple[str, int, int, int]:
    """(format, width, height, bytes a decoded pixel takes) from the header, without decoding any pixel."""
    try:
        if data.startswith(_PNG_SIGNATURE):
            if data[12:16] != b"IHDR":
                raise ValueError("first chunk is not IHDR")
            width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
            channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}.get(colour, 4)  # a palette decodes to BGR(A)
            return "PNG", width, height, channels * (2 if depth == 16 else 1)
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


def _jpeg_size(data: bytes) -> tuple[int, int, int]:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {offset}")
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
        elif marker in _JPEG_SOF_MARKERS:
            precision, height, width, components = struct.unpack_from(">BHHB", data, offset + 4)
            return width, height, min(components, 3) * (2 if precision > 8 else 1)
        elif marker == 0xDA:  # image data starts: no frame header came before it
            break
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
        else:
            offset += 2 + struct.unpack_from(">H", data, offset + 2)[0]
    raise ValueError("no JPEG frame header")


def _tiff_size(data: bytes) -> tuple[int, int, int]:
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
        if tag in (256, 257, 258, 277):  # ImageWidth, ImageLength, BitsPerSample, SamplesPerPixel
            value_format = {3: "H", 4: "I", 16: "Q"}.get(value_type)
            if value_format is None:
                raise ValueError(f"TIFF tag {tag} has unexpected type {value_type}")
            at = entry + value_at
            values = struct.unpack_from(order + ("Q" if big else "I"), data, entry + 4)[0]
            if struct.calcsize(value_format) * values > (8 if big else 4):  # the values lie elsewhere
                at = struct.unpack_from(order + ("Q" if big else "I"), data, at)[0]
            sizes[tag] = struct.unpack_from(order + value_format, data, at)[0]
    if 256 not in sizes or 257 not in sizes:
        raise ValueError("TIFF has no image width and length")
    samples = min(sizes.get(277, 1), 4)
    return sizes[256], sizes[257], samples * max(1, -(-sizes.get(258, 8) // 8))


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


def _tiff_pages(data: bytes, limit: int = 10_000) -> int:
    """How many images (IFDs) a TIFF chains together; a broken chain ends the count."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    offset_format, count_format, entry_size = ("Q", "Q", 20) if big else ("I", "H", 12)
    try:
        offset = struct.unpack_from(order + offset_format, data, 8 if big else 4)[0]
        pages, seen = 0, set()
        while offset and offset not in seen and pages < limit:
            seen.add(offset)
            count = struct.unpack_from(order + count_format, data, offset)[0]
            pages += 1
            next_at = offset + struct.calcsize(count_format) + count * entry_size
            offset = struct.unpack_from(order + offset_format, data, next_at)[0]
    except struct.error:
        pass
    return max(pages, 1)


def _dicom_number(path: Path, dataset: pydicom.Dataset, keyword: str, default: float | None, whole: bool) -> Any:
    """A numeric DICOM tag, or ``default`` when absent; a value that is no number is refused, naming the tag."""
    try:
        value = dataset.get(keyword)
    except Exception as err:  # pydicom converting a damaged value
        raise ImageReadError(path, f"damaged DICOM header: tag {keyword} cannot be read ({err})") from err
    if value is None or (isinstance(value, str | bytes) and not str(value).strip()):
        return default
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else default
    try:
        number = float(str(value).strip())
        if whole and not number.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        kind = "whole number" if whole else "number"
        raise ImageReadError(path, f"damaged DICOM header: tag {keyword} is not a {kind} ({str(value)!r})") from None
    if not np.isfinite(number):
        raise ImageReadError(path, f"damaged DICOM header: tag {keyword} is not finite ({str(value)!r})")
    return int(number) if whole else number


def _decode_dicom(path: Path, head: bytes, max_side: int, max_pixels: int) -> tuple[np.ndarray, tuple, int, dict]:
    """A DICOM file -> (2-D uint8, size, bits stored, Radiograph facts), following PS3.4 N.2.

    Read by pydicom from the file itself (not from a copy of its bytes), so a large
    film's pixel data is held once before it is decoded.

    Every header value the pixels depend on is checked first, naming the tag that is wrong:
    frame count, rows and columns, the rescale, and that the pixel data holds as many bytes
    as they say.
    """
    import pydicom

    has_marker = head[128:132] == b"DICM"
    try:
        dataset = pydicom.dcmread(path, force=not has_marker)
    except Exception as err:  # pydicom raises many kinds for a damaged file
        raise ImageReadError(path, f"not a readable DICOM file ({err})") from err
    if "PixelData" not in dataset:
        if not has_marker and not _looks_like_bare_dicom(head):
            raise ImageReadError(path, "not a DICOM file (no 'DICM' marker and no pixel data)")
        raise ImageReadError(path, "DICOM file has no pixel data (not an image object)")
    frames = _dicom_number(path, dataset, "NumberOfFrames", 1, whole=True)
    if frames > 1:
        reason = f"multi-frame DICOM ({frames} frames) is not supported; export one frame"
        raise ImageReadError(path, reason)
    rows = _dicom_number(path, dataset, "Rows", 0, whole=True)
    columns = _dicom_number(path, dataset, "Columns", 0, whole=True)
    samples = _dicom_number(path, dataset, "SamplesPerPixel", 1, whole=True)
    bits = _dicom_number(path, dataset, "BitsAllocated", 8, whole=True)
    _check_size(path, columns, rows, max_pixels, max(1, min(samples, 4)) * max(1, -(-bits // 8)))
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        _dicom_number(path, dataset, keyword, None, whole=False)
    _check_pixel_data_length(path, dataset, rows, columns)
    from pydicom.pixels import pixel_array

    try:
        stored = pixel_array(dataset)  # not cached on the dataset: freed once shrunk
    except Exception as err:  # missing decoder, truncated or corrupt data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ImageReadError(path, f"cannot decode the DICOM pixel data ({name}: {err})") from err
    if stored.shape[:2] != (rows, columns):
        raise ImageReadError(
            path,
            f"DICOM pixel data decodes as {stored.shape[1] if stored.ndim > 1 else '?'}x{stored.shape[0]}, "
            f"but the Rows/Columns tags say {columns}x{rows}",
        )

    stored_bits = stored.dtype.itemsize * 8
    del dataset.PixelData  # decoded: the raw bytes are not needed any more
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        # Shrink before the modality LUT and window: both are per-pixel, and the float
        # copies they make would otherwise be the size of the full film.
        small = _shrink(stored, max_side)
        if small.dtype != stored.dtype and stored.dtype.kind in "iu":
            small = np.rint(small).astype(stored.dtype)
        del stored
        gray, window_note = _dicom_window(small, dataset)
        notes = [window_note] if window_note else []
        # Bone bright, as a viewer shows the film: MONOCHROME1 stores bone dark (a DX file says
        # so again with Presentation LUT Shape INVERSE, the same inversion, not a second one),
        # and a MONOCHROME2 file with an INVERSE presentation is displayed inverted too.
        inverse = str(dataset.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
        if photometric == "MONOCHROME1" or inverse:
            gray = 255 - gray
            if photometric == "MONOCHROME2":
                notes.append("inverted for its Presentation LUT Shape INVERSE")
    elif stored.ndim == 3 and stored.shape[2] == 3:  # RGB, or YBR that pydicom made RGB
        notes = []
        gray = _shrink(cv2.cvtColor(stored, cv2.COLOR_RGB2GRAY), max_side)
        if gray.dtype != np.uint8:
            gray = _percentile_window(gray)
    else:
        raise ImageReadError(path, f"unsupported DICOM photometric interpretation {photometric}")
    bit_depth = _dicom_number(path, dataset, "BitsStored", None, whole=True) or stored_bits
    return gray, (columns, rows), bit_depth, {**_dicom_facts(dataset), "notes": notes}


def _check_pixel_data_length(path: Path, dataset: pydicom.Dataset, rows: int, columns: int) -> None:
    """Native (uncompressed) pixel data must hold what Rows x Columns x samples x bits say."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return
    bits = _dicom_number(path, dataset, "BitsAllocated", None, whole=True)
    samples = _dicom_number(path, dataset, "SamplesPerPixel", 1, whole=True)
    if not bits or bits % 8:  # 1-bit or invalid: the decoder reports it
        return
    expected = rows * columns * samples * bits // 8
    actual = len(dataset.PixelData or b"")
    if actual < expected:
        raise ImageReadError(
            path,
            f"DICOM pixel data too short: {actual} bytes, but Rows x Columns = {rows}x{columns} "
            f"({samples} sample(s) of {bits} bits) need {expected}: a truncated file, or wrong Rows/Columns tags",
        )
    if actual > expected + 1:  # one padding byte is allowed
        raise ImageReadError(
            path,
            f"DICOM pixel data too long: {actual} bytes, but Rows x Columns = {rows}x{columns} "
            f"({samples} sample(s) of {bits} bits) need {expected}: the Rows/Columns tags do not match the data",
        )


def _dicom_window(stored: np.ndarray, dataset: pydicom.Dataset) -> tuple[np.ndarray, str]:
    """Modality LUT/rescale, then the file's VOI LUT or window, else a percentile window.

    Returns the 8-bit pixels and, when the file's own window could not be used, a note
    saying so (the percentile window still gives a sound image, but not the one the file
    asks for).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(stored, dataset)
    has_lut = bool(dataset.get("VOILUTSequence"))
    if has_lut or ("WindowCenter" in dataset and "WindowWidth" in dataset):
        if has_lut and values.dtype.kind == "f":  # a LUT is indexed by whole numbers
            values = np.rint(values).astype(np.int64)
        try:
            windowed = apply_voi_lut(values, dataset)
            low, high = _voi_output_range(dataset)
        except Exception as err:  # an unusable window (damaged values): said, then the percentile window
            problem = f"{type(err).__name__}: {err}"
        else:
            if high > low:
                return _scale_to_uint8(windowed, low, high), ""
            problem = "it maps every value to one grey"
        kind = "VOI LUT" if has_lut else "window"
        if values.dtype == np.uint8:
            return values, f"the file's DICOM {kind} could not be applied ({problem}); its values were shown as stored"
        note = f"the file's DICOM {kind} could not be applied ({problem}); a percentile window was used"
        return _percentile_window(values), note
    if values.dtype == np.uint8:  # 8-bit values without a window are display values already
        return values, ""
    return _percentile_window(values), ""


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
