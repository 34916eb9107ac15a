"""Fingerprints: the hash of what produced a group, and the refusal to mix outputs of
different producers in one group. No zarr here: these compare attribute dicts."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from rep_pipeline.storage_schemas import feature_store as layout

from ..errors import FingerprintMismatchError


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def _check_same(kind: str, where: str, stored: Mapping[str, Any], new: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    # JSON round trip so tuples and lists compare equal
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731
    diffs = [f"{k}: stored {norm(stored.get(k))!r}, now {norm(new.get(k))!r}"
             for k in keys if norm(stored.get(k)) != norm(new.get(k))]
    if diffs:
        raise FingerprintMismatchError(
            f"{where} was written by another {kind}; refusing to mix outputs.\n  " + "\n  ".join(diffs)
            + "\nUse a new --store, or --model-key to keep both models side by side."
        )


def _check_example_attention(where: str, stored: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse, saying why and what to do, a model group extracted with(out) ``example_attention``
    asked to take chunks of a run without (with) it: the example rows come with the chunks
    they belong to, so they cannot be added to (or left out of) finished features."""
    had, wants = bool(stored.get(layout.EXAMPLE_ATTENTION)), bool(new.get(layout.EXAMPLE_ATTENTION))
    if had == wants:
        return
    what = "example_attention (the per-image attention rows of the split's example images, PROTOCOL.md 12.5)"
    if wants:
        raise FingerprintMismatchError(
            f"{where} was extracted without {what}, and this run asks for it; its written chunks cannot take the "
            f"rows afterwards, so outputs are not mixed. Extract with --example-attention into a new --store, or "
            f"under another --model-key (the group's features stay valid as they are)")
    raise FingerprintMismatchError(
        f"{where} was extracted with {what}, and this run asks without it; refusing to mix outputs. Extract with "
        f"--example-attention to complete or reuse the group, or use a new --store or another --model-key")

