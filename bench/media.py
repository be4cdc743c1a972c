"""Fake camera input for Chromium: a real photo written as a Y4M video file.

Chromium's `--use-file-for-fake-video-capture=FILE.y4m` plays the file as the camera, so a test sees a known
image through getUserMedia exactly as a phone would see a scene.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def rgb_to_yuv420(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-range BT.601 (Y4M's C420jpeg), chroma averaged over 2x2 blocks."""
    f = rgb.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    v = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    h, w = y.shape
    u = u.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    v = v.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return tuple(np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, u, v))


def write_y4m(path: Path, rgb: np.ndarray, frames: int = 2, fps: int = 10) -> Path:
    """Write `rgb` (H, W, 3 uint8, even H and W) as a short still video."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        rgb = rgb[: h - h % 2, : w - w % 2]
        h, w = rgb.shape[:2]
    y, u, v = rgb_to_yuv420(rgb)
    frame = b"FRAME\n" + y.tobytes() + u.tobytes() + v.tobytes()
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(frame)
    return path


def write_y4m_frames(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """Write equally sized RGB frames (H, W, 3 uint8) as a video: a camera stream for Chromium's fake capture,
    which plays it in a loop at `fps`."""
    h, w = frames[0].shape[:2]
    h, w = h - h % 2, w - w % 2
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            if rgb.shape[:2] != frames[0].shape[:2]:
                raise ValueError(f"frame of {rgb.shape[:2]}, the first was {frames[0].shape[:2]}")
            y, u, v = rgb_to_yuv420(np.ascontiguousarray(rgb[:h, :w]))
            f.write(b"FRAME\n" + y.tobytes() + u.tobytes() + v.tobytes())
    return path
