"""Tracking `hybrid run` in MLflow: one parent run per loop in which a stage ran (holding the resolved
hybrid.yaml and hybrid's version), one nested run per stage that ran.

Each stage run holds its resolved settings as params (flattened `section.key`; values longer than
MLflow's limit go whole into `params.json`), the stage's own numbers as metrics (index counts,
synth filter counts, embedder and eval metrics with their interval bounds, the generator's
losses, steps and memory), its small outputs as artifacts (report.md, chart.png, loss.png,
hybrid_run.json, synth_report.json) and tags tying the lineage together (stage fingerprint,
corpus fingerprint, base model, access scope).

Access: nothing a stage read from the documents is logged — no predictions, no training rows —
and every run is tagged with the groups it was allowed to read (`hybrid.access_scope`). An adapter
holds what it learned in its weights, so `log_adapters` uploads one only when its scope lies within
`store_groups`, the groups the tracking store is declared fit to hold; otherwise the loop stops
before uploading, naming the groups.

    tracking: {backend: mlflow, uri: sqlite:///runs/loop/mlflow.db, experiment: hybrid,
               log_adapters: true, store_groups: [hr]}
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Literal

from core import access
from core.atomic import check_writable
from core.errors import InputError

PARAM_LIMIT = 500  # MLflow refuses longer param values (6000 in recent servers; kept low for any store)


@dataclass
class TrackingConfig:
    """Where `hybrid run` records its stages (YAML section `tracking`)."""

    backend: Literal["none", "mlflow"] = field(default="mlflow", metadata={
        "help": "mlflow: a run per stage, nested under one per loop; none: no tracking."})
    uri: str | None = field(default=None, metadata={
        "help": "Tracking URI; default $MLFLOW_TRACKING_URI, else a SQLite store OUT/mlflow.db (nothing to start)."})
    experiment: str | None = field(default=None, metadata={
        "help": "Experiment name; default $MLFLOW_EXPERIMENT_NAME, else hybrid."})
    run_name: str | None = field(default=None, metadata={"help": "Name of the loop's parent run (default: loop)."})
    log_adapters: bool = field(default=False, metadata={"help": "Upload the generator's adapter as an artifact."})
    store_groups: list[str] = field(default_factory=list, metadata={
        "help": "Access groups whose trained artifacts this store may hold; an adapter with other groups is "
                "never uploaded."})


def flat(obj, prefix: str = "") -> dict[str, object]:
    """A config (dataclass or mapping) as {dotted key: value}."""
    d = asdict(obj) if is_dataclass(obj) else obj
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _metric_name(name: str) -> str:
    return name.replace("@", "_at_").replace("+", "_plus_").replace("|", "_or_")


def stage_metrics(name: str, stage_out: Path) -> dict[str, float]:
    """The numbers a finished stage wrote to its own files (`stage_out`: its output directory)."""
    metrics: dict[str, float] = {}

    def numbers(d: dict, prefix: str):
        for k, v in d.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                metrics[_metric_name(prefix + k)] = float(v)
            elif isinstance(v, dict):
                numbers(v, f"{prefix}{k}.")
            elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
                metrics[_metric_name(prefix + k + ".low")], metrics[_metric_name(prefix + k + ".high")] = map(float, v)

    if name == "index":
        numbers(json.loads((stage_out / "manifest.json").read_text())["counts"], "")
    elif name == "synth" and (f := stage_out / "synth_report.json").is_file():
        rep = json.loads(f.read_text())
        numbers({k: v for k, v in rep.items() if k != "settings"}, "")
    elif name == "embedder" and (f := stage_out / "hybrid_tuning.json").is_file():
        numbers(json.loads(f.read_text()), "")
    elif name in ("generator", "dpo"):
        rec = json.loads((stage_out / "hybrid_run.json").read_text())
        numbers({k: rec[k] for k in ("steps", "minutes", "final_val_loss") if rec.get(k) is not None}, "")
        numbers(rec.get("memory_measured") or {}, "memory.")  # plan vs measured peak
    elif name == "probe":  # the held-out figures and the heads' cross-validated AUROC (no weights, no text)
        rec = json.loads((stage_out / "hybrid_probe.json").read_text())
        numbers({k: rec[k] for k in ("rows", "held_out_rows", "target_hallucination", "minutes")}, "")
        numbers(rec["held_out"], "held_out.")
        numbers({h: {"cv_auroc": v["cv_auroc"], "layer": v["layer"]} for h, v in rec["heads"].items()}, "heads.")
    elif name == "eval":
        numbers(json.loads((stage_out / "report.json").read_text())["configs"], "")
    return metrics


ARTIFACTS = {"index": ["manifest.json"], "synth": ["synth_report.json"], "embedder": [],
             "generator": ["hybrid_run.json", "loss.png"], "dpo": ["hybrid_run.json"], "probe": ["hybrid_probe.json"],
             "eval": ["report.md", "report.json", "chart.png", "risk_coverage.png"]}


def log_stage(mlflow, name: str, section, stage_out: Path) -> None:
    """Into the active run: the stage's settings (params), numbers (metrics, the trainer's per-step
    log as histories) and small outputs (artifacts). Nothing read from the documents."""
    params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in flat(section).items()}
    mlflow.log_params({k: v for k, v in params.items() if len(v) <= PARAM_LIMIT})
    mlflow.log_dict(params, "params.json")  # every value whole, the long ones included
    if metrics := stage_metrics(name, stage_out):
        mlflow.log_metrics(metrics)
    if name in ("generator", "dpo"):  # the trainer's per-step log, as metric histories
        rec = json.loads((stage_out / "hybrid_run.json").read_text())
        for kind in ("train_loss", "val_loss", "train_log"):
            for row in rec.get(kind) or []:
                mlflow.log_metrics({_metric_name(f"{kind}.{k}"): float(v) for k, v in row.items()
                                    if k != "step" and isinstance(v, (int, float))}, step=int(row["step"]))
    for rel in ARTIFACTS[name]:
        if (stage_out / rel).is_file():
            mlflow.log_artifact(str(stage_out / rel))


def start(cfg: TrackingConfig, store_dir: Path):
    """mlflow, pointed at the URI (default a SQLite store in `store_dir`) and the experiment.

    Raises:
        InputError: the store cannot be reached or opened (within seconds, before any stage runs).
    """
    import mlflow

    where = "tracking.uri" if cfg.uri else "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else \
        "the tracking store"
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(store_dir / 'mlflow.db').resolve()}"
    check_reachable(uri, where)
    mlflow.set_tracking_uri(uri)
    name = cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "hybrid"
    with _one_try(uri, where):  # the first call answers whether the store works: no minutes of retries
        if mlflow.get_experiment_by_name(name) is None:
            store_dir.mkdir(parents=True, exist_ok=True)
            mlflow.create_experiment(name, artifact_location=artifact_root(uri))
        mlflow.set_experiment(name)
    return mlflow


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite store, wherever its URI points (MLflow's own default is ./mlartifacts in
    whatever directory the command ran from); a tracking server or a file store keeps its own default."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


CONNECT_SECONDS = 5


def check_reachable(uri: str, where: str) -> None:
    """Refuse in one line a store that cannot work: an HTTP server nobody answers at, a SQLite file
    or a file store in a directory that cannot be created or written."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "localhost", port), timeout=CONNECT_SECONDS).close()
        except OSError as exc:
            raise InputError(f"{where} {shown_uri(uri)}: cannot reach the tracking server ({exc.strerror or exc.__class__.__name__}"
                             f"); start it, point {where} at a running one, or set tracking.backend: none") from None
    elif parts.scheme == "sqlite" and (db := uri.partition(":///")[2]) and db != ":memory:":
        check_writable(Path(db).parent, f"{where} {uri}:")
    elif parts.scheme in ("", "file"):
        check_writable(Path(parts.path if parts.scheme else uri), f"{where} {uri}:")


@contextmanager
def _one_try(uri: str, where: str):
    """MLflow calls inside fail at once (no HTTP retries, a short timeout), as one InputError."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError  # a SQLite file that is not a database fails as this

    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CONNECT_SECONDS * 2)})
    try:
        yield
    except (MlflowException, OSError, SQLAlchemyError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise InputError(f"{where} {shown_uri(uri)}: the tracking store did not answer as an MLflow store ({first}); "
                         f"fix {where}, or set tracking.backend: none") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shown_uri(uri: str) -> str:
    """The URI as an error line shows it: a password in it is not printed."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def track_command(name: str, section, stage_out: Path, groups: list[str], store_dir: Path | None = None) -> str:
    """`--track mlflow` on one command: one run holding what the loop logs for this stage; its id.

    The store is $MLFLOW_TRACKING_URI, else `mlflow.db` in the current directory (`store_dir`).
    """
    mlflow = start(TrackingConfig(), store_dir or Path.cwd())
    with mlflow.start_run(run_name=name, tags={"hybrid.stage": name,
                                               "hybrid.access_scope": ",".join(sorted(groups)) or "public"}) as run:
        log_stage(mlflow, name, section, stage_out)
        return run.info.run_id


class Tracker:
    """The loop's MLflow parent run; `stage(...)` logs one finished stage as a nested run.

    The store is opened (and checked) at once, the parent run only by `begin()`, when a stage is about
    to run: a loop whose every stage is up to date leaves no empty run behind."""

    def __init__(self, cfg: TrackingConfig, out: Path, tags: dict[str, str], config_yaml: str = ""):
        self.cfg, self.out, self.tags, self.config_yaml = cfg, out, tags, config_yaml
        self.mlflow = start(cfg, out)
        self.parent = None

    def begin(self) -> None:
        """The parent run, once: tagged with hybrid's version, holding the resolved hybrid.yaml."""
        if self.parent is not None:
            return
        from hybrid import __version__

        self.parent = self.mlflow.start_run(run_name=self.cfg.run_name or "loop",
                                            tags={**self.tags, "hybrid.version": __version__})
        if self.config_yaml:
            self.mlflow.log_text(self.config_yaml, "hybrid.yaml")

    def summary(self) -> str:
        """The line the loop ends with: where its run is, and how to look at it."""
        if self.parent is None:
            return "tracking: every stage was up to date; no MLflow run was recorded"
        uri = shown_uri(self.mlflow.get_tracking_uri())
        # a tracking server has its own UI; a local store (SQLite, a folder, a database) needs `mlflow ui`
        see = f"open {uri}" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
        experiment = self.mlflow.get_experiment(self.parent.info.experiment_id).name
        return f"tracked: MLflow run {self.parent.info.run_id} (experiment {experiment}); see it: {see}"

    def stage(self, name: str, section, fingerprint: str, tags: dict[str, str], adapter_scope=None) -> None:
        self.begin()
        with self.mlflow.start_run(run_name=name, nested=True, tags={"hybrid.stage": name,
                                                                       "hybrid.fingerprint": fingerprint, **tags}):
            log_stage(self.mlflow, name, section, _stage_dir(name, self.out))
            if name == "generator" and self.cfg.log_adapters:
                self._log_adapter(adapter_scope or [])

    def _log_adapter(self, scope: list[str]) -> None:
        if missing := sorted(set(scope) - set(self.cfg.store_groups)):
            raise InputError(f"tracking.log_adapters: the adapter was trained on documents of {', '.join(scope)}; the "
                             f"store is declared for {', '.join(self.cfg.store_groups) or 'public artifacts only'} "
                             f"(tracking.store_groups), so it is not uploaded; add {', '.join(missing)} to "
                             f"store_groups only if this store may hold them")
        self.mlflow.log_artifacts(str(self.out / "generator"), artifact_path="adapter")

    def end(self, status: str = "FINISHED") -> None:
        if self.parent is not None:
            self.mlflow.end_run(status=status)


def _stage_dir(name: str, out: Path) -> Path:
    return out / name  # the loop's layout: OUT/index, OUT/synth, OUT/embedder, OUT/generator, OUT/eval


def adapter_scope(out: Path) -> list[str]:
    return access.scope(out / "generator") or []
