"""The analysis results as typed records: one frozen dataclass per result file, written and read only here.

Every step writes ``RUN/analysis/<checkpoint>/<step>.json`` through :func:`write_result`, and whatever reads one
back (the report, evolution, the pipeline's freshness checks, compare) goes through :func:`read_result`, which
refuses a file whose field names are not exactly the record's, at any depth: a renamed or missing field is one
error naming the file and the field, never a silently blank report cell. A writer cannot write what a reader
would refuse: :func:`write_result` reads its own output back through the same check before the rename.

On disk a record is its fields as JSON plus ``kind`` (which record) and ``version`` (of its layout); a file of
another kind or version is not current, so ``analysis all`` recomputes it (:func:`is_current`). Mappings keyed by
a label, a space or a k stay JSON objects (``dict[str, ...]`` fields); ``embeddings`` is the identity of the
embeddings a result was computed from, which :func:`analysis.store.is_fresh` compares.

A step that cannot run on the data it is given (no test split, fewer samples than k) raises :class:`StepSkipped`;
``analysis all`` records it as a :class:`SkippedStep` and goes on.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from analysis.runs import AnalysisError
from analysis.store import write_json

__all__ = ["StepSkipped", "PCASpace", "PCAResult", "KNNScore", "KNNLabel", "KNNResult", "RetrievalResult",
           "ClusterSettings", "SweepPoint", "ClusterSpace", "Agreement", "ClusterResult", "TSNESettings",
           "TSNESpace", "TSNELink", "TSNEResult", "AttentionResult", "EvolutionRetrieval", "EvolutionPoint",
           "EvolutionResult", "SkippedStep", "SkippedSteps", "CheckpointResults", "RECORDS", "RESULT_FILES",
           "STEP_RECORDS", "write_result", "read_result", "read_if_present", "result_json", "result_from_json",
           "is_current", "load_checkpoint_results"]


class StepSkipped(AnalysisError):
    """The data cannot support this step (no test split, fewer samples than k, ...); not a bug: ``analysis all``
    records the reason, shows it in the report and runs the other steps."""


# -- pca.json --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PCASpace:
    n: int
    dim: int
    components: int
    explained_variance_ratio: list[float]
    explained_by_components: float
    components_for_90pct: int | None  # None: the components kept explain less than 90%


@dataclass(frozen=True)
class PCAResult:
    KIND: ClassVar[str] = "pca"
    VERSION: ClassVar[int] = 1
    embeddings: str
    checkpoint: str
    spaces: dict[str, PCASpace]  # space -> its fit
    png: str


# -- knn.json ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KNNScore:
    top1: float
    top5: float | None  # None: five classes or fewer


@dataclass(frozen=True)
class KNNLabel:
    classes: int
    majority_baseline: float  # test accuracy of always answering the commonest training class
    spaces: dict[str, dict[str, KNNScore]]  # space -> k (as text) -> scores


@dataclass(frozen=True)
class KNNResult:
    KIND: ClassVar[str] = "knn"
    VERSION: ClassVar[int] = 1
    embeddings: str
    checkpoint: str
    k: list[int]
    temperature: float
    train: int
    test: int
    labels: dict[str, KNNLabel]  # label -> scores
    skipped_labels: dict[str, str]  # label -> why it was not measured (too few labelled samples)

    @property
    def headline_k(self) -> str:
        """The k the report and evolution show: 20 when measured, else the first."""
        return str(20 if 20 in self.k else self.k[0])


# -- retrieval.json ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrievalResult:
    KIND: ClassVar[str] = "retrieval"
    VERSION: ClassVar[int] = 1
    embeddings: str
    checkpoint: str
    split: str
    n: int
    k: list[int]
    rgb_to_ir: dict[str, float]  # k (as text) -> share of RGB rows whose own IR row is among the top k
    ir_to_rgb: dict[str, float]
    chance: dict[str, float]


# -- cluster.json -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterSettings:
    k: int
    sweep: list[int]
    silhouette_sample: int
    silhouette_seeds: int
    examples: int


@dataclass(frozen=True)
class SweepPoint:
    k: int
    silhouette_mean: float | None  # None: undefined (one cluster in every sample)
    silhouette_std: float | None


@dataclass(frozen=True)
class ClusterSpace:
    k: int
    silhouette_mean: float | None
    silhouette_std: float | None
    sizes: list[int]
    nmi: dict[str, float | None]  # metadata column -> NMI (None: too few known values)
    purity: dict[str, float | None]
    sweep: list[SweepPoint]


@dataclass(frozen=True)
class Agreement:
    ari: float
    nmi: float


@dataclass(frozen=True)
class ClusterResult:
    KIND: ClassVar[str] = "cluster"
    VERSION: ClassVar[int] = 1
    embeddings: str
    checkpoint: str
    n: int
    seed: int
    config: ClusterSettings
    spaces: dict[str, ClusterSpace]
    agreement: dict[str, Agreement]  # "rgb~ir" etc. -> agreement of the two clusterings
    pngs: list[str]
    tables: str
    clusters: str


# -- tsne.json --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TSNESettings:
    max_points: int
    perplexity: float
    n_jobs: int
    link_pairs: int


@dataclass(frozen=True)
class TSNESpace:
    points: int
    sampled: bool
    seconds: float
    features: int
    perplexity: float | None  # None: too few points to lay out (a line is drawn)
    k: int
    knn: str | None  # how the neighbours were found: exact or annoy
    knn_method: str | None
    early_exaggeration_iter: int
    n_iter: int
    overlapped_gradient: bool | None
    knn_seconds: float
    affinity_seconds: float
    optimise_seconds: float
    kl_divergence: float | None

    @classmethod
    def of(cls, points: int, sampled: bool, seconds: float, features: int, details: dict[str, Any]) -> TSNESpace:
        """From the details of :func:`analysis.tsne._embed`, whose tiny-input and Annoy paths leave some out (None
        here); a detail this record does not define is an error, so a new one is never dropped unseen."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(details) - known)
        if unknown:
            raise TypeError(f"TSNESpace has no field {', '.join(map(repr, unknown))}")
        given = {"points": points, "sampled": sampled, "seconds": seconds, "features": features, **details}
        return cls(**{name: given.get(name) for name in known})


@dataclass(frozen=True)
class TSNELink:
    pairs: int
    pair_distance: float
    random_distance: float
    ratio: float | None
    pair_nearest: float
    pair_nearest_chance: float
    pca_components: int
    perplexity: float | None
    seconds: float
    png: str


@dataclass(frozen=True)
class TSNEResult:
    KIND: ClassVar[str] = "tsne"
    VERSION: ClassVar[int] = 1
    embeddings: str
    checkpoint: str
    seed: int
    config: TSNESettings
    n: int
    sampled: bool
    spaces: dict[str, TSNESpace]
    parquet: str
    columns: list[str]
    link: TSNELink | None
    link_skipped: str | None  # why there is no link map
    pngs: list[str]


# -- attention/attention.json -------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionResult:
    KIND: ClassVar[str] = "attention"
    VERSION: ClassVar[int] = 1
    checkpoint: str
    checkpoint_sha256: str
    checkpoint_epoch: float | None
    where: str | None  # None: the samples were named by --keys
    keys: list[str]
    pngs: list[str]  # relative to RUN/analysis/<checkpoint>/
    npz: str
    grid_rgb: list[int]
    grid_ir: list[int]
    heads: dict[str, int]  # branch -> heads
    threshold: float
    mode: str
    dataset: str
    preprocessing: str


# -- evolution.json ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvolutionRetrieval:
    rgb_to_ir: float  # top-1
    ir_to_rgb: float
    chance: float


@dataclass(frozen=True)
class EvolutionPoint:
    checkpoint: str
    checkpoint_sha256: str
    epoch: float | None
    step: int | None
    knn_k: str  # the headline k of knn ("" without k-NN)
    knn: dict[str, dict[str, float]]  # label -> space -> top-1 at knn_k
    retrieval: EvolutionRetrieval | None  # None: retrieval could not run on this checkpoint
    silhouette: dict[str, float | None]  # space -> mean silhouette
    skipped: dict[str, str]  # step -> why it could not run on this checkpoint


@dataclass(frozen=True)
class EvolutionResult:
    KIND: ClassVar[str] = "evolution"
    VERSION: ClassVar[int] = 1
    points: list[EvolutionPoint]
    png: str


# -- skipped.json -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SkippedStep:
    checkpoint: str
    step: str
    reason: str


@dataclass(frozen=True)
class SkippedSteps:
    """What the last ``analysis all`` could not run on this data, and why."""

    KIND: ClassVar[str] = "skipped"
    VERSION: ClassVar[int] = 1
    steps: list[SkippedStep]


RECORDS: tuple[type, ...] = (PCAResult, KNNResult, RetrievalResult, ClusterResult, TSNEResult, AttentionResult,
                             EvolutionResult, SkippedSteps)

# A checkpoint's steps: their result files in RUN/analysis/<checkpoint>/, and the records those hold.
RESULT_FILES = {"pca": "pca.json", "knn": "knn.json", "retrieval": "retrieval.json", "cluster": "cluster.json",
                "tsne": "tsne.json", "attention": "attention/attention.json"}
STEP_RECORDS = {"pca": PCAResult, "knn": KNNResult, "retrieval": RetrievalResult, "cluster": ClusterResult,
                "tsne": TSNEResult, "attention": AttentionResult}


# -- to and from JSON ----------------------------------------------------------------------------------------

def result_json(record) -> dict[str, Any]:
    """The record as the JSON object written to disk: ``kind``, ``version``, then its fields."""
    _check_record_type(type(record))
    return {"kind": record.KIND, "version": record.VERSION, **_encode(record)}


def result_from_json(data: Any, record_type: type, source: str | Path):
    """The record of ``data`` (a file's parsed JSON), its field names checked exactly; ``source`` names the file
    in errors."""
    _check_record_type(record_type)
    if not isinstance(data, dict):
        raise AnalysisError(f"{source}: not a JSON object")
    found = (data.get("kind"), data.get("version"))
    if found != (record_type.KIND, record_type.VERSION):
        raise AnalysisError(f"{source}: not a {record_type.KIND} result of version {record_type.VERSION} "
                            f"(kind {found[0]!r}, version {found[1]!r}); run the step again")
    fields = {name: value for name, value in data.items() if name not in ("kind", "version")}
    return _decode(fields, record_type, "", str(source))


def write_result(path: Path, record) -> None:
    """Write ``record`` atomically (a reader sees the old file or the new one); what is written reads back."""
    data = result_json(record)
    result_from_json(json.loads(json.dumps(data)), type(record), path)
    write_json(path, data)


def read_result(path: Path, record_type: type):
    """The record in ``path``; a missing or unreadable file, another kind or version, or a missing or unknown
    field is an AnalysisError naming the file (and the field)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError:
        raise AnalysisError(f"{path}: missing or unreadable") from None
    except json.JSONDecodeError as exc:
        raise AnalysisError(f"{path}: not JSON ({exc})") from None
    return result_from_json(data, record_type, path)


def read_if_present(path: Path, record_type: type):
    """The record in ``path``, or None when there is no such file (a step not run yet); a bad file still raises."""
    return read_result(path, record_type) if Path(path).exists() else None


def is_current(path: Path, record_type: type) -> bool:
    """The file holds this kind of record at this version (an older layout is recomputed, not misread)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and (data.get("kind"), data.get("version")) == (record_type.KIND,
                                                                                  record_type.VERSION)


def _check_record_type(record_type: type) -> None:
    if record_type not in RECORDS:
        raise TypeError(f"{record_type.__name__} is not an analysis result record")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any, hint: Any, where: str, source: str) -> Any:
    """``value`` as ``hint`` says (a record, dict[str, X], list[X], X | None, str, int, float, bool)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_fields(value, hint, where, source)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(value, inner[0], where, source)
    if origin is dict:
        _expect(isinstance(value, dict), "an object", value, where, source)
        return {key: _decode(item, args[1], _join(where, key), source) for key, item in value.items()}
    if origin is list:
        _expect(isinstance(value, list), "a list", value, where, source)
        return [_decode(item, args[0], f"{where}[{i}]", source) for i, item in enumerate(value)]
    if hint is float:
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), "a number", value, where, source)
        return float(value)
    if hint is int:
        _expect(isinstance(value, int) and not isinstance(value, bool), "an integer", value, where, source)
        return value
    if hint in (str, bool):
        _expect(isinstance(value, hint), hint.__name__, value, where, source)
        return value
    raise TypeError(f"analysis.results cannot decode {hint!r}")


def _decode_fields(value: Any, record_type: type, where: str, source: str):
    _expect(isinstance(value, dict), "an object", value, where, source)
    hints = _hints(record_type)
    names = [f.name for f in dataclasses.fields(record_type)]
    missing = [_join(where, n) for n in names if n not in value]
    unknown = [_join(where, n) for n in value if n not in hints]
    if missing or unknown:
        said = ([f"missing field {', '.join(map(repr, missing))}"] if missing else []) + (
            [f"unknown field {', '.join(map(repr, unknown))}"] if unknown else [])
        raise AnalysisError(f"{source}: {'; '.join(said)} (a {record_type.__name__} has "
                            f"{', '.join(names)})")
    return record_type(**{n: _decode(value[n], hints[n], _join(where, n), source) for n in names})


def _hints(record_type: type) -> dict[str, Any]:
    return {name: hint for name, hint in typing.get_type_hints(record_type).items()
            if typing.get_origin(hint) is not ClassVar}


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _expect(ok: bool, what: str, value: Any, where: str, source: str) -> None:
    if not ok:
        raise AnalysisError(f"{source}: field {where or '(top)'!r} should be {what}, is {json.dumps(value)[:60]}")


# -- a checkpoint's results, as the report and compare read them ---------------------------------------------

@dataclass(frozen=True)
class CheckpointResults:
    """Whatever has been computed for one checkpoint (None: not computed, or skipped)."""

    pca: PCAResult | None
    knn: KNNResult | None
    retrieval: RetrievalResult | None
    cluster: ClusterResult | None
    tsne: TSNEResult | None
    attention: AttentionResult | None


def load_checkpoint_results(results_dir: Path) -> CheckpointResults:
    """The records of ``RUN/analysis/<checkpoint>/`` that exist; a file that is there but malformed raises."""
    return CheckpointResults(**{step: read_if_present(results_dir / RESULT_FILES[step], record_type)
                                for step, record_type in STEP_RECORDS.items()})
