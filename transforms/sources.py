"""Sources of raw event payloads: bytes, one record each, never decoded here."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import BytesCoder


class ReadEventFiles(beam.PTransform):
    """Newline-delimited files → raw bytes per line.

    Bytes, not str: the default UTF-8 coder fails the whole read on one invalid line
    (DESIGN.md); decoding belongs to validation, which dead-letters such a line.
    """

    def __init__(self, file_pattern: str) -> None:
        super().__init__()
        self._file_pattern = file_pattern

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return pbegin | beam.io.ReadFromText(self._file_pattern, coder=BytesCoder())
