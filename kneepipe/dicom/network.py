"""Send DICOM instances: C-STORE to a DICOM node (pynetdicom) or STOW-RS to a DICOMweb service.

``kneepipe send`` and the DICOM node's results both go through :func:`send_instances`.

>>> from kneepipe.dicom.config import Destination
>>> send_instances([sr, sc], Destination.parse("ORTHANC@127.0.0.1:4242"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from kneepipe.dicom.config import Destination

DEFAULT_CALLING_AE = "KNEEPIPE"


class SendError(RuntimeError):
    """Instances could not be delivered; the message says to whom and why."""


def read_instances(paths: Sequence[str | Path]) -> list[Dataset]:
    """Read DICOM files to send.

    Raises:
        SendError: naming the first file that is not DICOM or cannot be read.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError) as err:
            raise SendError(f"{path}: cannot be sent ({getattr(err, 'strerror', None) or err})") from err
        if "SOPClassUID" not in datasets[-1] or "SOPInstanceUID" not in datasets[-1]:
            raise SendError(f"{path}: cannot be sent (no SOP Class or SOP Instance UID)")
    return datasets


def send_instances(
    datasets: Sequence[Dataset],
    destination: Destination,
    calling_ae: str = DEFAULT_CALLING_AE,
    timeout_s: float = 30.0,
) -> None:
    """Deliver ``datasets`` to ``destination``: C-STORE over one association, or one STOW-RS request.

    Raises:
        SendError: the destination refused, did not answer, or stored not all of them.
    """
    if not datasets:
        return
    if destination.url:
        _stow(datasets, destination.url, timeout_s)
    else:
        _c_store(datasets, destination, calling_ae, timeout_s)


def _c_store(datasets: Sequence[Dataset], destination: Destination, calling_ae: str, timeout_s: float) -> None:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets if ds.SOPClassUID == sop_class})
        ae.add_requested_context(sop_class, [*syntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "did not answer"
        raise SendError(f"{destination}: {why}")
    failed = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB006, 0xB007):
                failed.append(f"{ds.SOPInstanceUID} ({'no answer' if code is None else f'status 0x{code:04X}'})")
    finally:
        assoc.release()
    if failed:
        raise SendError(f"{destination}: not stored: {', '.join(failed)}")


def _stow(datasets: Sequence[Dataset], url: str, timeout_s: float) -> None:
    from dicomweb_client.api import DICOMwebClient

    try:
        client = DICOMwebClient(url=url, timeout=timeout_s)
        client.set_http_retry_params(retry=False)  # the node retries on its own schedule
        response = client.store_instances(list(datasets))
    except Exception as err:  # requests' and dicomweb-client's errors: the message says what happened
        raise SendError(f"{url}: STOW-RS failed ({type(err).__name__}: {err})") from err
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        uids = ", ".join(str(item.get("ReferencedSOPInstanceUID", "?")) for item in failed)
        raise SendError(f"{url}: STOW-RS did not store {uids}")
