"""Sliding-window prediction of whole images of any size with a network trained on small inputs.

The image is covered by tiles of the network's input size that overlap by a fraction; each
tile's probabilities are weighted by a window that is highest in the tile's centre (where the
network saw the most context) and small at its edges, and the weighted tiles are averaged. The
network only ever sees batches of tiles, so its memory does not grow with the image.
"""
import math

import torch
import torch.nn.functional as F

EDGE_WEIGHT = 0.01  # window weight at a tile's border: small, but > 0 so image borders are covered


def starts(size, tile, stride):
    """Tile offsets along one axis: every `stride` pixels, the last tile flush with the end."""
    if size <= tile:
        return [0]
    positions = list(range(0, size - tile, stride))
    return positions + [size - tile]


def ramp(n, device):
    """(n,) raised cosine over pixel centres: about 1 in the middle, EDGE_WEIGHT at both ends."""
    x = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
    return EDGE_WEIGHT + (1 - EDGE_WEIGHT) * torch.sin(math.pi * x) ** 2


def window(tile_h, tile_w, device):
    """(tile_h, tile_w) blending weights: highest in the tile's centre."""
    return ramp(tile_h, device)[:, None] * ramp(tile_w, device)[None, :]


@torch.no_grad()
def predict_tiled(predict, image, tile_h, tile_w, overlap=0.5, batch_size=16):
    """image (1, C, H, W) -> probabilities (1, K, H, W).

    predict: a function from a batch of tiles (B, C, tile_h, tile_w) to probabilities (B, K, tile_h, tile_w).
    Images smaller than a tile are reflect-padded (replicate when too small to reflect) and cropped back.
    """
    _, _, h, w = image.shape
    pad_h, pad_w = max(0, tile_h - h), max(0, tile_w - w)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        image = F.pad(image, (0, pad_w, 0, pad_h), mode=mode)
    H, W = image.shape[2:]
    stride_h, stride_w = max(1, int(tile_h * (1 - overlap))), max(1, int(tile_w * (1 - overlap)))
    corners = [(y, x) for y in starts(H, tile_h, stride_h) for x in starts(W, tile_w, stride_w)]
    weights = window(tile_h, tile_w, image.device)
    total, norm = None, torch.zeros(1, 1, H, W, device=image.device)
    for b in range(0, len(corners), batch_size):
        batch = corners[b:b + batch_size]
        tiles = torch.cat([image[:, :, y:y + tile_h, x:x + tile_w] for y, x in batch])   # (B, C, th, tw)
        probs = predict(tiles).float()                                                  # (B, K, th, tw)
        if total is None:
            total = torch.zeros(1, probs.shape[1], H, W, device=image.device)
        for (y, x), p in zip(batch, probs):
            total[0, :, y:y + tile_h, x:x + tile_w] += p * weights
            norm[0, :, y:y + tile_h, x:x + tile_w] += weights
    return (total / norm)[:, :, :h, :w]
