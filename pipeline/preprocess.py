"""Frame geometry and normalisation, exactly as open_clip's eval transform does them.

open_clip's eval transform (resize mode "shortest") is torchvision's
`Resize(S)` -> `CenterCrop(S)` -> `ToTensor()` -> `Normalize(mean, std)`. Here the resize is
done by the decoder (decord scales to exactly the width and height it is given, so both are
computed from the source size with torchvision's rounding, keeping the aspect ratio), the crop
on the uint8 frames in the decode worker (4x less data to ship than floats), and the
normalisation on the encoder's device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where frames are normalised (the encoder), not by decoders
    import torch

RESIZE_SHORTEST = "shortest"
RESIZE_SQUASH = "squash"
RESIZE_MODES = (RESIZE_SHORTEST, RESIZE_SQUASH)


def resized_size(width: int, height: int, size: int, mode: str = RESIZE_SHORTEST) -> tuple[int, int]:
    """(width, height) after the eval transform's resize: torchvision `Resize(size)` makes the
    short side `size` and the long side `int(size * long / short)`; "squash" ignores the aspect."""
    if mode == RESIZE_SQUASH:
        return size, size
    if mode != RESIZE_SHORTEST:
        raise ValueError(f"unsupported resize mode {mode!r}; supported: {', '.join(RESIZE_MODES)}")
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """Crop (N, H, W, C) frames to (N, size, size, C) with torchvision `CenterCrop`'s rounding."""
    height, width = frames.shape[1:3]
    if height < size or width < size:
        raise ValueError(f"frames of {width}x{height} are smaller than the {size}x{size} crop")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return np.ascontiguousarray(frames[:, top : top + size, left : left + size])


def normalize(
    frames: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised (N, 3, H, W) in `dtype`, computed in float32 like
    `ToTensor` + `Normalize`, then cast (default float32)."""
    import torch

    x = frames.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t).to(dtype or torch.float32)
