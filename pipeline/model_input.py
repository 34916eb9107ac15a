"""Grid images to the model's input: what every stage that runs a model feeds it (extract,
explain), so both see the same pixels for the same image."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .datasets.geometry import inside
from .registry import LoadedModel


class ModelInput:
    """uint8 grid images (B, S, S, 3) -> normalised float pixels at the model's input size;
    with ``pad`` geometry rows, the padding set to 0, the model's mean colour (PROTOCOL.md 8.2)."""

    def __init__(self, loaded: LoadedModel, device: torch.device):
        self.loaded, self.device = loaded, device
        mean = torch.tensor(loaded.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(loaded.std, device=device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std

    def __call__(self, images: np.ndarray, geometry: np.ndarray | None = None, pad: bool = False) -> torch.Tensor:
        pixels = torch.from_numpy(images if images.flags.writeable else images.copy())  # zarr reads are read-only
        x = pixels.to(self.device).permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.loaded.input_size:
            x = F.interpolate(x, size=self.loaded.input_size, mode="bilinear", align_corners=False)
        x = x * self._scale - self._shift
        if geometry is not None and pad:
            S = images.shape[1]
            shown = torch.from_numpy(np.stack([inside(g, S) for g in geometry])[:, None].astype(np.float32))
            x = x * F.interpolate(shown.to(self.device), size=x.shape[-1], mode="nearest")
        return x
