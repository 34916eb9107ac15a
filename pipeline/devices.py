"""Where a stage's torch model runs: the ``device`` option of extract and explain
(``auto``: a CUDA GPU if torch sees one, else the CPU; ``cuda`` and ``cpu`` as asked)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is loaded by the caller, inside its worker
    import torch


def torch_device(choice: str) -> "torch.device":
    """The torch device for the option value ``choice`` (auto | cpu | cuda)."""
    import torch

    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")
