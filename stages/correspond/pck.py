"""PCK from predictions (PROTOCOL.md section 11.4): pooled per point, per image (pair), per
category, and the best layers. Pure NumPy over whole columns; no store, no tables.

Each PCK carries its 95 % percentile bootstrap interval over the test pairs (docs/uncertainty.md):
a draw resamples the pairs with replacement (all of a pair's keypoints together), so the
per-point PCK of a draw is its correct keypoints over its keypoints. Correspond has no seed
option: the draws are seeded with ``SEED`` = 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rep_pipeline.pipeline import bootstrap

SEED = 0  # the bootstrap draws' seed


def thresholds(bbox: np.ndarray) -> np.ndarray:
    """max(w_bb, h_bb) of target boxes (n, 4) [x1, y1, x2, y2]: SPair's convention, no +1 (A30)."""
    bbox = np.asarray(bbox, dtype=np.float64)
    return np.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1])


def errors(pred_x: np.ndarray, pred_y: np.ndarray, gt_x: np.ndarray, gt_y: np.ndarray) -> np.ndarray:
    """Euclidean distance between predicted and true keypoints, original target pixels."""
    return np.hypot(np.asarray(pred_x, np.float64) - gt_x, np.asarray(pred_y, np.float64) - gt_y)


def pck(error: np.ndarray, threshold: np.ndarray, pair: np.ndarray, alpha: float, seed: int = SEED
        ) -> dict[str, Any]:
    """PCK at ``alpha`` of keypoints with ``error``, ``threshold`` and pair codes ``pair``:
    ``pck_point`` pooled over every keypoint (A31), ``pck_image`` the mean over pairs of each
    pair's fraction correct, each with its bootstrap interval over pairs (``_lo``, ``_hi``;
    pairs in sorted order of their codes, draws seeded by ``seed``), and the counts."""
    correct = np.asarray(error) <= alpha * np.asarray(threshold)
    _, pair_code = np.unique(np.asarray(pair), return_inverse=True)
    hits, points = np.bincount(pair_code, weights=correct), np.bincount(pair_code)
    per_pair = hits / points
    point_ci = bootstrap.ratio_interval(hits, points, seed)
    image_ci = bootstrap.ratio_interval(per_pair, np.ones_like(per_pair), seed)
    cell = bootstrap.finite_or_none
    return {"pck_point": float(correct.mean()) if correct.size else float("nan"),
            "pck_point_lo": cell(point_ci[0]), "pck_point_hi": cell(point_ci[1]),
            "pck_image": float(per_pair.mean()) if per_pair.size else float("nan"),
            "pck_image_lo": cell(image_ci[0]), "pck_image_hi": cell(image_ci[1]),
            "n_pairs": int(per_pair.size), "n_keypoints": int(correct.size)}


def best_layers(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (embedding, alpha) of ``correspondence`` rows of one model: the layer of the highest
    ``pck_point`` (ties: the earliest), and ``model_best`` on the (embedding, layer) best over
    all embeddings at that alpha (section 11.4; selection on the evaluated split). The best
    layer's ``pck_point_lo`` / ``pck_point_hi`` come along where the rows have them."""
    out = []
    for alpha in sorted({r["alpha"] for r in rows}):
        at = [r for r in rows if r["alpha"] == alpha]
        best = {}
        for emb in sorted({r["embedding"] for r in at}):
            mine = sorted((r for r in at if r["embedding"] == emb), key=lambda r: (-r["pck_point"], r["layer"]))
            best[emb] = (mine[0], len(mine))
        top = min(best, key=lambda e: (-best[e][0]["pck_point"], best[e][0]["layer"], e))
        out += [{"embedding": emb, "alpha": alpha, "best_layer": r["layer"], "pck_point": r["pck_point"],
                 "pck_point_lo": r.get("pck_point_lo"), "pck_point_hi": r.get("pck_point_hi"),
                 "model_best": emb == top, "n_layers": n} for emb, (r, n) in best.items()]
    return out
