"""The `hybrid` command line: thin wiring over the library functions.

Each command is a row of the commands table (hybrid/commands.py: the name as typed, its config
dataclass, the function it runs), registered here with `@command(name)` above the body that calls
the function and prints. A workflow command is built from its config dataclass
(`hybrid.config.from_config`): every field is a flag with its help and real default, YAML
(`--config`) loads into the same dataclass, and flags win. Every command turns bad input
(`InputError`, and the command line's own usage errors) into one line `error: ...` on stderr and
exit code 2; no traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Literal, Optional

import typer
from typer import _click
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import Abort

from hybrid.tune_calibrate import CalibrateConfig, calibrate
from hybrid.commands import COMMANDS
from hybrid.config import flag_of, from_config, metavar
from hybrid.eval_retrieval import evaluate_retrieval, markdown_table, write_report
from hybrid.eval import EvalConfig, markdown, run_eval
from hybrid.ask import AskConfig
from hybrid.pipeline import Pipeline
from hybrid.serve import ServeConfig
from retrieval.tune_embedder import EmbedderTuneConfig, tune_embedder
from core.errors import InputError, speaking_flags
from retrieval.index import IndexConfig, build_index
from retrieval.tune_reranker import RerankerTuneConfig, tune_reranker
from retrieval.retriever import Retriever, SearchConfig
from tuning.tune_dpo import DPOTuneConfig, tune_dpo
from tuning.tune_judge import JudgeTuneConfig, tune_judge
from tuning.tune_probe import ProbeTuneConfig, tune_probe
from tuning.tune_generator import GeneratorTuneConfig, tune_generator
from tuning.synth import SynthConfig, synthesize

class OneLineErrors(TyperGroup):
    """Usage errors (an unknown flag, a non-integer -k, a missing argument) as one `error:` line, exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            code = 0
        except _click.exceptions.UsageError as exc:
            typer.echo(f"error: {exc.format_message()} (see '{exc.ctx.command_path if exc.ctx else 'hybrid'} --help')",
                       err=True)
            code = 2
        except _click.exceptions.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except Abort:
            typer.echo("interrupted; nothing was replaced", err=True)
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


class ReadableHelp(TyperCommand):
    """--help naming values as a person reads them: an option without a metavar gets one from its type
    (`--out PATH`, not Typer's `--out <path>`), and an argument shows its metavar alone (not `QA <str>`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for p in self.params:
            if p.param_type_name == "option" and not p.is_flag and p.metavar is None:
                p.metavar = metavar(p.name, p.type_descriptor.annotation)

    @staticmethod
    def _argument(p) -> str:
        return (p.metavar or p.name.upper()) + ("..." if p.nargs != 1 else "")

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:  # QA, not Typer's {QA}
        args = [p for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [self.options_metavar] + [self._argument(p) if p.required else f"[{self._argument(p)}]" for p in args]

    def format_options(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        params = [p for p in self.get_params(ctx) if not p.hidden]
        args = [(self._argument(p), p.get_help_record(ctx)[1]) for p in params if p.param_type_name == "argument"]
        opts = [p.get_help_record(ctx) for p in params if p.param_type_name == "option"]
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class Commands(typer.Typer):
    """A Typer whose commands print ReadableHelp."""

    def command(self, *args, **kwargs):
        return super().command(*args, cls=ReadableHelp, **kwargs)


def _version(show: bool) -> None:
    if show:
        from hybrid import __version__

        typer.echo(f"hybrid {__version__}")
        raise typer.Exit(0)


app = Commands(cls=OneLineErrors, help="hybrid: make a retriever and a small LLM learn your documents, and measure "
               "how often the answers are made up.", no_args_is_help=True, pretty_exceptions_enable=False,
               add_completion=False, rich_markup_mode=None)
tune_app = Commands(help="Fine-tune a stage on your corpus.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tune_app, name="tune")
config_app = Commands(help="Inspect a loop config.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
GROUPS = {None: app, "tune": tune_app, "config": config_app}  # a command's group: its name's first word


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                          help="Print hybrid's version and exit.")) -> None:
    pass  # only --version: the group's help is the Typer's own


def _offline() -> None:
    # hybrid never downloads: make every Hugging Face library fail fast instead of trying.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # datasets' per-map progress bars (TRL tokenising) are library chatter, not a stage of ours.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # On two cores or fewer, one torch thread beat two whenever anything else ran (training 0.14-0.57x,
    # generating 0.21-0.50x with two), while on an idle machine two won (training 1.40x, encoding 1.82x;
    # benchmarks/performance/speed.py, docs/benchmarks/speed.md): one thread unless the machine is idle when the
    # command starts. A caller's own OMP_NUM_THREADS wins. Set before torch is imported.
    if (os.cpu_count() or 1) <= 2 and os.getloadavg()[0] >= 0.5:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Other libraries' notices that tell a user nothing are silenced one by one when `retrieval` is imported,
    # for library users too: core/quiet_libraries.py.


def cli_errors(fn):
    """Map InputError to `error: ...` + exit 2, and Ctrl-C to exit 130; errors name settings as flags."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _offline()
        # force: each command writes to the stderr of its own invocation (CliRunner swaps it per run)
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", force=True)
        with speaking_flags(flag_of):
            return _one_line_errors(fn, *args, **kwargs)
    return wrapper


def command(name: str):
    """Register the decorated body as the command `name` of the table (hybrid/commands.py): under its
    group, every field of the row's config dataclass a flag (and `--config` YAML), errors as one line."""
    row = COMMANDS[name]

    def register(body):
        return GROUPS[row.group].command(row.leaf)(cli_errors(from_config(row.config)(body) if row.config else body))
    return register


def _one_line_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was replaced", err=True)
        raise typer.Exit(130) from None
    except OSError as exc:  # the file system said no (disk full, a path through a file, permissions)
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}; check the path and free space, then rerun "
                   f"(nothing was replaced)", err=True)
        raise typer.Exit(2) from None


def _stderr(quiet: bool):
    """Where a workflow's progress lines go: stderr, or nowhere under --quiet (warnings still show)."""
    return (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))


QUIET = typer.Option(False, "--quiet", "-q", help="Print the summary only (no progress bars, no memory plan).")
TRACK = typer.Option("none", "--track", metavar="none|mlflow", help="mlflow: record this run (settings, metrics, small outputs; never document "
                                             "text) in $MLFLOW_TRACKING_URI, else ./mlflow.db; none: nothing.")


def _tracking_ready(track: str) -> None:
    """`--track mlflow`: the store checked before any work, so an unreachable or unwritable one is one
    line within seconds, not a failure after an hour of training."""
    if track == "none" or os.environ.get("RANK", "0") != "0":
        return
    from hybrid.tracking import TrackingConfig, start

    start(TrackingConfig(), Path.cwd())


def _track(track: str, name: str, cfg, stage_out: str | Path, groups) -> None:
    """`--track mlflow`: the run as hybrid run logs the stage (rank 0 only under a launcher)."""
    if track == "none" or os.environ.get("RANK", "0") != "0":
        return
    from hybrid.tracking import track_command

    run_id = track_command(name, cfg, Path(stage_out), list(groups or []))
    typer.echo(f"tracked: MLflow run {run_id}", err=True)
AS_JSON = typer.Option(False, "--json", help="Print the result as JSON.")


@command("index")
def index_cmd(
    cfg: IndexConfig,
    corpus_dir: Path = typer.Argument(..., metavar="CORPUS_DIR", help="Directory of .md/.txt/.jsonl(/.pdf) documents."),
    out: Path = typer.Option(..., "--out", help="Index directory to create or update (atomically)."),
    quiet: bool = QUIET,
    track: Literal["none", "mlflow"] = TRACK,
):
    """Chunk, embed and index a corpus. Re-running embeds only new or changed documents."""
    _tracking_ready(track)
    if not quiet:  # progress through long documents is logged at INFO
        logging.getLogger("retrieval").setLevel(logging.INFO)
    rep = build_index(corpus_dir, out, cfg, progress=not quiet)
    for where, why in rep.skipped_files:
        typer.echo(f"skipped {where}: {why}", err=True)
    typer.echo(f"indexed {rep.documents} documents ({rep.embedded_documents} embedded, {rep.reused_documents} reused, "
               f"{rep.deleted_documents} dropped, {len(rep.skipped_files)} files skipped) -> {rep.chunks} chunks, "
               f"{rep.index_type} index at {out} in {rep.seconds:.1f}s ({rep.precision})")
    _track(track, "index", cfg, out, [])  # counts only: no text of any group is logged


@command("search")
def search_cmd(cfg: SearchConfig, as_json: bool = typer.Option(
        False, "--json", help='Print {"hits": [{"doc_id", "chunk_id", "score", "title", "text"}]}.')):
    """Search an index (access control applied)."""
    hits = Retriever.load(cfg.index, reranker=cfg.rerank, precision=cfg.precision).search(cfg.query, k=cfg.k, groups=cfg.groups or None,
                                                                 mode=cfg.mode)
    if as_json:
        typer.echo(json.dumps({"hits": [h.to_dict() for h in hits]}, ensure_ascii=False))
        return
    for i, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())[:160]
        typer.echo(f"{i}. [{h.score:.3f}] {h.title} ({h.chunk_id})\n   {snippet}")
    if not hits:
        typer.echo("no visible documents")


@command("synth")
def synth_cmd(cfg: SynthConfig, quiet: bool = QUIET, track: Literal["none", "mlflow"] = TRACK):
    """Write training questions from the index's own chunks with a local teacher, each checked against the
    documents (span, round trip, consistency, duplicates); resumes an interrupted run."""
    _tracking_ready(track)
    synthesize(cfg, progress=not quiet, log=typer.echo)
    _track(track, "synth", cfg, Path(cfg.out).parent, cfg.groups)


@command("tune embedder")
def tune_embedder_cmd(cfg: EmbedderTuneConfig, quiet: bool = QUIET, as_json: bool = AS_JSON,
                      track: Literal["none", "mlflow"] = TRACK):
    """Contrastive fine-tuning of the embedder (MNRL + hard negatives mined from the index)."""
    _tracking_ready(track)
    res = tune_embedder(cfg, progress=not (quiet or as_json))
    _track(track, "embedder", cfg, cfg.out, cfg.train.groups)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(res)))
        return
    typer.echo(f"\n{res.train_pairs} training pairs ({res.pairs_source}), {res.test_queries} held-out queries, "
               f"{res.seconds}s; tuned model saved to {cfg.out}\n")
    typer.echo(markdown_table({"base": res.base, "tuned": res.tuned}))
    typer.echo(f"rebuild the index with it: hybrid index CORPUS_DIR --out INDEX_DIR --embedder {cfg.out}")


@command("tune reranker")
def tune_reranker_cmd(cfg: RerankerTuneConfig, quiet: bool = QUIET, as_json: bool = AS_JSON):
    """Train a cross-encoder that re-scores the first stage's top N (hard negatives mined from the index)."""
    res = tune_reranker(cfg, progress=not (quiet or as_json))
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(res)))
        return
    typer.echo(f"\n{res.train_queries} training questions ({res.pairs_source}, {res.train_negatives} hard "
               f"negatives), {res.test_queries} held-out, {res.seconds}s; reranker saved to {cfg.out}\n")
    typer.echo(markdown_table({f"{res.mode} (first stage)": res.first_stage,
                               f"{res.mode} + reranker (top {res.candidates})": res.reranked}))
    if res.worse_than_first_stage:
        typer.echo("warning: the reranker orders the held-out questions worse than the first stage alone (MRR@10 "
                   f"{res.reranked['mrr@10']:.3f} < {res.first_stage['mrr@10']:.3f}); do not use it: train "
                   f"longer (--epochs, --max-steps) or on more questions", err=True)
        return
    typer.echo(f"use it: hybrid search QUERY --index {cfg.index} --rerank {cfg.out}")


@command("tune generator")
def tune_generator_cmd(cfg: GeneratorTuneConfig, quiet: bool = QUIET, track: Literal["none", "mlflow"] = TRACK):
    """RAFT fine-tuning of the generator (LoRA on CPU, QLoRA on CUDA) with a memory plan."""
    _tracking_ready(track)
    rec = tune_generator(cfg, progress=not quiet, log=_stderr(quiet))
    _track(track, "generator", cfg, cfg.out, cfg.train.groups)
    typer.echo(f"{rec.strategy} adapter saved to {cfg.out}: {rec.steps} steps in {rec.minutes} min, "
               f"{rec.examples} examples ({rec.with_oracle} with oracle, {rec.abstain_targets} abstain targets), "
               f"final validation loss {rec.final_val_loss if rec.final_val_loss is not None else '-'}; "
               f"loss curve {cfg.out}/loss.png")


@command("tune dpo")
def tune_dpo_cmd(cfg: DPOTuneConfig, quiet: bool = QUIET, track: Literal["none", "mlflow"] = TRACK):
    """DPO for factuality: grounded answers preferred over made-up ones, on top of a RAFT adapter."""
    _tracking_ready(track)
    rec = tune_dpo(cfg, progress=not quiet, log=_stderr(quiet))
    _track(track, "dpo", cfg, cfg.out, cfg.train.groups)
    typer.echo(f"dpo adapter saved to {cfg.out}: {rec.pairs} pairs {rec.by_source}, "
               f"{rec.steps} steps in {rec.minutes} min")


@command("tune judge")
def tune_judge_cmd(cfg: JudgeTuneConfig, quiet: bool = QUIET, as_json: bool = AS_JSON):
    """Train the groundedness judge on labelled pairs; report accuracy and AUROC on --test-pairs."""
    rep = tune_judge(cfg, progress=not (quiet or as_json))
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(rep)))
        return
    for name, m in rep.tests.items():
        typer.echo(f"{name}: n={m['n']} accuracy={m['accuracy']:.3f} AUROC={m['auroc']:.3f}")
    typer.echo(f"judge saved to {cfg.out} ({rep.train_pairs} training pairs, {rep.minutes} min"
               f"{'' if rep.answerability else '; no answerability pairs: it cannot gate'})")


@command("tune calibrate")
def tune_calibrate_cmd(cfg: CalibrateConfig):
    """Choose the adapter's abstention threshold on held-out rows; ask and eval then abstain at or above it."""
    calibrate(cfg, log=typer.echo)


@command("tune probe")
def tune_probe_cmd(cfg: ProbeTuneConfig, quiet: bool = QUIET):
    """Train the answerability probe on the reader's hidden states, from questions on your documents; choose
    the rule that decides when to answer on held-out rows."""
    rep = tune_probe(cfg, progress=not quiet, log=_stderr(False))
    typer.echo(f"probe saved to {cfg.out}: {rep.rows} contexts ({rep.held_out} held out), cross-validated AUROC "
               f"answerable {rep.answerable_auroc:.3f}, right {rep.right_auroc:.3f}; held out: made-up answers "
               f"{rep.held_out_hallucination:.3f} -> {rep.held_out_hallucination_ruled:.3f} with "
               f"{rep.held_out_answered:.2f} answered ({rep.minutes} min)")


@command("ask")
def ask_cmd(cfg: AskConfig, as_json: bool = typer.Option(
        False, "--json", help='Print {"answer", "abstained", "citations", "passages", "support", "answerable", '
                              '"gated", "abstain_score", "calibrated_abstain", "calibrated_answer", "selected_from", "malformed", '
                              '"probe_answerable", "probe_score", "probe_decided"}.')):
    """Retrieve, answer from the passages, and verify every quote against them."""
    pipe = Pipeline.load(cfg.pipeline_settings())
    streamed = []
    if as_json or cfg.select:
        res = pipe.ask(cfg.question, groups=cfg.groups, adapter=cfg.answering_adapter, select=cfg.select or None)
        if as_json:
            typer.echo(json.dumps(res.to_dict(), ensure_ascii=False))
            return
        typer.echo(f"(answered by {res.selected_from}, the judge's pick)")
    else:
        # Only answers that will be served are streamed (the pipeline decides gate and calibration first).
        res = pipe.ask(cfg.question, groups=cfg.groups, adapter=cfg.answering_adapter,
                       on_token=lambda t: (streamed.append(t), typer.echo(t, nl=False)))
        if streamed:
            typer.echo("")
    note = f"  (abstained: the judge found no passage answering it, answerability {res.answerable:.2f})" if res.gated else \
        "  (abstained: the adapter's calibrated abstention score)" if res.calibrated_abstain else \
        f"  (abstained: the probe finds the passages do not answer it, answerability {res.probe_answerable:.2f})" \
        if res.probe_decided == "before" else \
        f"  (abstained: the probe's rule finds the answer likely made up, score {res.probe_score:.2f})" \
        if res.probe_decided == "after" else \
        "  (malformed completion, served as abstention: it broke the answer template)" if res.malformed else \
        "  (abstained)" if res.abstained else f"  (judge support {res.support:.2f})" if res.support is not None else ""
    typer.echo(f"answer: {res.answer}{note}")
    for c in res.citations:
        typer.echo(f"  [{'verified' if c['verified'] else 'NOT FOUND in passages'}] {c['doc_id'] or '-'}: \"{c['quote']}\"")
    typer.echo("passages: " + ", ".join(p["chunk_id"] for p in res.passages))


@command("eval")
def eval_cmd(cfg: EvalConfig, quiet: bool = QUIET,
             as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
             track: Literal["none", "mlflow"] = TRACK):
    """Factuality benchmark: accuracy, abstention and hallucination rate per configuration, with 95 % CIs."""
    if track != "none" and not cfg.out:  # refused, not a warning after the run
        raise InputError("--track mlflow needs --out DIR: the run records the report written there; add --out DIR "
                         "or drop --track")
    _tracking_ready(track)
    if cfg.only == "retrieval":
        report = evaluate_retrieval(cfg.qa, cfg.index, groups=cfg.groups, mode=cfg.mode, rerank=cfg.rerank,
                                    precision=cfg.precision)
        if cfg.out:
            write_report(report, cfg.out)
            _track(track, "eval", cfg, cfg.out, cfg.groups)
        typer.echo(json.dumps(report.to_json()) if as_json else markdown_table({"retrieval": report.metrics}))
        return
    report = run_eval(cfg, progress=not (quiet or as_json))
    if cfg.out:
        _track(track, "eval", cfg, cfg.out, cfg.groups)
    if as_json:
        typer.echo(json.dumps(report.to_json()))
    else:
        typer.echo(markdown(report))
        if cfg.out:
            out = cfg.out
            typer.echo(f"report: {out}/report.json, {out}/report.md, {out}/chart.png, {out}/predictions.jsonl")


@command("serve")
def serve_cmd(cfg: ServeConfig):
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /v1/search,
    GET /health (no key) and GET /metrics (Prometheus); API keys map to access groups."""
    from hybrid.serve import run

    run(cfg, log=lambda m: typer.echo(m, err=True))


@command("init")
def init_cmd(directory: Path = typer.Argument(..., metavar="DIR", help="Directory to write hybrid.yaml into."),
             corpus: str = typer.Option("corpora/brindle/docs", "--corpus", metavar="DIR",
                                        help="The documents the loop learns."),
             eval_qa: Optional[str] = typer.Option("corpora/brindle/qa.jsonl", "--eval-qa", metavar="FILE",
                                                   help="Hand-written questions the eval stage scores.")):
    """Write DIR/hybrid.yaml: every stage's keys with their help, type and default (for hybrid run)."""
    from hybrid.run import init

    typer.echo(f"wrote {init(directory, corpus, eval_qa)}; run it with: hybrid run {Path(directory) / 'hybrid.yaml'}")


@command("run")
def run_cmd(config: Path = typer.Argument(..., metavar="CONFIG", help="hybrid.yaml (hybrid init writes one)."),
            overrides: Optional[List[str]] = typer.Argument(None, metavar="KEY=VALUE",
                                                            help="Dotted overrides, e.g. generator.max_steps=80."),
            only: Optional[str] = typer.Option(None, "--only", metavar="STAGE,...", help="Run only these stages (comma-separated; any "
                                                                    "stage, e.g. --only serve)."),
            quiet: bool = QUIET):
    """Run the loop's stages in order (index, synth, embedder, generator, dpo, calibrate, probe, eval, serve),
    skipping those up to date (dpo, calibrate, probe and serve only when named in the file's stages or --only)."""
    from hybrid.run import load_loop, parse_only, run_loop

    stages = parse_only(only)  # `--only ,` is refused, not read as "every stage"
    cfg = load_loop(config, overrides or [])
    status = run_loop(cfg, only=stages, progress=not quiet, log=_stderr(False), overrides=overrides or [])
    typer.echo(", ".join(f"{k}: {v}" for k, v in status.items()))


@command("config show")
def config_show_cmd(config: Path = typer.Argument(..., metavar="CONFIG", help="hybrid.yaml."),
                    overrides: Optional[List[str]] = typer.Argument(None, metavar="KEY=VALUE",
                                                                    help="Dotted overrides, as for hybrid run.")):
    """Print the resolved loop config, each key with where its value came from (default, file, override)."""
    from hybrid.run import provenance

    for key, value, where in provenance(config, overrides or []):
        typer.echo(f"{key}: {json.dumps(value)}  # {where}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
