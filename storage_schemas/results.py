"""The results folder's layout, as data: where every table part and every map lives.

::

    <results>/
      rep_pipeline.json                     {kind, tables_version, package_version}
      <table>/dataset=<d>/[model=<m>/]<part>.parquet   Hive-partitioned Parquet (tables.SCHEMAS)
      maps.zarr/                            attrs: rep_pipeline = {kind, tables_version}
        <dataset>/<split>/ground_truth/     counts, aggregate, images, labels; attrs: classes,
                                            palette, example_ids, evaluation (its options)
        <dataset>/<split>/<model>/attention/            attention
        directions/<dataset>/<split>/<model>/<category>/<embedding>-l<L>/
                                            truth, decisions, cosine_decisions, images (figure d4)
        correspondence/<dataset>/<split>/<model>/<embedding>/example-<j>/
                                            source, target, cosine (figure c3)
        ultra/<dataset>/<split>/<model>/<run id>/layer_<L>/
                                            segments, images, labels, token_maps, class_maps,
                                            linkage, cuts, concepts (figures u1 to u3)
        <dataset>/<split>/<model>/<train_split>/<method>-k<K>-s<seed>/<embedding>/layer_<L>/
                                            counts, aggregate, examples

Every path is built here, relative to the results folder; ``pipeline.results`` and
``pipeline.store`` do the I/O. A reader or writer refuses a folder whose ``tables_version``
differs from ``tables.TABLES_VERSION``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from .feature_store import codebook_name
from .tables import TABLES_VERSION

RESULTS_KIND = "rep-pipeline results"
MAPS_KIND = "rep-pipeline results maps"
MARKER = "rep_pipeline.json"
MAPS = "maps.zarr"
RUN_CONFIG = "run_config.yaml"  # the config of the last `rep-pipeline run` into this folder, as run
GROUND_TRUTH_MODEL = "_ground_truth"  # the model partition of ground-truth rows


@dataclass(frozen=True)
class MapArray:
    name: str
    dims: tuple[str, ...]
    doc: str


MAP_ARRAYS: dict[str, MapArray] = {a.name: a for a in (
    MapArray("counts", ("y", "x", "class"), "n(p, c): test images whose pixel p has (mapped) class c"),
    MapArray("aggregate", ("y", "x", "rgb"), "the aggregate map: class frequencies mixed in the palette"),
    MapArray("examples", ("example", "y", "x"), "predicted class maps of the first test images"),
    MapArray("clusters", ("example", "y", "x"), "their raw cluster ids, before matching (PROTOCOL.md 12.3)"),
    MapArray("images", ("example", "y", "x", "rgb"), "the first test images as the model saw them"),
    MapArray("labels", ("example", "y", "x"), "their ground-truth class maps"),
    MapArray("attention", ("layer", "query", "key"), "image- and head-averaged patch attention"),
    MapArray("example_attention", ("layer", "example", "query", "key"), "head-averaged patch attention of each "
                                                                         "example image (ids: attrs example_ids)"),
    MapArray("truth", ("example", "y", "x"), "direction probes: 1 where the concept is, on the S x S grid"),
    MapArray("decisions", ("example", "y", "x"), "direction probes: a hyperplane template's patch decisions (G x G)"),
    MapArray("source", ("y", "x", "rgb"), "correspondence: the source image on the grid, as the model saw it"),
    MapArray("target", ("y", "x", "rgb"), "correspondence: the target image on the grid"),
    MapArray("cosine", ("layer", "y", "x"), "correspondence: cos(f, upsampled target feature) per layer; NaN on "
                                            "padding"),
    MapArray("segments", ("image", "y", "x"), "ULTra: each test image's segment map (per-image ids)"),
    MapArray("token_maps", ("example", "token", "key"), "ULTra: S_i of a few patch tokens of the example images"),
    MapArray("class_maps", ("example", "key"), "ULTra: the class token's map of the example images"),
    MapArray("linkage", ("example", "merge", "field"), "ULTra: the example images' dendrograms (scipy linkage)"),
    MapArray("cuts", ("example", "zeta", "y", "x"), "ULTra: the example images' segments at several cuts"),
    MapArray("concepts", ("example", "concept", "y", "x"), "ULTra: the example images' concept maps Sigma_c (Eq. 7) "
                                                           "at the run's cut; NaN past an image's last concept"),
    MapArray("cosine_decisions", ("example", "y", "x"), "direction probes: a cosine template's patch decisions "
                                                         "(G x G)"),
)}


def beside(path: str | PurePath, name: str) -> str | PurePath:
    """``name`` in the folder that holds ``path`` (a local path, or an object-storage URL)."""
    text = str(path)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        rest = rest.rstrip("/")
        return f"{scheme}://{rest.rsplit('/', 1)[0] if '/' in rest else rest}/{name}"
    return PurePath(path).parent / name


def default_results(store: str | PurePath) -> str | PurePath:
    """Where results go when no folder is named: ``results`` beside the feature store."""
    return beside(store, "results")


def partition(table: str, dataset: str, model: str | None = None) -> str:
    """``<table>/dataset=<d>[/model=<m>]``: the folder of one table's parts."""
    base = f"{table}/dataset={dataset}"
    return base if model is None else f"{base}/model={model}"


def part_file(table: str, dataset: str, model: str | None, part: str) -> str:
    return f"{partition(table, dataset, model)}/{part}.parquet"


def curve_part(train_split: str, method: str, k: int, seed: int, embedding: str, layer: int,
               variant: str | None = None) -> str:
    """The part name of one codebook's training curve (a part per codebook and layer)."""
    return f"{train_split}-{codebook_name(method, k, seed, variant)}-{embedding}-l{layer}"


def ground_truth_maps(dataset: str, split: str) -> str:
    return f"{dataset}/{split}/ground_truth"


def attention_maps(dataset: str, split: str, model: str) -> str:
    return f"{dataset}/{split}/{model}/attention"


def direction_maps(dataset: str, split: str, model: str) -> str:
    """The maps of figure d4 (direction probes: example masks) of one model."""
    return f"directions/{dataset}/{split}/{model}"


def direction_masks(dataset: str, split: str, model: str, category: str, embedding: str, layer: int) -> str:
    """One (category, embedding, layer)'s masks under ``direction_maps``."""
    return f"{direction_maps(dataset, split, model)}/{category}/{embedding}-l{layer}"


def correspondence_maps(dataset: str, split: str, model: str) -> str:
    """The maps of figure c3 (correspondence heatmaps) of one model; attrs record the run."""
    return f"correspondence/{dataset}/{split}/{model}"


def correspondence_example(dataset: str, split: str, model: str, embedding: str, example: int) -> str:
    """One example keypoint's heatmaps (every layer of one embedding) under ``correspondence_maps``."""
    return f"{correspondence_maps(dataset, split, model)}/{embedding}/example-{example}"


def ultra_maps(dataset: str, split: str, model: str, run_id: str, layer: int) -> str:
    """One ULTra run's maps at one layer (segments, examples of figures u1 to u3)."""
    return f"ultra/{dataset}/{split}/{model}/{run_id[:16]}/layer_{layer}"


def setting_maps(dataset: str, split: str, model: str, train_split: str, method: str, k: int, seed: int,
                 embedding: str, layer: int) -> str:
    """The maps of one evaluated setting (a codebook applied to one layer's features)."""
    return f"{dataset}/{split}/{model}/{train_split}/{codebook_name(method, k, seed)}/{embedding}/layer_{layer}"


__all__ = ["GROUND_TRUTH_MODEL", "MAPS", "MAPS_KIND", "MAP_ARRAYS", "MARKER", "MapArray", "RESULTS_KIND", "RUN_CONFIG",
           "TABLES_VERSION", "attention_maps", "curve_part", "default_results", "ground_truth_maps", "part_file",
           "partition", "setting_maps"]
