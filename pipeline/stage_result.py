"""What a stage that runs (embedding, layer) settings of one model returns (probe, correspond):
the model, the results folder, how many settings ran and how long it took, and the line
``summary()`` prints. A subclass names its stage and its tables and says what it did."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class SettingsResult:
    model: str
    results: str
    settings: int = 0
    seconds: float = 0.0

    STAGE: ClassVar[str] = ""
    TABLES: ClassVar[tuple[str, ...]] = ()  # the tables the summary names

    def work(self) -> str:
        """What the run did, ending with its time."""
        return f"{self.settings} (embedding, layer) settings in {self.seconds:.1f} s"

    def summary(self) -> list[str]:
        return [f"{self.STAGE} {self.model}: {self.work()}; tables {', '.join(self.TABLES)} in {self.results}"]
