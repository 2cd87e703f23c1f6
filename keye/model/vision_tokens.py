"""How many LM tokens an image or frame becomes: the one function packing, the loader and the ViT share.

Follows the qwen-vl-utils resize rule (sides a multiple of patch*merge = 28, pixel budget bounds) and
Keye-VL-1.5's SlowFast encoding, where "fast" frames get about 30% of a slow frame's tokens.
Pure python on purpose: the data side imports it without pulling torch.
"""

from __future__ import annotations

import math

PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE  # 28: every resized side is a multiple of this


def smart_resize(
    height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR
) -> tuple[int, int]:
    """Nearest (h, w) with sides multiple of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patch_grid(height: int, width: int, patch: int = PATCH) -> tuple[int, int]:
    """ViT patch grid (rows, cols) of an already resized frame."""
    if height % (patch * MERGE) or width % (patch * MERGE):
        raise ValueError(f"frame {height}x{width} is not a multiple of {patch * MERGE}; resize it first")
    return height // patch, width // patch


def frame_tokens(height: int, width: int, patch: int = PATCH, merge: int = MERGE) -> int:
    """LM tokens one resized frame becomes after the 2x2 patch merge of the projector."""
    gh, gw = patch_grid(height, width, patch)
    return (gh // merge) * (gw // merge)


def tokens_to_pixels(tokens: int) -> int:
    """Pixel area that yields `tokens` merged tokens (one token = 28x28 pixels)."""
    return tokens * FACTOR * FACTOR


def fast_frame_size(height: int, width: int, ratio: float = 0.3) -> tuple[int, int]:
    """Size of a SlowFast "fast" frame: about `ratio` of the slow frame's tokens, same aspect, >= 1 token."""
    target = max(FACTOR * FACTOR, int(height * width * ratio))
    return smart_resize(height, width, min_pixels=FACTOR * FACTOR, max_pixels=target)
