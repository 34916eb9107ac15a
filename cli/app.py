"""``rep-pipeline``: the command line. Parses, calls a stage, prints its summary; no logic.

Each stage command is built from its config class (``stages.STAGES``): one ``--flag`` per
option field, with the field's help, its default shown and its allowed values, so an
option exists once, in ``pipeline/config.py``. Flags left out keep the config's default.
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import typer
from typer.core import TyperGroup
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.text import Text
from rich.table import Table

from rep_pipeline.pipeline.config import Comparison, Options, ReportConfig, Storage, parse_key_values
from rep_pipeline.pipeline.location import as_location
from rep_pipeline.pipeline.errors import ConfigError, RepPipelineError
from rep_pipeline.pipeline.yaml_files import load_value
from rep_pipeline.stages import STAGES

# typer ships its own click; its usage-error class is the base of the public BadParameter
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Commands(TyperGroup):
    """Typer's group, with usage errors (a misspelt flag, a missing option) as one line like
    every other error, and ``--debug`` accepted anywhere on the command line."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        if "--debug" in args[1:]:  # after the command's name as well as before it
            args.remove("--debug")
            args.insert(0, "--debug")
        args = _sql_as_values(args)
        try:
            rc = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _UsageError as exc:
            if not standalone_mode:
                raise
            command = exc.ctx.command_path if exc.ctx is not None else "rep-pipeline"
            err_console.print(_said("error:", "bold red", f" {exc.format_message()} (see `{command} --help`)"), highlight=False)
            sys.exit(2)
        except typer.Abort:
            if not standalone_mode:
                raise
            sys.exit(130)
        if standalone_mode:
            sys.exit(rc if isinstance(rc, int) else 0)
        return rc


def _sql_as_values(args: list[str]) -> list[str]:
    """``query``'s SQL may begin with a ``-- comment`` line, which the parser would take for an
    option: an argument of ``query`` that starts with ``-`` and holds whitespace before any
    ``=`` (an option never does) is passed on behind a newline, a no-op in SQL."""
    if "query" not in args:
        return args
    at = args.index("query")
    out = args[: at + 1]
    for arg in args[at + 1:]:
        head = arg.split(None, 1)[0] if arg.strip() else arg
        if arg.startswith("-") and any(c.isspace() for c in arg) and "=" not in head:
            arg = "\n" + arg
        out.append(arg)
    return out


app = typer.Typer(cls=_Commands, no_args_is_help=True, pretty_exceptions_enable=False)
store_app = typer.Typer(help="Inspect feature stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")
# tables stay readable when piped (rich would otherwise assume 80 columns)
# markup and emoji codes off: paths, image names and keys are printed as they are (a file named
# "[bold]x.jpg" or ":x: dir" stays so); styled labels go through _said
console = Console(markup=False, emoji=False) if sys.stdout.isatty() else Console(width=160, markup=False, emoji=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)  # one line, however narrow the terminal


def _said(label: str, style: str, text: Any = "") -> Text:
    """``label`` in ``style``, then ``text`` exactly as given (never read as markup)."""
    return Text.assemble((label, style), str(text))

# options of how a command runs, not of what it computes: never part of a config
RUN_OPTIONS = {
    "address": (Optional[str], typer.Option(None, help="Ray cluster address (auto: the one this node belongs "
                                                      "to); default a new local instance; inline: the workers "
                                                      "in this process, no Ray.")),
    "progress": (bool, typer.Option(True, help="Show progress bars.")),
}


_debug = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error.")) -> None:
    """Probe how self-supervised ViTs organise their embeddings."""
    _debug["on"] = debug


def _one_line(exc: BaseException) -> str:
    """``Type: first line``, of the worker's own exception where Ray wrapped one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def friendly_errors(fn: Callable) -> Callable:
    """Errors become one or two red lines, not a traceback (``--debug`` shows it): our own
    errors with exit code 2, anything unexpected with exit code 1, Ctrl-C with 130."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, _UsageError):
            raise
        except RepPipelineError as exc:
            if _debug["on"]:
                raise
            err_console.print(_said("error:", "bold red", f" {exc}"), highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            if _debug["on"]:
                raise
            err_console.print(_said("interrupted", "bold red", "; finished work is kept, run the same command to resume"))
            raise typer.Exit(130) from None
        except Exception as exc:
            if _debug["on"]:
                raise
            err_console.print(_said("error:", "bold red", f" {_one_line(exc)}\n(unexpected; run with --debug for the "
                                                           f"traceback)"), highlight=False)
            raise typer.Exit(1) from None
    return wrapper


# -- options from config fields ---------------------------------------------------------------
# the storage option of the commands that are not stages, from its one declaration
STORAGE_OPTION = typer.Option([], Storage.flag("storage_options"),
                              help=Storage.model_fields["storage_options"].description)


def _located(where: str, options: list[str]) -> Any:
    """A path or URL argument, with the ``--storage-option`` pairs."""
    try:
        return as_location(where, parse_key_values(options))
    except ValueError as exc:
        raise typer.BadParameter(f"--storage-option: {exc}") from None



def _cli_type(info: FieldInfo) -> tuple[Any, str]:
    """The type typer parses a field's flag as, and a note of the allowed values. Composite
    values (tuples, layer ranges) are taken as the string the config's validators read."""
    ann = info.annotation
    optional = typing.get_origin(ann) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(ann) if a is not type(None)] if optional else [ann]
    inner = args[0] if len(args) == 1 else str
    if typing.get_origin(inner) is typing.Annotated:
        inner = typing.get_args(inner)[0]
    if typing.get_origin(inner) is Literal:
        return str, " One of: " + ", ".join(map(str, typing.get_args(inner))) + "."
    if typing.get_origin(inner) is dict:
        return list[str], ""
    if inner in (int, float, bool, Path):
        return inner, ""
    return str, ""


def _default_text(info: FieldInfo) -> str | None:
    if info.is_required():
        return None
    d = info.default
    if d is None or d == {}:
        return None
    return ",".join(map(str, d)) if isinstance(d, tuple) else str(d)


def _parameters(model: type[Options], exclude: set[str] = frozenset()) -> list[inspect.Parameter]:
    params = []
    own = model.__dict__.get("__annotations__", {})  # required options first, then the stage's own, shared ones after
    first = ("model", "store", "train_split", "split")
    for name, info in sorted(model.model_fields.items(), key=lambda item: (
            not item[1].is_required(), first.index(item[0]) if item[0] in first else len(first), item[0] not in own)):
        if name in exclude:
            continue
        type_, choices = _cli_type(info)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        names = [model.flag(name)] + ([f"-{extra['short']}"] if extra.get("short") else [])
        if type_ is bool:
            names = [f"{names[0]}/--no-{names[0][2:]}"]
        option = typer.Option(... if info.is_required() else None, *names, help=(info.description or "") + choices,
                              show_default=_default_text(info) or False)
        annotation = type_ if info.is_required() else Optional[type_]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave (typer passes None, or [] for lists, for the others)."""
    return {k: v for k, v in values.items() if v is not None and v != []}


def stage_command(name: str, build: Callable[[dict[str, Any]], Options],
                  models: list[tuple[type[Options], set[str]]]) -> None:
    """Register ``rep-pipeline <name>``: flags from ``models``' fields, ``build`` makes the config."""
    stage = STAGES[name]
    params = [p for model, exclude in models for p in _parameters(model, exclude)]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=t)
               for k, (t, opt) in RUN_OPTIONS.items()]

    def command(**values: Any) -> None:
        run_options = {k: values.pop(k) for k in RUN_OPTIONS}
        result = stage.run(build(_given(values)), **run_options)
        for line in result.summary():
            console.print(line)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = stage.help
    app.command(name)(friendly_errors(command))


def _build_report(values: dict[str, Any]) -> Options:
    """The report command compares one setting: its flags are ReportConfig's and one Comparison's."""
    where = "rep-pipeline report"
    comparison = Comparison.parse({k: v for k, v in values.items() if k in Comparison.model_fields}, where,
                                  Comparison.flag)
    rest = {k: v for k, v in values.items() if k not in Comparison.model_fields}
    return ReportConfig.parse({**rest, "comparisons": (comparison,), "models": comparison.models}, where,
                              ReportConfig.flag)


# a stage whose flags are not simply its config's fields names its own (builder, [(model, fields left out)])
CUSTOM_FLAGS = {"report": (_build_report, [(ReportConfig, {"comparisons", "title", "models"}), (Comparison, set())])}

for _name, _stage in STAGES.items():
    _build, _models = CUSTOM_FLAGS.get(_name, (functools.partial(_stage.config.parse, where=f"rep-pipeline {_name}",
                                                                 names=_stage.config.flag),
                                               [(_stage.config, set())]))
    stage_command(_name, _build, _models)


# -- commands that are not stages ---------------------------------------------------------------
@app.command()
@friendly_errors
def run(
    config_file: Path = typer.Argument(..., help="Run config (YAML), e.g. configs/demo.yaml."),
    address: Optional[str] = RUN_OPTIONS["address"][1],
    progress: bool = RUN_OPTIONS["progress"][1],
    storage_option: list[str] = STORAGE_OPTION,
    set_: list[str] = typer.Option([], "--set", help="Change the config: SECTION.KEY=VALUE (value read as YAML), "
                                                    "e.g. dataset.limit=20 or cluster.steps=200; repeatable."),
    data_root: list[str] = typer.Option([], "--data-root", help="NAME=PATH: the root of dataset NAME wherever the "
                                                               "config names it, e.g. cocostuff27=data/cocostuff; "
                                                               "repeatable."),
    stand_in: Optional[str] = typer.Option(None, "--stand-in", help="tiny: replace every model by a tiny, randomly "
                                                                   "initialised one of its architecture path (same "
                                                                   "store keys): the whole run without weights."),
) -> None:
    """extract -> cluster -> evaluate -> report from one config, skipping finished work (a
    config of several YAML documents runs each in turn)."""
    from rep_pipeline.cli.run import STAND_INS, Overrides, load_runs, run_all

    if stand_in is not None and stand_in not in STAND_INS:
        raise ConfigError(f"--stand-in: one of {', '.join(STAND_INS)}, got {stand_in!r}")
    for flag, values in (("--set", set_), ("--data-root", data_root)):
        bad = [v for v in values if "=" not in v or not v.split("=", 1)[0]]
        if bad:
            raise ConfigError(f"{flag} {bad[0]!r}: expected KEY=VALUE")
    overrides = Overrides(values=tuple((k.strip(), load_value(v, f"--set {k.strip()}")) for k, v in (x.split("=", 1) for x in set_)),
                          data_roots=tuple(tuple(v.split("=", 1)) for v in data_root), stand_in=stand_in)
    runs = load_runs(config_file, storage_options=parse_key_values(storage_option), overrides=overrides)
    for cfg in runs:  # every document validated before the first runs
        result = run_all(cfg, address=address, progress=progress, say=console.print)
        console.print(_said("done", "bold green", f" {cfg.title} in {result.seconds:.0f} s. Report: {result.report}"))


@app.command()
@friendly_errors
def query(
    results: str = typer.Argument(..., help="Results folder written by evaluate (a path or object-storage URL)."),
    sql: str = typer.Argument(..., help="A query; the result tables are views by their names."),
    limit: int = typer.Option(50, help="Rows to print at most."),
    storage_option: list[str] = STORAGE_OPTION,
) -> None:
    """Query the result tables with DuckDB, confined to them (no file, network or extension access)."""
    from rep_pipeline.pipeline.results import Results

    columns, rows = Results(_located(results, storage_option)).fetch_rows(sql, limit)
    table = Table(*columns)
    for row in rows:
        table.add_row(*(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


@app.command("partpairs")
@friendly_errors
def partpairs(
    data_root: Path = typer.Option(..., "--data-root", help="Pascal-Part folder (images/, objects/, parts/, "
                                                             "part_ids.txt)."),
    out: Path = typer.Option(..., "--out", help="New folder for the SPair-format pair set (read it with "
                                                "`extract --dataset spair71k --data-root OUT --splits test`)."),
) -> None:
    """Write an SPair-format keypoint pair set from Pascal-Part annotations (PROTOCOL.md s. 11.5)."""
    from rep_pipeline.pipeline.datasets.partpairs import build_partpairs

    summary = build_partpairs(data_root, out)
    console.print(f"{out}: {summary.n_pairs} pairs, {summary.n_keypoints} keypoints from {summary.n_images} images")
    for category, counts in sorted(summary.per_category.items()):
        console.print(f"  {category}: {counts}")


@app.command("models")
@friendly_errors
def list_models_cmd(pattern: str = typer.Argument("*", help="Glob over aliases and timm names.")) -> None:
    """List the registered models."""
    from rep_pipeline.pipeline.registry import list_models

    table = Table("alias", "timm name", "family", "size", "weights")
    for spec in list_models(pattern):
        table.add_row(spec.alias, spec.timm_name, spec.family, spec.size,
                      "hub" if spec.hub else ("checkpoint file" if spec.weights_hint else "random only"))
    console.print(table)


def _layer_span(layers: list[int]) -> str:
    """``4 (0..3)`` for a range of blocks, ``3 (0,5,11)`` for any other choice."""
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{len(layers)} ({layers[0]}..{layers[-1]})"
    return f"{len(layers)} ({','.join(map(str, layers))})"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


@store_app.command("check")
@friendly_errors
def store_check(
    path: str = typer.Argument(..., help="Feature store (a folder or object-storage URL)."),
    group: Optional[str] = typer.Option(None, help="Only this group (and what is under it), e.g. "
                                                   "models/dino-b16/cocostuff27/val2017."),
    repair: bool = typer.Option(False, help="Mark every bad chunk pending (a bad codebook layer untrained), so "
                                            "the same extract (or cluster) command recomputes it."),
    storage_option: list[str] = STORAGE_OPTION,
) -> None:
    """Read every chunk: it must decode to its shape and dtype, be finite, and agree with the
    done flags. Problems are listed by array and chunk; exit code 1 if any (and not repaired)."""
    from rep_pipeline.pipeline.store import check_store

    report = check_store(_located(path, storage_option), group=group, repair=repair)
    for problem in report.problems:
        console.print(_said("problem:", "red", f" {problem}"), highlight=False)
    for fix in report.repairs:
        console.print(_said("repaired:", "yellow", f" {fix}"), highlight=False)
    if report.problems and not report.repairs:
        raise typer.Exit(1)
    console.print(_said("store valid", "green", ": every chunk decodes") if not report.problems else
                  f"{len(report.repairs)} repairs made; run the commands named above")


@store_app.command("info")
@friendly_errors
def store_info(
    path: str = typer.Argument(..., help="Feature store (a folder or object-storage URL)."),
    chunks: bool = typer.Option(False, "--chunks", help="Also list, per image chunk, which node, host and process "
                                                        "wrote it, when, and how long it took."),
    storage_option: list[str] = STORAGE_OPTION,
) -> None:
    """What is inside a store, how complete, how big; exit code 1 if its layout is invalid."""
    from rep_pipeline.pipeline.store import FeatureStore, validate_store

    path = _located(path, storage_option)
    problems = validate_store(path)
    if problems:  # the summary below reads every group: only of a store that parses
        console.print(_said("layout problems:", "bold red", "\n  " + "\n  ".join(problems)), highlight=False)
        raise typer.Exit(1)
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
                        ",".join(m["embeddings"]), f"{m['grid']}x{m['grid']} x {m['embed_dim']}",
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
    if chunks:
        store = FeatureStore(path)
        for m, d, sp in store.model_splits():
            c_table = Table("chunk", "node", "host", "pid", "written (UTC)", "seconds",
                            title=f"{path}: models/{m}/{d}/{sp} chunks", title_justify="left")
            for i, who in enumerate(store.model_split(m, d, sp).provenance()):
                who = who or {}
                c_table.add_row(str(i), str(who.get("node") or "-")[:12], str(who.get("host", "-")),
                                str(who.get("pid", "-")), str(who.get("written", "-")),
                                f"{who['seconds']:.2f}" if "seconds" in who else "-")
            console.print(c_table)
    console.print(_said("layout valid", "green", f" (schema version {info['schema_version']}); `rep-pipeline store "
                                                "check` reads every chunk"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
