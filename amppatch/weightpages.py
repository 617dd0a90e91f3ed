"""`WeightPages`: how much of a model file's mapping sat on huge pages in a watched process — the record ab-test
keeps per arm (report.json's `arms[].huge_pages`) and profile for its run (profile.json's `huge_pages`), from
the smaps share `amppatch.childpages.ChildPages` saw. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from amppatch.hugepages import HugeShare

MIB = 1 << 20


@dataclass(frozen=True)
class WeightPages:
    """How much of the model file's mapping sat on huge pages while a process ran it (from its smaps)."""

    file_size: int
    during: str  # which run was watched, e.g. "warmup (tg64, 1 thread)"
    smaps: HugeShare | None  # None: no process of that run was seen
    note: str = ""

    @property
    def share(self) -> float | None:
        """Huge-page bytes ÷ bytes of the file's mapping; None when the file was not mapped (llama-bench's
        `--load-mode none` reads the weights instead) or no process was seen."""
        if self.smaps is None or not self.smaps.range_bytes:
            return None
        return self.smaps.share

    def to_json(self) -> dict[str, Any]:
        share = self.share
        return {"share": None if share is None else round(share, 6), "file_size": self.file_size,
                "during": self.during, "smaps": self.smaps.to_json() if self.smaps else None, "note": self.note}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WeightPages:
        smaps = data.get("smaps")
        return cls(int(data.get("file_size") or 0), str(data.get("during", "")),
                   HugeShare.from_json(smaps) if smaps else None, str(data.get("note", "")))

    @classmethod
    def watched(cls, smaps: HugeShare | None, file_size: int, during: str) -> WeightPages:
        if smaps is None:
            return cls(file_size, during, None, "no process of this run was seen")
        if not smaps.range_bytes:
            # Either llama.cpp read the weights into memory, or the run ended before its smaps showed the
            # mapping (a tiny model on a busy machine): the watcher cannot tell which, so it claims neither.
            return cls(file_size, during, smaps, "the model file's mapping was not seen (weights read into memory, "
                       "or the run ended before its mapping could be read)")
        return cls(file_size, during, smaps)

    def describe(self) -> str:
        """One phrase: '0 % of the 1.17 GB mapping of the model file on huge pages (during ...)'."""
        if self.share is None or self.smaps is None:
            return f"not measured during {self.during}: {self.note or 'no mapping seen'}"
        kinds = []
        if self.smaps.file_pmd_bytes:
            kinds.append(f"file THP {self.smaps.file_pmd_bytes / MIB:.0f} MiB")
        if self.smaps.anon_huge_bytes:
            kinds.append(f"anonymous THP {self.smaps.anon_huge_bytes / MIB:.0f} MiB")
        detail = f" ({', '.join(kinds)})" if kinds else ""
        size = self.smaps.range_bytes
        mapped = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
        return f"{self.share:.0%} of the {mapped} mapping of the model file on huge pages{detail}, during {self.during}"
