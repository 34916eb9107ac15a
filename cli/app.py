"""``rep-pipeline``: the command line. Parses, calls the stage, prints a summary; no logic."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from pipeline import config
from pipeline.errors import RepPipelineError

app = typer.Typer(help="Probe how self-supervised ViTs organise their embeddings.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
store_app = typer.Typer(help="Inspect feature stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")
# tables stay readable when piped (rich would otherwise assume 80 columns)
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)


def friendly_errors(fn: Callable) -> Callable:
    """Our own errors become one red line and exit code 2, not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RepPipelineError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
    return wrapper


def _parse_options(options: list[str]) -> dict[str, Any]:
    out = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--option {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _layer_span(layers: list[int]) -> str:
    """``4 (0..3)`` for a range of blocks, ``3 (0,5,11)`` for any other choice."""
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{len(layers)} ({layers[0]}..{layers[-1]})"
    return f"{len(layers)} ({','.join(map(str, layers))})"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
@friendly_errors
def extract(
    model: str = typer.Option(..., help="Alias (dino-b16, tiny-dinov3...) or any timm ViT/Eva name."),
    store: Path = typer.Option(..., help="Feature store to create or complete (Zarr v3 directory)."),
    weights: str = typer.Option("pretrained", help="pretrained | random | PATH (.safetensors or .pth)."),
    dataset: str = typer.Option("synthetic", help="cocostuff27 | cityscapes27 | voc | folder | synthetic."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root directory."),
    splits: Optional[str] = typer.Option(None, help="Comma-separated splits; default: the dataset's."),
    layers: Optional[str] = typer.Option(None, help="Blocks to capture: '0,5,11', '6-11'; default all."),
    embeddings: str = typer.Option(",".join(config.EMBEDDINGS), help="Any of queries,keys,values,tokens."),
    limit: Optional[int] = typer.Option(None, help="Take the first N images of each split."),
    image_size: int = typer.Option(config.IMAGE_SIZE, help="S: label grid and crop size."),
    rope: str = typer.Option("before", help="RoPE models: q/k 'before' or 'after' rotation."),
    last_norm: str = typer.Option("after", help="Last-layer tokens 'after' or 'before' the final norm."),
    chunk_images: int = typer.Option(config.CHUNK_IMAGES, help="Images per store chunk and per batch."),
    model_key: Optional[str] = typer.Option(None, help="Store group name for the model; default its alias."),
    seed: int = typer.Option(config.RANDOM_WEIGHTS_SEED, help="Seed of --weights random."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    workers: Optional[int] = typer.Option(None, help="Actors: default one per GPU, else one."),
    threads: Optional[int] = typer.Option(None, help="Torch threads per CPU actor."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default a local instance."),
    option: list[str] = typer.Option([], "--option", "-o", help="Dataset option KEY=VALUE (YAML value)."),
    compile_statistics: bool = typer.Option(False, help="Fuse the attention statistics with torch.compile "
                                                        "(~20 s one-off compile; see docs/benchmarks.md for when it pays)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Capture q, k, v, tokens, class tokens and attention statistics into a feature store."""
    from pipeline.config import ExtractConfig
    from stages.extract import run_extract

    cfg = ExtractConfig(
        model=model, store=store, dataset=dataset, data_root=data_root, splits=config.parse_csv(splits),
        weights=weights, layers=config.parse_layers(layers), embeddings=config.parse_csv(embeddings) or (),
        limit=limit, image_size=image_size, rope=rope, last_norm=last_norm, chunk_images=chunk_images,
        model_key=model_key, seed=seed, device=device, workers=workers, threads_per_worker=threads,
        dataset_options=_parse_options(option), compile_statistics=compile_statistics,
    )
    result = run_extract(cfg, address=address, progress=progress)
    for s in result.splits:
        console.print(f"{result.model} / {cfg.dataset}/{s.split}: {s.n_images} images, "
                      f"{s.chunks_computed} of {s.chunks} chunks computed now")
    console.print(f"wrote {result.images_computed} images in {result.seconds:.1f} s "
                  f"({result.images_per_second:.1f} img/s) to {result.store}")


@app.command()
@friendly_errors
def cluster(
    store: Path = typer.Option(..., help="Feature store written by extract."),
    model: str = typer.Option(..., help="Model key in the store (alias or timm name)."),
    train_split: str = typer.Option(..., help="Split to fit the codebooks on."),
    dataset: Optional[str] = typer.Option(None, help="Dataset, if the model has the split in several."),
    k: Optional[str] = typer.Option(None, "--k", help="Cluster counts, e.g. '27,97'; default: number of classes."),
    method: str = typer.Option(config.KMEANS_METHOD, help="online | lloyd | online,lloyd."),
    layers: Optional[str] = typer.Option(None, help="Blocks, e.g. '6-11'; default every captured one."),
    embeddings: Optional[str] = typer.Option(None, help="Default every captured one."),
    seed: int = typer.Option(config.KMEANS_SEED),
    steps: int = typer.Option(config.ONLINE_STEPS, help="online: Adam steps."),
    lr: float = typer.Option(config.ONLINE_LR, help="online: Adam learning rate."),
    batch_images: int = typer.Option(config.ONLINE_BATCH_IMAGES, help="Images per batch (all their patches)."),
    init_batches: int = typer.Option(config.PCA_INIT_BATCHES, help="Batches for the PCA initialisation."),
    tol: float = typer.Option(config.LLOYD_TOL, help="lloyd: stop below this fraction of changed assignments."),
    max_iter: int = typer.Option(config.LLOYD_MAX_ITER, help="lloyd: passes at most."),
    results: Optional[Path] = typer.Option(None, help="Results folder for training curves; default <store>/../results."),
    force: bool = typer.Option(False, help="Retrain codebooks that are already finished."),
    workers: Optional[int] = typer.Option(None, help="Ray workers; default one per GPU, else one."),
    backend: Optional[str] = typer.Option(None, help="numpy | cupy; default CuPy when a GPU is present."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default a local instance."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Fit cosine k-means codebooks for every (layer, embedding, K, method) in one pass."""
    from pipeline.config import ClusterConfig
    from stages.cluster import run_cluster

    cfg = ClusterConfig(
        store=store, model=model, train_split=train_split, dataset=dataset, ks=config.parse_ks(k),
        methods=config.parse_csv(method) or (), layers=config.parse_layers(layers),
        embeddings=config.parse_csv(embeddings), seed=seed, steps=steps, lr=lr, batch_images=batch_images,
        init_batches=init_batches, tol=tol, max_iter=max_iter, results=results, force=force, workers=workers,
        backend=backend,
    )
    result = run_cluster(cfg, address=address, progress=progress)
    console.print(f"{result.model} / {result.dataset}/{train_split}: trained {len(result.trained)} codebooks, "
                  f"reused {result.reused} finished ones, in {result.seconds:.1f} s")
    console.print(f"centroids in {store} (models/{model}/{result.dataset}/{train_split}/codebooks), "
                  f"training curves in {cfg.results}/training_curves")


@app.command()
@friendly_errors
def evaluate(
    store: Path = typer.Option(..., help="Feature store with features and codebooks."),
    split: str = typer.Option(..., help="Test split to segment and score."),
    results: Optional[Path] = typer.Option(None, help="Results folder; default <store>/../results."),
    model: Optional[str] = typer.Option(None, help="Comma-separated models; default all with the split."),
    dataset: Optional[str] = typer.Option(None, help="Only this dataset."),
    examples: int = typer.Option(config.EXAMPLE_IMAGES, help="Predicted maps kept per setting."),
    backend: Optional[str] = typer.Option(None, help="numpy | cupy; default CuPy when a GPU is present."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Segment the test split with every finished codebook; write Parquet tables and maps."""
    from pipeline.config import EvaluateConfig
    from stages.evaluate import run_evaluate

    cfg = EvaluateConfig(store=store, split=split, results=results, models=config.parse_csv(model),
                         dataset=dataset, n_examples=examples, backend=backend)
    result = run_evaluate(cfg, progress=progress)
    console.print(f"evaluated {result.settings} settings of {', '.join(result.models)} in {result.seconds:.1f} s; "
                  f"tables in {result.results} (try: rep-pipeline query {result.results} \"SELECT * FROM "
                  f"segmentation ORDER BY miou DESC LIMIT 5\")")


@app.command()
@friendly_errors
def query(
    results: Path = typer.Argument(..., help="Results folder written by evaluate."),
    sql: str = typer.Argument(..., help="One SELECT; tables are views named after the result tables."),
    limit: int = typer.Option(50, help="Rows to print at most."),
) -> None:
    """Run read-only SQL over the result tables with DuckDB."""
    from pipeline.query import fetch_rows

    columns, rows = fetch_rows(results, sql, limit)
    table = Table(*columns)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


@app.command()
@friendly_errors
def report(
    results: Path = typer.Option(..., help="Results folder written by evaluate."),
    out: Path = typer.Option(..., help="Report folder: index.html and figures."),
    compare: str = typer.Option("models", help="models (paradigms, sizes) | layers."),
    embedding: str = typer.Option("keys", help="Embedding type to compare."),
    layer: str = typer.Option("best", help="'best' or a block number (compare=models)."),
    models: Optional[str] = typer.Option(None, help="Comma-separated models; default all evaluated."),
    k: Optional[int] = typer.Option(None, "--k", help="Codebook size; default the first evaluated."),
    method: Optional[str] = typer.Option(None, help="online | lloyd; default the first evaluated."),
    dataset: Optional[str] = typer.Option(None), split: Optional[str] = typer.Option(None),
) -> None:
    """Draw the visual protocol and write a self-contained index.html."""
    from pipeline.config import Comparison, ReportConfig
    from stages.report import run_report

    comparison = Comparison(compare={"paradigms": "models", "sizes": "models"}.get(compare, compare),
                            embedding=embedding, layer=layer, models=config.parse_csv(models), k=k, method=method)
    result = run_report(ReportConfig(results=results, out=out, comparisons=(comparison,), dataset=dataset, split=split))
    console.print(f"report: {result.index} ({len(result.figures)} figure files)")


@app.command()
@friendly_errors
def run(
    config_file: Path = typer.Argument(..., help="Run config (YAML), e.g. configs/demo.yaml."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address; default a local instance."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """extract -> cluster -> evaluate -> report from one config, skipping finished work."""
    from pipeline.orchestrate import RunConfig, run_all

    result = run_all(RunConfig.from_yaml(config_file), address=address, progress=progress, say=console.print)
    console.print(f"[bold green]done[/] in {result.seconds:.0f} s. Report: {result.report}")


@app.command("models")
def list_models_cmd(pattern: str = typer.Argument("*", help="Glob over aliases and timm names.")) -> None:
    """List the registered models."""
    from pipeline.registry import list_models

    table = Table("alias", "timm name", "family", "size", "weights")
    for spec in list_models(pattern):
        table.add_row(spec.alias, spec.timm_name, spec.family, spec.size,
                      "hub" if spec.hub else ("checkpoint file" if spec.weights_hint else "random only"))
    console.print(table)


@store_app.command("info")
@friendly_errors
def store_info(path: Path = typer.Argument(..., help="Feature store directory.")) -> None:
    """What is inside a store, how complete, how big."""
    from pipeline.store import FeatureStore
    from storage_schemas import validate_store

    info = FeatureStore(path).info()
    ds_table = Table("dataset", "split", "images", "classes", "S", "labels done", "stored", title=f"{path}: datasets",
                     title_justify="left")
    for d in info["datasets"]:
        ds_table.add_row(d["dataset"], d["split"], str(d["n_images"]), str(d["classes"]), str(d["image_size"]),
                         f"{d['chunks_done']}/{d['chunks']}", _size(d["bytes_stored"]))
    console.print(ds_table)
    m_table = Table("model", "data", "weights", "layers", "embeddings", "grid x dim", "chunks done", "stored",
                    "ratio", title=f"{path}: models", title_justify="left")
    for m in info["models"]:
        m_table.add_row(m["model"], f"{m['dataset']}/{m['split']}", m["weights"], _layer_span(m["layers"]),
                        ",".join(m["embeddings"]),
                        f"{m['grid']}x{m['grid']} x {m['embed_dim']}",
                        f"{m['chunks_done']}/{m['chunks']}" + ("" if m["finished"] else " (unfinished)"),
                        _size(m["bytes_stored"]), f"{m['bytes_raw'] / max(m['bytes_stored'], 1):.2f}x")
    console.print(m_table)
    books = [(m, name, done) for m in info["models"] for name, done in m["codebooks"].items()]
    if books:
        b_table = Table("model", "data", "codebook", "finished layers per embedding", title=f"{path}: codebooks",
                        title_justify="left")
        for m, name, done in books:
            b_table.add_row(m["model"], f"{m['dataset']}/{m['split']}", name,
                            ", ".join(f"{e} {n}/{len(m['layers'])}" for e, n in done.items()) or "-")
        console.print(b_table)
    problems = validate_store(path)
    if problems:
        console.print("[bold red]layout problems:[/]\n  " + "\n  ".join(problems))
        raise typer.Exit(1)
    console.print(f"[green]layout valid[/] (schema version {info['schema_version']})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
