"""PCK from predictions (PROTOCOL.md section 11.4): pooled per point, per image (pair), per
category, and the best layers. Pure NumPy over whole columns; no store, no tables."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def thresholds(bbox: np.ndarray) -> np.ndarray:
    """max(w_bb, h_bb) of target boxes (n, 4) [x1, y1, x2, y2]: SPair's convention, no +1 (A30)."""
    bbox = np.asarray(bbox, dtype=np.float64)
    return np.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1])


def errors(pred_x: np.ndarray, pred_y: np.ndarray, gt_x: np.ndarray, gt_y: np.ndarray) -> np.ndarray:
    """Euclidean distance between predicted and true keypoints, original target pixels."""
    return np.hypot(np.asarray(pred_x, np.float64) - gt_x, np.asarray(pred_y, np.float64) - gt_y)


def pck(error: np.ndarray, threshold: np.ndarray, pair: np.ndarray, alpha: float) -> dict[str, Any]:
    """PCK at ``alpha`` of keypoints with ``error``, ``threshold`` and pair codes ``pair``:
    ``pck_point`` pooled over every keypoint (A31), ``pck_image`` the mean over pairs of each
    pair's fraction correct, and the counts."""
    correct = np.asarray(error) <= alpha * np.asarray(threshold)
    _, pair_code = np.unique(np.asarray(pair), return_inverse=True)
    per_pair = np.bincount(pair_code, weights=correct) / np.bincount(pair_code)
    return {"pck_point": float(correct.mean()) if correct.size else float("nan"),
            "pck_image": float(per_pair.mean()) if per_pair.size else float("nan"),
            "n_pairs": int(per_pair.size), "n_keypoints": int(correct.size)}


def best_layers(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (embedding, alpha) of ``correspondence`` rows of one model: the layer of the highest
    ``pck_point`` (ties: the earliest), and ``model_best`` on the (embedding, layer) best over
    all embeddings at that alpha (section 11.4; selection on the evaluated split)."""
    out = []
    for alpha in sorted({r["alpha"] for r in rows}):
        at = [r for r in rows if r["alpha"] == alpha]
        best = {}
        for emb in sorted({r["embedding"] for r in at}):
            mine = sorted((r for r in at if r["embedding"] == emb), key=lambda r: (-r["pck_point"], r["layer"]))
            best[emb] = (mine[0], len(mine))
        top = min(best, key=lambda e: (-best[e][0]["pck_point"], best[e][0]["layer"], e))
        out += [{"embedding": emb, "alpha": alpha, "best_layer": r["layer"], "pck_point": r["pck_point"],
                 "model_best": emb == top, "n_layers": n} for emb, (r, n) in best.items()]
    return out
