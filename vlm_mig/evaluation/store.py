"""``samples.jsonl``: the append-only log of graded completions that lets an interrupted run resume."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from vlm_mig.data.schema import DataError
from vlm_mig.evaluation.records import SampleRecord


class SampleStore:
    """``samples.jsonl`` as an append-only log of graded completions, keyed by (benchmark, id, sample).

    Every finished batch is appended and flushed (and fsynced), so an interruption loses at most the
    batch in flight. On open, a torn last line (no newline, or not JSON: the write was cut) is dropped
    and the file truncated to the last whole line; a bad line elsewhere is an error naming it, since
    that is not what an interruption leaves.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[tuple[str, str, int], SampleRecord] = {}
        self.dropped_torn_line = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        lines = data.split(b"\n")
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1
            if last and not raw:
                break  # the file ends with a newline
            if not last and not raw.strip():
                good_end += len(raw) + 1
                continue
            try:
                record = SampleRecord.from_json(json.loads(raw))
            except (ValueError, TypeError, AttributeError) as e:  # JSON, UTF-8, or not a record's fields
                if last or (i == len(lines) - 2 and not lines[-1]):
                    self._truncate(good_end)
                    return
                raise DataError(f"{self.path}:{i + 1}: corrupt line (not from an interrupted write): {e}") from None
            if last:  # parsed, but the newline never made it: rewrite it whole on the next append
                self._truncate(good_end)
                return
            self.records[record.key] = record
            good_end += len(raw) + 1

    def _truncate(self, size: int) -> None:
        self.dropped_torn_line = True
        with open(self.path, "r+b") as f:
            f.truncate(size)

    def done(self, benchmark: str, settings: str, describe: str = "") -> dict[tuple[str, int], SampleRecord]:
        """Finished completions of ``benchmark`` made with these settings; other settings are an error.

        Mixing completions of two models or two decodings under one benchmark name would give a
        meaningless score, so a mismatch stops the run instead of being silently overwritten.
        """
        mine = {k: r for k, r in self.records.items() if k[0] == benchmark}
        stale = [r for r in mine.values() if r.settings != settings]
        if stale:
            raise DataError(
                f"{self.path}: {len(stale)} completion(s) of benchmark {benchmark!r} were made with other settings "
                f"(model, decoding, prompt template, extraction or items differ from {describe or settings}); "
                "use another --out, or delete that file to start over"
            )
        return {(r.id, r.sample): r for r in mine.values()}

    def append(self, records: Iterable[SampleRecord]) -> None:
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r.key] = r
