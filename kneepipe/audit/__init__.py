"""Data audit: leakage between image folders, and patient-level splits.

:mod:`kneepipe.audit.leakage` finds copies (renamed, resized, re-encoded, re-contrasted,
cropped, shifted or mirrored), exact duplicates and shared patients between two folders;
:mod:`kneepipe.audit.split` splits labelled crops by patient. Importing this package
loads nothing heavy.
"""
