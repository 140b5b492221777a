"""The ``pipeline`` command. The only place where errors become messages and exit codes.

Exit codes: 0 success; 1 a stage failed; 2 the recipe or the command line is invalid (nothing ran);
3 a quality gate failed (artifacts kept).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.errors import QuantshipError, RecipeError

OUTPUT_DIR = click.option(
    "--output-dir", "-o", default="outputs", show_default=True, type=click.Path(file_okay=False, path_type=Path),
    help="Root of the artifact folders (outputs/<recipe>/<stage>-<key>/).",
)


def _fail(error: QuantshipError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


def _load(recipe: str):
    from pipeline.recipe_load import load_recipe
    from pipeline.rules import check_model_widths

    loaded = load_recipe(recipe)
    # Rules that need the model's config: checked now when the model is a local folder.
    src = loaded.resolve(loaded.base.model.source)
    if (src / "config.json").is_file():
        try:
            config = json.loads((src / "config.json").read_text())
        except ValueError:
            config = {}
        check_model_widths(loaded, config)
    return loaded


def _setup_logging(verbose: int, log_file: Path | None = None) -> None:
    from rich.logging import RichHandler

    root = logging.getLogger("pipeline")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    console = RichHandler(show_path=False, show_time=False, markup=False)
    console.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    root.addHandler(console)
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(logging.DEBUG)
        root.addHandler(fh)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantship")
def main() -> None:
    """quantship: quantize, compile, evaluate and serve an LLM from one recipe."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=str))
def validate(recipe: str) -> None:
    """Check a recipe (schema and cross-stage rules) without doing any work."""
    try:
        loaded = _load(recipe)
    except QuantshipError as e:
        _fail(e)
    click.echo(f"{recipe}: valid; {len(loaded.variants)} variant(s): {', '.join(loaded.variants)}")


@main.command()
def schema() -> None:
    """Print the recipe's JSON Schema (for editors)."""
    from pipeline.recipe import schema as recipe_schema

    click.echo(json.dumps(recipe_schema(), indent=2))


@main.command()
@click.argument("recipe", type=click.Path(path_type=str))
@OUTPUT_DIR
def plan(recipe: str, output_dir: Path) -> None:
    """Print the stage runs, their cache keys and which are already done. Does nothing else."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.plan import make_plan

    try:
        p = make_plan(_load(recipe), output_dir)
    except QuantshipError as e:
        _fail(e)
    from pipeline.doctor import target_status

    table = Table(title=f"plan: {p.recipe.name} -> {p.root}")
    for col in ("stage run", "variants", "key", "status", "inputs", "engine here"):
        table.add_column(col)
    statuses: dict[str, dict] = {}
    for r in p.runs:
        status = "[green]cached" if r.done() else "[yellow]will run"
        here = ""
        if r.kind in ("compile", "serve"):
            compile_cfg = p.recipe.variants[r.variants[0]].compile
            target = compile_cfg.target
            st = statuses.setdefault(target, target_status(target))
            device = compile_cfg.device
            dev = st["devices"].get(device) if device != "auto" else None
            runs, why = (dev["runs"], dev["why"]) if dev else (st["run"], st["why"])
            here = f"{target}: runs here" if runs else f"{target}: inputs only here ({why})"
        table.add_row(r.id, ",".join(r.variants), r.key12, status, ", ".join(r.deps.values()), here)
    Console(width=160).print(table)


@main.command()
@click.argument("recipe", type=click.Path(path_type=str))
@OUTPUT_DIR
@click.option("--force", multiple=True, metavar="STAGE", help="Rerun a stage (kind or run id) and what follows it.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: stage runs one after another here; ray: independent runs (variants) as Ray tasks "
              "(needs the [ray] extra; the output root must be on storage every Ray node sees).")
@click.option("--address", default=None, metavar="ADDRESS", help="With --executor ray: the Ray cluster to use "
              "(host:port; default: RAY_ADDRESS, else a new local cluster).")
@click.option("-v", "--verbose", count=True, help="-v: stage log lines; -vv: debug.")
def run(recipe: str, output_dir: Path, force: tuple[str, ...], executor: str, address: str | None,
        verbose: int) -> None:
    """Run a recipe: every stage that is not already done."""
    from rich.console import Console

    from pipeline.plan import make_plan
    from pipeline.progress import RunProgress
    from pipeline.runner import execute

    try:
        p = make_plan(_load(recipe), output_dir)
        known = {r.id for r in p.runs} | {r.kind for r in p.runs}
        unknown = [f for f in force if f not in known]
        if unknown:
            raise RecipeError(f"--force {unknown[0]}: no such stage in this plan; stages: {', '.join(sorted(known))}.")
        if address and executor != "ray":
            raise RecipeError(f"--address {address}: only the Ray executor uses a cluster address. Add --executor ray, "
                              "or leave --address out.")
        from pipeline.executors import make_executor

        runs_on = make_executor(executor, address)
    except QuantshipError as e:
        _fail(e)
    _setup_logging(verbose, p.root / "run.log")
    console = Console(stderr=True)
    with _quiet_third_party(verbose), RunProgress(console) as progress:
        try:
            outcome = execute(p, set(force), progress, runs_on)
        except QuantshipError as e:  # the executor could not start (cluster, shared storage): nothing ran
            _fail(e)
    _print_table(outcome.rows, f"{p.recipe.name}: variants")
    for run_id, error in outcome.errors.items():
        click.echo(f"error: {error}", err=True)
    for variant, failures in outcome.gate_failures.items():
        for f in failures:
            click.echo(f"quality gate failed for variant '{variant}': {f}", err=True)
    worked = outcome.worked()
    click.echo(
        f"{p.recipe.name}: {len(worked)} stage run(s) executed, "
        f"{sum(1 for s in outcome.statuses.values() if s == 'cached')} cached; outputs in {p.root}"
    )
    if outcome.report:
        click.echo(f"report: {outcome.report} (and report.html)")
    for r in p.runs:
        if r.kind == "publish" and outcome.statuses.get(r.id) in ("done", "cached"):
            click.echo(f"published {', '.join(r.variants)}: {r.config['to']}"
                       f"{' (cached: published earlier)' if outcome.statuses[r.id] == 'cached' else ''}")
    if outcome.gate_failures and not outcome.errors:
        click.echo(f"{len(outcome.gate_failures)} variant(s) failed a quality gate: exit 3; nothing is published "
                   f"for {', '.join(outcome.gate_failures)}.", err=True)
    if outcome.exit_code:
        sys.exit(outcome.exit_code)
    keep = [v for v, r in p.recipe.variants.items() if r.serve and r.serve.keep_running]
    if keep:
        from pipeline.stages.serve import serve_artifact

        compile_dir = p.run(p.variant_runs[keep[-1]]["compile"]).dir
        cfg = p.recipe.variants[keep[-1]].serve
        key = cfg.api_key.get_secret_value() if cfg.api_key else None
        try:
            serve_artifact(compile_dir, cfg.host, cfg.port or 8000, key, f"{p.recipe.name}-{keep[-1]}",
                           on_ready=_announce(key), limits=cfg.engine_limits())
        except QuantshipError as e:
            _fail(e)


class _quiet_third_party:
    """Within a run without -v: transformers' and huggingface_hub's progress bars off, and transformers' warning
    lines go to run.log instead of the terminal (the run shows its own progress); restored afterwards, so code
    that imports pipeline keeps its own settings."""

    def __init__(self, verbose: int) -> None:
        self.verbose = verbose
        self.undo: list = []

    def __enter__(self):
        if self.verbose:
            return self
        try:
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            hf_logging.disable_default_handler()  # its stderr handler; the records still reach run.log
            hf_root = logging.getLogger("transformers")
            files = [h for h in logging.getLogger("pipeline").handlers if isinstance(h, logging.FileHandler)]
            for h in files:
                hf_root.addHandler(h)
            self.undo.append(lambda: (hf_logging.enable_default_handler(), [hf_root.removeHandler(h) for h in files],
                                      hf_logging.enable_progress_bar() if bars else None))
        except ImportError:
            pass
        try:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

            if not are_progress_bars_disabled():
                disable_progress_bars()
                self.undo.append(enable_progress_bars)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()


def _print_table(rows: list, title: str) -> None:
    """The report's table (the same cells as report.md) on stdout, verdicts coloured."""
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table

    from pipeline.eval.report import table as report_table

    headers, cells = report_table(rows)
    console = Console()
    if not console.is_terminal:  # piped or captured (a log, CI): as wide as the table needs, never wrapped
        console = Console(width=1000)
    colors = {"pass": "green", "regression": "red", "failed run": "yellow"}
    t = Table(title=title, title_justify="left")
    for h in headers:
        t.add_column(h, justify="left" if h in ("variant", "method", "target", "verdict", "gates") else "right")
    at = headers.index("verdict") if "verdict" in headers else None
    for row, texts in zip(rows, cells):
        color = colors.get(row.get("verdict"))
        if color and at is not None:
            texts = [*texts[:at], f"[{color}]{texts[at]}[/]", *texts[at + 1:]]
        t.add_row(*texts)
    console.print(t)


@main.command()
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", default="compare", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where report.md, report.html, the plots and report.json go.")
def compare(run_dirs: tuple[Path, ...], out: Path) -> None:
    """One comparison report across separate runs: each RUN_DIR is a run's folder, outputs/<recipe>/ (with
    plan.json); its variants appear as <recipe>/<variant>."""
    from pipeline.eval.collect import collect_rows, read_plan, saved_gates, write_report_files

    rows: list = []
    gates: dict = {}
    try:
        for d in run_dirs:
            plan = read_plan(d)
            name = plan.get("name") or d.resolve().name
            if any(r["variant"].startswith(f"{name}/") for r in rows):
                name = f"{d.resolve().parent.name}/{name}"  # the same recipe run into two output roots
            run_gates = saved_gates(d, plan) or {}
            rows += collect_rows(d, gates=run_gates, prefix=f"{name}/")
            gates.update({f"{name}/{v}": g for v, g in run_gates.items()})
    except QuantshipError as e:
        _fail(e)
    report = write_report_files(out, rows, "quantship comparison", gates,
                                subtitle="runs: " + ", ".join(str(d) for d in run_dirs))
    _print_table(rows, "comparison")
    click.echo(f"report: {report} (and report.html)")


@main.command()
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="List what would go where (files, bytes, destination); write nothing.")
@click.option("--to", default=None, metavar="URL", help="hf://ORG/NAME or file:///PATH ({variant}, {recipe} filled "
              "in) instead of the recipe's publish.to.")
@click.option("--variant", "variants", multiple=True, metavar="NAME", help="Publish only this variant (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace a different publication at a file:// destination.")
def publish(run_dir: Path, dry_run: bool, to: str | None, variants: tuple[str, ...], overwrite: bool) -> None:
    """Publish a finished run's variants whose quality gates passed (RUN_DIR is outputs/<recipe>/); a variant that
    failed a gate is never published, and the command then exits 3. The hub token comes from HF_TOKEN or
    `hf auth login`."""
    from pipeline.artifacts import new_tmp_dir
    from pipeline.release.publish import listing, publish_release, releases_of_run

    try:
        releases, refused = releases_of_run(run_dir, to, variants, overwrite)
        for variant, why in refused:
            click.echo(f"not published: {variant}: {why}", err=True)
        for rel in releases:
            if dry_run:
                files = listing(rel)
                total = sum(b for _, b in files if b >= 0)
                click.echo(f"{rel.variant} -> {rel.destination} ({len(files)} files, {total:,} bytes + manifest)")
                for path, size in files:
                    click.echo(f"  {path}  {'(written at publish)' if size < 0 else f'{size:,} bytes'}")
                continue
            receipt = publish_release(rel, new_tmp_dir(Path(run_dir).resolve() / f"release-{rel.variant}"))
            click.echo(f"{rel.variant}: {receipt['status']} {receipt['destination']} ({len(receipt['files'])} files, "
                       f"{receipt['bytes']:,} bytes){' commit ' + receipt['commit'] if receipt.get('commit') else ''}")
    except QuantshipError as e:
        _fail(e)
    if dry_run:
        click.echo("dry run: nothing was written.")
    if any(why.startswith("regression") for _, why in refused):
        sys.exit(3)
    if refused:
        sys.exit(1)


@main.command()
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
def verify(folder: Path) -> None:
    """Recompute the sha256 of every file of an artifact folder (or of every artifact in a run's outputs/<recipe>/
    folder) and name any file changed, missing or added since its manifest was written. Exits 1 on a mismatch."""
    from pipeline.verify import VerifyError, explain, pointer_note, verify_tree

    try:
        results = verify_tree(folder)
    except QuantshipError as e:
        _fail(e)
    for artifact, problems in results.items():
        click.echo(f"{'ok' if not problems else 'FAILED'}  {artifact.name}"
                   + (f": {', '.join(str(p) for p in problems)}" if problems else ""))
        note = pointer_note(artifact)
        if note:
            click.echo(f"    note: {note}")
    if any(results.values()):
        _fail(VerifyError(explain(results)))
    click.echo(explain(results))


def _announce(api_key: str | None):
    """``on_ready`` for serve_artifact: the URL, the model id and an example request (never the key itself)."""

    def ready(url: str, model_name: str) -> None:
        auth = ' -H "Authorization: Bearer $QUANTSHIP_API_KEY"' if api_key else ""
        body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
        click.echo(f"serving '{model_name}' at {url}/v1 (OpenAI API; Ctrl-C or SIGTERM stops it)")
        click.echo(f"  curl {url}/v1/chat/completions -H \"Content-Type: application/json\"{auth} -d '{body}'")

    return ready


@main.command()
@click.argument("target", metavar="RECIPE_OR_DIR", type=click.Path(exists=True, path_type=Path))
@click.option("--variant", default=None, metavar="NAME",
              help="With a recipe: which variant's compiled artifact (default: the first quantized one).")
@OUTPUT_DIR
@click.option("--model-name", default=None, help="The model id clients send (default: <recipe>-<variant>, or the "
              "artifact's own name).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="QUANTSHIP_API_KEY", default=None, show_envvar=True,
              help="Require this bearer key (or set QUANTSHIP_API_KEY).")
@click.option("--max-batch-size", type=click.IntRange(1, 4096), default=None,
              help="Embedded server: sequences decoded together (default: the recipe's serve.max_batch_size, 16).")
@click.option("--max-queued", type=click.IntRange(0), default=None,
              help="Embedded server: sequences that may wait for the batch before requests get a 429 (default: the "
              "recipe's serve.max_queued, 256).")
@click.option("--max-queued-tokens", type=click.IntRange(0), default=None,
              help="Embedded server: tokens waiting sequences may reserve before requests get a 429 (default: the "
              "recipe's serve.max_queued_tokens, no cap).")
@click.option("--decode", type=click.Choice(["auto", "eager", "graphs", "graphs+compile"]), default=None,
              help="Embedded server's decode step: graphs = static KV cache + CUDA graphs (default: the recipe's "
              "serve.decode; auto = graphs+compile on CUDA, eager elsewhere).")
def serve(target: Path, variant: str | None, output_dir: Path, model_name: str | None, host: str, port: int,
          api_key: str | None, max_batch_size: int | None, max_queued: int | None,
          max_queued_tokens: int | None, decode: str | None) -> None:
    """Serve a finished run's compiled variant (RECIPE_OR_DIR a recipe file), or a compile artifact
    (outputs/<recipe>/compile-<key>/) or model folder, until SIGINT/SIGTERM."""
    from pipeline.stages.serve import recipe_artifact, serve_artifact

    limits: dict = {}
    try:
        if target.is_dir():
            if variant is not None:
                raise RecipeError(f"--variant {variant}: {target} is a folder, not a recipe; --variant picks a "
                                  "variant of a recipe file. Pass the recipe, or leave --variant out.")
            artifact = target
        else:
            loaded = _load(str(target))
            artifact, recipe_model = recipe_artifact(loaded, output_dir, variant)
            served = loaded.variants[recipe_model[len(loaded.name) + 1:]].serve  # the id is <recipe>-<variant>
            limits = served.engine_limits() if served is not None else {}
            model_name = model_name or recipe_model
    except QuantshipError as e:
        _fail(e)
    flags = {"max_batch_size": max_batch_size, "max_queued": max_queued, "max_queued_tokens": max_queued_tokens,
             "decode": decode}
    limits.update({k: v for k, v in flags.items() if v is not None})
    _setup_logging(1)
    try:
        serve_artifact(artifact, host, port, api_key, model_name, on_ready=_announce(api_key), limits=limits)
    except QuantshipError as e:
        _fail(e)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def doctor(as_json: bool) -> None:
    """What this machine has, and which targets it can build and run."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.doctor import probe

    facts = probe()
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    console = Console(width=140)
    console.print(f"python {facts['python']} on {facts['platform']}")
    device = f"CUDA {facts['cuda_version']}: {', '.join(facts['gpus'])}" if facts["cuda"] else "no CUDA device"
    console.print(f"torch {facts['packages']['torch']}, {device}; Ascend NPU: {'yes' if facts['ascend'] else 'no'}; "
                  f"CPU int4 kernel: {'yes' if facts['cpu_int4_kernel'] else 'no'}")
    pk = Table(title="packages")
    pk.add_column("package")
    pk.add_column("version")
    for name, version in facts["packages"].items():
        pk.add_row(name, version or "[dim]not installed")
    console.print(pk)
    tg = Table(title="targets")
    for col in ("target", "build", "here", "why"):
        tg.add_column(col)
    for name, st in facts["targets"].items():
        tg.add_row(name, "yes" if st["build"] else "no", st["status"], st["why"])
    console.print(tg)


if __name__ == "__main__":
    main()
