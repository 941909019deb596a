"""Results in DICOM: a Structured Report and a Secondary Capture per graded film, and a DICOM node.

:mod:`kneepipe.dicom.export` writes a run's results as DICOM (``kneepipe run --dicom``);
:mod:`kneepipe.dicom.node` receives films from a PACS, grades them and sends the results
back (``kneepipe listen``); :mod:`kneepipe.dicom.network` holds the DIMSE and DICOMweb
senders (``kneepipe send``). The codes used are in :mod:`kneepipe.dicom.codes`.
"""
