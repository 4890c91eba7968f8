"""The `hybrid` command line: thin wiring over the library functions.

Every command turns bad input (`InputError`) into one line on stderr and exit
code 2; no traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from hybrid.config import build_config, default_of
from retrieval.errors import InputError
from retrieval.index import IndexConfig
from retrieval.embedder_tuning import EmbedderTuneConfig
from tuning.sft import GeneratorTuneConfig

app = typer.Typer(help="hybrid: make a retriever and a small LLM learn your documents, and measure how often "
                       "the answers are made up.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False, rich_markup_mode=None)
tune_app = typer.Typer(help="Fine-tune a stage on your corpus.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tune_app, name="tune")


def _offline() -> None:
    # hybrid never downloads: make every Hugging Face library fail fast instead of trying.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers 5 renames (gradient_checkpointing -> activation_checkpointing) warn on every run.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes warns on import about optional CPU kernels hybrid does not use.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cli_errors(fn):
    """Map InputError to `error: ...` + exit 2, and Ctrl-C to exit 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _offline()
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; nothing was replaced", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _d(cls, name) -> str:
    return f"[default: {default_of(cls, name)}]"


def _opt(path: Optional[Path]) -> Optional[str]:
    """An optional path flag as the config's string (None = not given: YAML or the default decides)."""
    return str(path) if path is not None else None


@app.command("index")
@cli_errors
def index_cmd(
    corpus_dir: Path = typer.Argument(..., help="Directory of .md/.txt/.jsonl(/.pdf) documents."),
    out: Path = typer.Option(..., "--out", help="Index directory to create or update (atomically)."),
    embedder: Optional[str] = typer.Option(None, help="Local sentence-transformers model dir [default: packaged all-MiniLM-L6-v2]."),
    chunk_tokens: Optional[int] = typer.Option(None, help=f"Max embedder tokens per chunk {_d(IndexConfig, 'chunk_tokens')}."),
    overlap: Optional[int] = typer.Option(None, help=f"Tokens shared by consecutive chunks {_d(IndexConfig, 'overlap')}."),
    index_type: Optional[str] = typer.Option(None, help="auto | flat | hnsw | ivf; auto = exact below --ann-threshold chunks, HNSW above [default: auto]."),
    ann_threshold: Optional[int] = typer.Option(None, help=f"Chunk count from which auto picks HNSW {_d(IndexConfig, 'ann_threshold')}."),
    on_bad_file: Optional[str] = typer.Option(None, help="skip (warn and count) or fail on unreadable, non-UTF-8 or empty files [default: skip]."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any IndexConfig field (flags win)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Chunk, embed and index a corpus. Re-running embeds only new or changed documents."""
    from retrieval.index import build_index

    cfg = build_config(IndexConfig, config, embedder=embedder, chunk_tokens=chunk_tokens, overlap=overlap,
                       index_type=index_type, ann_threshold=ann_threshold, on_bad_file=on_bad_file)
    rep = build_index(corpus_dir, out, cfg, progress=not quiet)
    for where, why in rep.skipped_files:
        typer.echo(f"skipped {where}: {why}", err=True)
    typer.echo(f"indexed {rep.documents} documents ({rep.embedded_documents} embedded, {rep.reused_documents} reused, "
               f"{rep.deleted_documents} dropped, {len(rep.skipped_files)} files skipped) -> {rep.chunks} chunks, "
               f"{rep.index_type} index at {out} in {rep.seconds:.1f}s")


@app.command("search")
@cli_errors
def search_cmd(
    query: str = typer.Argument(..., help="What to look for."),
    index: Path = typer.Option(..., "--index", help="Index directory built by 'hybrid index'."),
    k: int = typer.Option(5, "-k", help="Number of hits."),
    group: Optional[List[str]] = typer.Option(None, "--group", help="Access group of the caller; repeat for several. Without it only public documents are searched."),
    as_json: bool = typer.Option(False, "--json", help='Print {"hits": [{"doc_id", "chunk_id", "score", "title", "text"}]}.'),
):
    """Search an index (access control applied)."""
    from retrieval.retriever import Retriever

    if k < 1:
        raise InputError(f"-k must be a positive integer, got {k}")
    hits = Retriever.load(index).search(query, k=k, groups=group)
    if as_json:
        typer.echo(json.dumps({"hits": [h.to_dict() for h in hits]}, ensure_ascii=False))
        return
    for i, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())[:160]
        typer.echo(f"{i}. [{h.score:.3f}] {h.title} ({h.chunk_id})\n   {snippet}")
    if not hits:
        typer.echo("no visible documents")


@tune_app.command("embedder")
@cli_errors
def tune_embedder_cmd(
    index: Path = typer.Option(..., "--index", help="Index built with the base embedder (its chunks are the corpus)."),
    out: Path = typer.Option(..., "--out", help="Directory for the tuned sentence-transformers model."),
    qa: Optional[Path] = typer.Option(None, "--qa", help="QA JSONL with gold_ids; without it, inverse-cloze pairs are made from the corpus."),
    eval_qa: Optional[Path] = typer.Option(None, "--eval-qa", help="Separate held-out QA file: train on all of --qa, score on this."),
    test_fraction: Optional[float] = typer.Option(None, help=f"Held-out share when no --eval-qa {_d(EmbedderTuneConfig, 'test_fraction')}."),
    epochs: Optional[int] = typer.Option(None, help=f"Training epochs {_d(EmbedderTuneConfig, 'epochs')}."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N steps; 0 = no limit [default: 0]."),
    batch_size: Optional[int] = typer.Option(None, help=f"Pairs per batch (in-batch negatives) {_d(EmbedderTuneConfig, 'batch_size')}."),
    learning_rate: Optional[float] = typer.Option(None, help=f"Peak learning rate {_d(EmbedderTuneConfig, 'learning_rate')}."),
    num_negatives: Optional[int] = typer.Option(None, help=f"Hard negatives per pair {_d(EmbedderTuneConfig, 'num_negatives')}."),
    relative_margin: Optional[float] = typer.Option(None, help=f"Negatives must score below (1-margin) x positive {_d(EmbedderTuneConfig, 'relative_margin')}."),
    max_seq_length: Optional[int] = typer.Option(None, help=f"Token limit while training {_d(EmbedderTuneConfig, 'max_seq_length')}."),
    seed: Optional[int] = typer.Option(None, help=f"Split and training seed {_d(EmbedderTuneConfig, 'seed')}."),
    group: Optional[List[str]] = typer.Option(None, "--group", help="Also learn from chunks restricted to this access group (repeatable); the model is tagged with these groups [default: public chunks only]."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any EmbedderTuneConfig field (flags win)."),
    as_json: bool = typer.Option(False, "--json", help="Print the before/after metrics as JSON."),
):
    """Contrastive fine-tuning of the embedder (MNRL + hard negatives mined from the index)."""
    from hybrid.evaluation import markdown_table
    from retrieval.embedder_tuning import tune_embedder

    cfg = build_config(EmbedderTuneConfig, config, index=str(index), out=str(out), qa=_opt(qa),
                       eval_qa=_opt(eval_qa), test_fraction=test_fraction, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                       learning_rate=learning_rate, num_negatives=num_negatives, relative_margin=relative_margin,
                       max_seq_length=max_seq_length, seed=seed, groups=list(group) if group else None)
    res = tune_embedder(cfg, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(res))
        return
    typer.echo(f"\n{res['train_pairs']} training pairs ({res['pairs_source']}), {res['test_queries']} held-out queries, "
               f"{res['seconds']}s; tuned model saved to {out}\n")
    typer.echo(markdown_table({"base": res["base"], "tuned": res["tuned"]}))
    typer.echo(f"rebuild the index with it: hybrid index CORPUS_DIR --out INDEX_DIR --embedder {out}")


@tune_app.command("generator")
@cli_errors
def tune_generator_cmd(
    out: Path = typer.Option(..., "--out", help="Adapter directory to write (atomically)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index to mine oracle and distractor chunks from (with --qa)."),
    qa: Optional[Path] = typer.Option(None, "--qa", help="QA JSONL; answerable rows need gold_ids."),
    examples: Optional[Path] = typer.Option(None, "--examples", help="Train on prepared RAFT examples instead of --index/--qa (an adapter's raft_train.jsonl, or a file of that form; no index needed)."),
    base_model: Optional[str] = typer.Option(None, help="smollm2 | gemma3-270m | a local Hugging Face model dir [default: smollm2]."),
    strategy: Optional[str] = typer.Option(None, help="auto | full | lora | qlora; auto = QLoRA on CUDA, LoRA on CPU, whichever fits the memory plan [default: auto]."),
    p_oracle: Optional[float] = typer.Option(None, help=f"Share of examples that include the oracle chunk {_d(GeneratorTuneConfig, 'p_oracle')}."),
    num_distractors: Optional[int] = typer.Option(None, help=f"Hard distractor chunks per example {_d(GeneratorTuneConfig, 'num_distractors')}."),
    no_oracle: Optional[str] = typer.Option(None, help="Target when the oracle is left out: abstain | answer | both (every question with and without its oracle; --p-oracle ignored) [default: abstain]."),
    answer_format: Optional[str] = typer.Option(None, help="cot (quote + answer, RAFT) | short [default: cot]."),
    test_fraction: Optional[float] = typer.Option(None, help=f"Questions held back from training for eval {_d(GeneratorTuneConfig, 'test_fraction')}."),
    val_fraction: Optional[float] = typer.Option(None, help=f"Share of the rest for validation loss {_d(GeneratorTuneConfig, 'val_fraction')}."),
    lora_r: Optional[int] = typer.Option(None, help=f"LoRA rank {_d(GeneratorTuneConfig, 'lora_r')}."),
    lora_alpha: Optional[int] = typer.Option(None, help=f"LoRA alpha {_d(GeneratorTuneConfig, 'lora_alpha')}."),
    lora_dropout: Optional[float] = typer.Option(None, help=f"LoRA dropout {_d(GeneratorTuneConfig, 'lora_dropout')}."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated module names or all-linear [default: q_proj,v_proj]."),
    max_length: Optional[int] = typer.Option(None, help=f"Max tokens of prompt + answer {_d(GeneratorTuneConfig, 'max_length')}."),
    batch_size: Optional[int] = typer.Option(None, help=f"Sequences per micro-batch {_d(GeneratorTuneConfig, 'batch_size')}; the memory plan splits it (raising accumulation) if it does not fit."),
    grad_accum: Optional[int] = typer.Option(None, help=f"Gradient accumulation steps {_d(GeneratorTuneConfig, 'grad_accum')}."),
    learning_rate: Optional[float] = typer.Option(None, help=f"Peak learning rate {_d(GeneratorTuneConfig, 'learning_rate')}."),
    epochs: Optional[float] = typer.Option(None, help=f"Training epochs {_d(GeneratorTuneConfig, 'epochs')}."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps; 0 = no limit [default: 0]."),
    neftune_alpha: Optional[float] = typer.Option(None, help=f"NEFTune noise alpha; 0 = off {_d(GeneratorTuneConfig, 'neftune_alpha')}."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward [default: on]."),
    save_steps: Optional[int] = typer.Option(None, help=f"Checkpoint and validate every N steps {_d(GeneratorTuneConfig, 'save_steps')}."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop at the first step past N minutes of training and save; 0 = no limit [default: 0]."),
    seed: Optional[int] = typer.Option(None, help=f"Seed {_d(GeneratorTuneConfig, 'seed')}."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.checkpoints/."),
    merge: bool = typer.Option(False, "--merge", help="Also export a merged full model to OUT/merged."),
    group: Optional[List[str]] = typer.Option(None, "--group", help="Also learn from chunks restricted to this access group (repeatable); the adapter is then tagged with these groups and only callers holding them can load it [default: public chunks only]."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any GeneratorTuneConfig field (flags win)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """RAFT fine-tuning of the generator (LoRA on CPU, QLoRA on CUDA) with a memory plan."""
    from tuning.sft import tune_generator

    cfg = build_config(GeneratorTuneConfig, config, index=_opt(index), qa=_opt(qa), examples=_opt(examples), out=str(out),
                       base_model=base_model, max_minutes=max_minutes,
                       strategy=strategy, p_oracle=p_oracle, num_distractors=num_distractors, no_oracle=no_oracle,
                       answer_format=answer_format, test_fraction=test_fraction, val_fraction=val_fraction,
                       lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                       max_length=max_length, batch_size=batch_size, grad_accum=grad_accum,
                       learning_rate=learning_rate, epochs=epochs, max_steps=max_steps, neftune_alpha=neftune_alpha,
                       gradient_checkpointing=gradient_checkpointing, save_steps=save_steps, seed=seed,
                       resume=resume or None, merge=merge or None, groups=list(group) if group else None)
    rec = tune_generator(cfg, progress=not quiet, log=lambda m: typer.echo(m, err=True))
    d = rec["data"]
    typer.echo(f"{rec['strategy']} adapter saved to {out}: {rec['steps']} steps in {rec['minutes']} min, "
               f"{d['train']['examples']} examples ({d['train']['with_oracle']} with oracle, "
               f"{d['train']['abstain_targets']} abstain targets), final validation loss "
               f"{rec['final_val_loss'] if rec['final_val_loss'] is not None else '-'}; loss curve {out}/loss.png")


@tune_app.command("dpo")
@cli_errors
def tune_dpo_cmd(
    adapter: Path = typer.Option(..., "--adapter", help="SFT adapter dir from 'hybrid tune generator'."),
    out: Path = typer.Option(..., "--out", help="Adapter directory to write (atomically)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index the SFT adapter was trained with (with --qa)."),
    qa: Optional[Path] = typer.Option(None, "--qa", help="QA JSONL (the SFT run's held-out questions are excluded)."),
    pairs_file: Optional[Path] = typer.Option(None, "--pairs-file", help="Train on prepared preference pairs instead of building them from --index/--qa (an earlier run's dpo_pairs.jsonl, or a file of that form)."),
    wrong_answers: Optional[Path] = typer.Option(None, help='JSONL of {"id", "wrong_answer"}: dataset-provided wrong answers as extra rejected answers.'),
    judge: Optional[Path] = typer.Option(None, help="Groundedness judge dir; unsupported samples score lower."),
    n_samples: Optional[int] = typer.Option(None, help="Samples per question at --temperature [default: 4]."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature [default: 1.0]."),
    pairs: Optional[str] = typer.Option(None, help="sampled (FactTune: the SFT model's samples, scored) | contrastive (each question with and without its oracle, the same answer and abstention flipped; no sampling) [default: sampled]."),
    p_oracle: Optional[float] = typer.Option(None, help="Share of prompts with the oracle, sampled pairs [default: 0.5]."),
    num_distractors: Optional[int] = typer.Option(None, help="Distractor chunks per prompt [default: 4]."),
    beta: Optional[float] = typer.Option(None, help="DPO beta [default: 0.1]."),
    loss_type: Optional[str] = typer.Option(None, help="sigmoid | ipo | hinge | robust [default: sigmoid]."),
    learning_rate: Optional[float] = typer.Option(None, help="Learning rate [default: 5e-5]."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N steps; 0 = no limit [default: 0]."),
    max_questions: Optional[int] = typer.Option(None, help="Use at most N training questions; 0 = all [default: 0]."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop at the first step past N minutes of training and save; 0 = no limit [default: 0]."),
    max_length: Optional[int] = typer.Option(None, help="Max tokens of prompt + answer [default: 1024]."),
    seed: Optional[int] = typer.Option(None, help="Seed [default: 13]."),
    group: Optional[List[str]] = typer.Option(None, "--group", help="Also learn from chunks restricted to this access group (repeatable; must cover the SFT adapter's groups); the adapter is tagged with them [default: public chunks only]."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any DPOTuneConfig field (flags win)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """DPO for factuality: grounded answers preferred over made-up ones, on top of a RAFT adapter."""
    from tuning.dpo import DPOTuneConfig, tune_dpo

    cfg = build_config(DPOTuneConfig, config, index=_opt(index), qa=_opt(qa), pairs_file=_opt(pairs_file),
                       adapter=str(adapter), out=str(out), max_minutes=max_minutes,
                       wrong_answers=_opt(wrong_answers), judge=_opt(judge),
                       n_samples=n_samples, temperature=temperature, p_oracle=p_oracle, num_distractors=num_distractors,
                       pairs=pairs, beta=beta, loss_type=loss_type, learning_rate=learning_rate, max_steps=max_steps,
                       max_questions=max_questions, max_length=max_length, seed=seed, groups=list(group) if group else None)
    rec = tune_dpo(cfg, progress=not quiet, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"dpo adapter saved to {out}: {rec['data']['pairs']} pairs {rec['data']['by_source']}, "
               f"{rec['steps']} steps in {rec['minutes']} min")


@tune_app.command("judge")
@cli_errors
def tune_judge_cmd(
    out: Path = typer.Option(..., "--out", help="Judge directory to write (a sentence-transformers CrossEncoder)."),
    halueval: Optional[Path] = typer.Option(None, help="HaluEval QA JSONL [default: ../shared/data/halueval_qa/dataset_halueval_qa.jsonl]."),
    train_questions: Optional[int] = typer.Option(None, help="HaluEval train-split questions used (up to 5 pairs each) [default: 3000]."),
    epochs: Optional[int] = typer.Option(None, help="Epochs [default: 1]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [default: 16]."),
    n_test: Optional[int] = typer.Option(None, help="Size of HaluEval's held-out test split (seeded shuffle) [default: 1000]."),
    seed: Optional[int] = typer.Option(None, help="Split and training seed [default: 0]."),
    swapped_negatives: Optional[bool] = typer.Option(None, "--swapped-negatives/--no-swapped-negatives", help="Also use another question's right answer as an unsupported example [default: on]."),
    grounding_negatives: Optional[bool] = typer.Option(None, "--grounding-negatives/--no-grounding-negatives", help="Also use answers over the most similar other passage (evidence not retrieved) as unsupported examples [default: on]."),
    answerability_pairs: Optional[bool] = typer.Option(None, "--answerability-pairs/--no-answerability-pairs", help="Also teach 'does this passage answer the question' (question with an empty answer over its own vs the most similar other passage), what the eval/ask gate asks [default: on]."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Train the groundedness judge on HaluEval's train split; report accuracy and AUROC."""
    from hybrid.judge import JudgeTuneConfig, tune_judge

    cfg = build_config(JudgeTuneConfig, None, out=str(out), halueval=_opt(halueval),
                       train_questions=train_questions, epochs=epochs, batch_size=batch_size, n_test=n_test, seed=seed,
                       swapped_negatives=swapped_negatives, grounding_negatives=grounding_negatives,
                       answerability_pairs=answerability_pairs)
    rep = tune_judge(cfg, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(rep))
        return
    for name in ("halueval_test", "grounding_test", "answerability_test", "bundled"):
        if name not in rep:
            continue
        m = rep[name]
        typer.echo(f"{name}: n={m['n']} accuracy={m['accuracy']:.3f} AUROC={m['auroc']:.3f}")
    typer.echo(f"judge saved to {out} ({rep['train_pairs']} training pairs, {rep['minutes']} min)")


@tune_app.command("calibrate")
@cli_errors
def tune_calibrate_cmd(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter dir from 'hybrid tune generator' or 'hybrid tune dpo'; the threshold is written into it."),
    qa: Path = typer.Option(..., "--qa", help="Labelled QA JSONL that no training used, with answerable and unanswerable (answers: []) rows."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index to retrieve passages from, for rows without 'passages'."),
    k: Optional[int] = typer.Option(None, "-k", help="Passages per question when retrieving [default: 5]."),
    group: Optional[List[str]] = typer.Option(None, "--group", help="Caller access group (repeatable) [default: public]."),
):
    """Choose the adapter's abstention threshold on held-out rows; ask and eval then abstain at or above it."""
    from tuning.abstention import CalibrateConfig, calibrate

    cfg = build_config(CalibrateConfig, None, adapter=str(adapter), qa=str(qa), index=_opt(index),
                       k=k, groups=list(group) if group else None)
    calibrate(cfg, log=typer.echo)


def _parse_adapters(values: list[str] | None) -> dict[str, str]:
    adapters = {}
    for v in values or []:
        name, _, path = v.partition("=") if "=" in v else (Path(v).name, "", v)
        if not name or not path:
            raise InputError(f"--adapter {v}: use DIR or NAME=DIR")
        adapters[name] = path
    return adapters


@app.command("ask")
@cli_errors
def ask_cmd(
    question: str = typer.Argument(..., help="The question."),
    index: Path = typer.Option(..., "--index", help="Index directory to retrieve from."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="Adapter DIR or NAME=DIR; repeat to load several on one base model."),
    use: Optional[str] = typer.Option(None, "--use", help="Which loaded adapter answers; 'base' = none [default: the last --adapter]."),
    base_model: Optional[str] = typer.Option(None, help="Generator without adapters: smollm2 | gemma3-270m | model dir [default: the adapter's base, else smollm2]."),
    group: Optional[List[str]] = typer.Option(None, "--group", help="Access group of the caller; repeat for several."),
    k: int = typer.Option(5, "-k", help="Passages to retrieve."),
    max_new_tokens: int = typer.Option(96, help="Generation budget."),
    require_support: bool = typer.Option(False, "--require-support", help="Abstain when no quote verifies and the answer is not in the passages."),
    judge: Optional[Path] = typer.Option(None, "--judge", help="Groundedness judge dir (hybrid tune judge): abstain when it finds no passage that answers the question."),
    gate_threshold: float = typer.Option(0.5, "--gate-threshold", help="With --judge: abstain when the best passage's answerability is below this."),
    select: Optional[List[str]] = typer.Option(None, "--select", help="NAME (repeat, two or more loaded adapters; with --judge): each answers, the judge picks the best-supported answer and the best-calibrated adapter decides whether to abstain (eval's rag+A|B+cal); the judge picks instead of gating."),
    as_json: bool = typer.Option(False, "--json", help='Print {"answer", "abstained", "citations", "passages", "support", "answerable", "gated", "abstain_score", "calibrated_abstain", "selected_from"}.'),
):
    """Retrieve, answer from the passages, and verify every quote against them."""
    from hybrid.pipeline import Pipeline, check_select

    if k < 1:
        raise InputError(f"-k must be a positive integer, got {k}")
    if not 0 <= gate_threshold <= 1:
        raise InputError(f"--gate-threshold {gate_threshold}: must be in [0, 1]")
    adapters = _parse_adapters(adapter)
    check_select(list(select or []), adapters, judge)  # before any model loads
    chosen = None if use == "base" else (use or (list(adapters)[-1] if adapters else None))
    pipe = Pipeline.load(index, adapters=adapters, base_model=base_model, k=k, max_new_tokens=max_new_tokens,
                         require_support=require_support, judge=judge, groups=group, gate_threshold=gate_threshold)
    if as_json or select:
        res = pipe.ask(question, groups=group, adapter=chosen, select=list(select or []) or None)
        if as_json:
            typer.echo(json.dumps(res.to_dict(), ensure_ascii=False))
            return
        typer.echo(f"(answered by {res.selected_from}, the judge's pick)")
    else:
        res = pipe.ask(question, groups=group, adapter=chosen, on_token=lambda t: typer.echo(t, nl=False))
        typer.echo("")
    note = f"  (abstained: the judge found no passage answering it, answerability {res.answerable:.2f})" if res.gated else \
        "  (abstained)" if res.abstained else f"  (judge support {res.support:.2f})" if res.support is not None else ""
    typer.echo(f"answer: {res.answer}{note}")
    for c in res.citations:
        typer.echo(f"  [{'verified' if c['verified'] else 'NOT FOUND in passages'}] {c['doc_id'] or '-'}: \"{c['quote']}\"")
    typer.echo("passages: " + ", ".join(p["chunk_id"] for p in res.passages))


@app.command("eval")
@cli_errors
def eval_cmd(
    qa: Path = typer.Argument(..., help="QA JSONL (id, question, answers, gold_ids?, passages?); answers [] = unanswerable."),
    index: Optional[Path] = typer.Option(None, "--index", help="Index to retrieve passages from (rows without 'passages')."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="NAME=DIR (or DIR): adds configuration rag+NAME; repeat for several."),
    only: Optional[str] = typer.Option(None, "--only", help="retrieval: only recall@1/5/10, MRR@10, nDCG@10 (no generation)."),
    closed_book: bool = typer.Option(True, "--closed-book/--no-closed-book", help="Include the closed_book configuration (no passages)."),
    limit: int = typer.Option(0, "--limit", help="Evaluate a seeded sample of N questions; 0 = all."),
    seed: int = typer.Option(0, "--seed", help="Sampling and bootstrap seed."),
    group: Optional[List[str]] = typer.Option(None, "--group", help="Access group of the caller; repeat for several."),
    k: int = typer.Option(5, "-k", help="Passages retrieved per question."),
    judge: Optional[Path] = typer.Option(None, "--judge", help="Groundedness judge dir (hybrid tune judge) for unsupported_rate."),
    gate_threshold: float = typer.Option(0.5, "--gate-threshold", help="With --gate: the answerability below which an answer counts as an abstention."),
    gate: bool = typer.Option(False, "--gate", help="With --judge: also report each passage configuration as NAME+gate, where answers to questions the judge finds none of the passages answering count as abstentions (what 'ask --judge' does)."),
    select: Optional[List[str]] = typer.Option(None, "--select", help="NAME (repeat, two or more; with --judge): also report rag+A|B, each question answered by the adapter whose answer the judge finds best supported (+cal: abstaining where the best-calibrated one would)."),
    base_model: Optional[str] = typer.Option(None, help="Generator: smollm2 | gemma3-270m | model dir [default: the adapters' base, else smollm2]."),
    batch_size: int = typer.Option(4, help="Questions generated together (greedy, left-padded)."),
    max_new_tokens: int = typer.Option(96, help="Generation budget per answer."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report dir: report.json, report.md, chart.png, predictions.jsonl (resumable)."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
):
    """Factuality benchmark: accuracy, abstention and hallucination rate per configuration, with 95 % CIs."""
    if k < 1 or batch_size < 1 or limit < 0:
        raise InputError("-k and --batch-size must be >= 1 and --limit >= 0")
    if only not in (None, "retrieval"):
        raise InputError(f"--only {only}: the only partial evaluation is 'retrieval'")
    if only == "retrieval":
        from hybrid.evaluation import evaluate_retrieval, markdown_table, write_report

        if index is None:
            raise InputError("--only retrieval needs --index")
        report = evaluate_retrieval(qa, index, groups=group)
        if out:
            write_report(report, out)
        typer.echo(json.dumps(report) if as_json else markdown_table(report["configs"]))
        return
    from hybrid.factuality import EvalConfig, markdown, run_eval

    cfg = EvalConfig(qa=str(qa), index=_opt(index), adapters=_parse_adapters(adapter),
                     closed_book=closed_book, limit=limit, seed=seed, k=k, groups=group, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, base_model=base_model, judge=_opt(judge),
                     gate=gate, gate_threshold=gate_threshold, select=list(select or []), out=_opt(out))
    report = run_eval(cfg, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(markdown(report))
        if out:
            typer.echo(f"report: {out}/report.json, {out}/report.md, {out}/chart.png, {out}/predictions.jsonl")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
