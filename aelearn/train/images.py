"""Image grids written as PNG files, with no imaging library (zlib and struct suffice for PNG)."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import torch


def image_grid(images: torch.Tensor, columns: int = 8, padding: int = 2) -> np.ndarray:
    """``images: [N, C, H, W]`` with values in [0, 1] (clipped), C = 1 or 3 → ``[H', W', C]`` uint8,
    tiled row by row, ``columns`` per row, on a white background with ``padding`` pixels between."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with 1 or 3 channels, got shape {tuple(images.shape)}")
    count, channels, height, width = images.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255, dtype=np.uint8)
    for index, image in enumerate(pixels):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """Write ``pixels: [H, W, C]`` uint8 (C = 1 grey, 3 RGB) as an 8-bit PNG."""
    height, width, channels = pixels.shape
    colour_type = {1: 0, 3: 2}[channels]
    # Each scanline starts with its filter type (0: none).
    scanlines = np.concatenate([np.zeros((height, 1), dtype=np.uint8), pixels.reshape(height, width * channels)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n")
        file.write(_chunk(b"IHDR", header))
        file.write(_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6)))
        file.write(_chunk(b"IEND", b""))
