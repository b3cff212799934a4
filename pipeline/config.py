"""The one run-config schema (pydantic), YAML loading and ``--set a.b=value`` overrides.

Every engine (local, Flower, Ray) and every stage reads a :class:`RunConfig`. Unknown keys and wrong types
raise :class:`ConfigError` with a one-line message naming the key path and what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (message: one line, names the key path)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------- data
class PartitionConfig(Strict):
    """How the training set is split across federated clients / workers."""

    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skewed)")
    min_size: int = Field(10, ge=1, description="minimum samples per partition (Dirichlet)")
    classes_per_client: int = Field(2, ge=1, description="label shards: classes per client")


class DataConfig(Strict):
    name: Literal["cifar10", "cifar100"] = "cifar10"
    root: Path | None = Field(None, description="folder holding cifar-10-batches-py/ (None = embedded subset)")
    augment: bool = True
    train_limit: int | None = Field(None, ge=1, description="use only the first N training samples")
    test_limit: int | None = Field(None, ge=1, description="use only the first N test samples")
    partition: PartitionConfig = PartitionConfig()

    @model_validator(mode="after")
    def _embedded_is_cifar10(self) -> DataConfig:
        if self.root is None and self.name != "cifar10":
            raise ValueError(f"data.root is required for {self.name} (the embedded subset is CIFAR-10 only)")
        return self

    @property
    def num_classes(self) -> int:
        return 100 if self.name == "cifar100" else 10


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Strict):
    name: str = "smallnet7"
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra builder arguments")


class NoCompression(Strict):
    kind: Literal["none"] = "none"


class ExpandConfig(Strict):
    """ExpandNets: train an expanded net, contract it for deployment."""

    kind: Literal["expand"] = "expand"
    strategy: Literal["cl", "ck", "fc", "cl+fc", "ck+fc"] = "ck"
    rate: float = Field(4.0, gt=0)
    mode: Literal["fused", "explicit"] = "fused"
    skip_unsupported: bool = False


class CSGConfig(Strict):
    """CSG: conv filters generated from per-layer codes by one shared slice generator."""

    kind: Literal["csg"] = "csg"
    slice_shape: tuple[int, int, int, int] = (16, 16, 3, 3)
    code_size: int = Field(128, ge=1)
    binary: bool = False
    generator: Path | None = Field(None, description="safetensors file holding a generator to share")
    train_generator: bool = True
    include_pointwise: bool = False


class CheapConfig(Strict):
    """Moonshine: replace every standard block by a cheap block (e.g. ``G(4)``, ``B(2)``)."""

    kind: Literal["cheap"] = "cheap"
    block: str = "G(4)"


Compression = Annotated[NoCompression | ExpandConfig | CSGConfig | CheapConfig, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------- train
class TrainConfig(Strict):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(500, ge=1)
    epochs: int = Field(1, ge=1, description="epochs and schedule horizon (local/Ray); Flower counts "
                        "engine.rounds x engine.local_epochs global epochs instead")
    schedule: Literal["constant", "multistep", "cosine"] = "constant"
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs at which lr *= gamma")
    gamma: float = Field(0.1, gt=0)
    max_batches: int | None = Field(None, ge=1, description="cap batches per epoch (quick runs)")
    grad_clip: float | None = Field(None, gt=0)


# -------------------------------------------------------------------------------------- distillation
class TeacherConfig(Strict):
    """A teacher: a safetensors checkpoint (with its model.json beside it) or a model to train first."""

    checkpoint: Path | None = None
    model: ModelConfig | None = None
    train: TrainConfig | None = None
    cache_logits: bool = Field(False, description="cache teacher logits per sample (only without augmentation)")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.model is None):
            raise ValueError("teacher needs exactly one of 'checkpoint' or 'model' (+ optional 'train')")
        return self


class NoDistill(Strict):
    kind: Literal["none"] = "none"


class KDConfig(Strict):
    kind: Literal["kd"] = "kd"
    T: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)


class ATConfig(Strict):
    kind: Literal["at"] = "at"
    beta: float = Field(1000.0, ge=0)
    layers: list[int] | None = Field(None, description="indices into forward_features (None = all)")


Distill = Annotated[NoDistill | KDConfig | ATConfig, Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------- engines
class LocalEngine(Strict):
    kind: Literal["local"] = "local"


FlowerStrategy = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]


class UpdateScreenConfig(Strict):
    """Screen of client updates (reply - global model sent): direction check, then norm bound (server/update_screen)."""

    @field_validator("kind", "direction", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare ``off`` as false: take it as the word the user wrote."""
        return "off" if value is False else value

    kind: Literal["centred", "clip", "drop", "off"] = Field(
        "clip", description="clip (scale down) or drop updates whose norm exceeds factor x the round's median "
        "update norm; centred: clip each update's distance from the coordinate-wise median update instead; off")
    factor: float = Field(1.5, ge=1.0, description="bound, in multiples of the round's median update norm")
    direction: Literal["drop", "off"] = Field(
        "drop", description="drop an update whose parameters point against the other replies' coordinate-wise "
        "median update (cosine < -backward_ratio x the round's median cosine); off: no direction check")
    backward_ratio: float = Field(0.5, gt=0.0, description="direction check threshold, relative to the round's "
                                  "agreement (median cosine): an update whose cosine is below -backward_ratio x "
                                  "the agreement counts as pointing against the round")
    min_agreement: float = Field(0.01, ge=0.0, le=1.0, description="the direction check acts only in rounds "
                                 "whose agreement (median cosine) is at least this (the replies agree on a "
                                 "direction; strongly non-IID rounds are left to the norm screen)")
    agreement_over_spread: float = Field(1.5, ge=0.0, description="the direction check acts only in rounds "
                                         "where, with the lowest cosine set aside, the median of the other "
                                         "cosines is at least this x their standard deviation (the replies "
                                         "agree; scattered sparse or noisy updates are no direction)")
    direction_min_replies: int = Field(4, ge=3, description="the direction check runs only in rounds with at "
                                       "least this many valid replies (the others' median needs a majority of "
                                       "honest replies: with 3, one attacker is half of the other two)")


class ServerDPConfig(Strict):
    """Flower's server-side DP wrappers (central DP), applied after decoding and screening."""

    kind: Literal["none", "fixed", "adaptive"] = "none"
    noise_multiplier: float = Field(0.0, ge=0)
    clipping_norm: float = Field(1.0, gt=0, description="fixed: the clipping norm; adaptive: the initial one")
    target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: fraction of updates left unclipped")
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive: learning rate of the clipping norm")


class FlowerEngine(Strict):
    kind: Literal["flower"] = "flower"
    rounds: int = Field(3, ge=1)
    clients: int = Field(4, ge=1, description="number of simulated SuperNodes / partitions")
    fraction: float = Field(1.0, gt=0, le=1, description="fraction of nodes sampled for training per round")
    min_train_nodes: int = Field(1, ge=1)
    evaluate_fraction: float = Field(0.0, ge=0, le=1, description="fraction of nodes that evaluate the global "
                                     "model on their shard of the test set each round (0 = server-side only)")
    local_epochs: int = Field(1, ge=1)
    strategy: FlowerStrategy = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal term")
    server_lr: float = Field(0.01, gt=0, description="FedAdam server learning rate")
    trimmed_beta: float = Field(0.2, ge=0, lt=0.5, description="FedTrimmedAvg trim fraction")
    krum_byzantine: int = Field(0, ge=0, description="Krum/MultiKrum/Bulyan: number of malicious nodes tolerated")
    multikrum_select: int | None = Field(None, ge=1, description="MultiKrum: replies averaged (None: n - f)")
    update_screen: UpdateScreenConfig = UpdateScreenConfig()
    example_weights: Literal["partition", "median", "uniform", "claimed"] = Field(
        "partition", description="cap on a reply's num-examples weight: the server-side partition size, the "
        "round's median claim, uniform weights, or the claim itself (unsafe)")
    dp: ServerDPConfig = ServerDPConfig()
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies per round")
    client_cpus: float = Field(1.0, gt=0)
    client_gpus: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _bulyan_has_enough_replies(self) -> FlowerEngine:
        expected = max(int(self.clients * self.fraction), self.min_train_nodes)
        if self.strategy == "bulyan" and expected < 4 * self.krum_byzantine + 3:
            raise ValueError(f"strategy bulyan needs at least 4*krum_byzantine+3 = {4 * self.krum_byzantine + 3} "
                             f"replies per round, but clients x fraction gives {expected}")
        return self


class RayEngine(Strict):
    kind: Literal["ray"] = "ray"
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=0)
    storage_path: Path | None = Field(None, description="Ray Train storage (default: <run dir>/ray)")
    address: str | None = Field(None, description="Ray address to join (None: auto / start local)")


Engine = Annotated[LocalEngine | FlowerEngine | RayEngine, Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------- transport
def _canonical_chain(value: Any) -> list[str]:
    """A codec chain (string like ``"topk(frac=0.01)+qsgd(bits=8)"``, a list of stages, or ``none``) as the
    list of its canonical stage strings (unknown codecs or parameters: ValueError)."""
    from pipeline.transport.codecs import parse_chain

    if value is not None and not isinstance(value, str | list | tuple):
        raise ValueError(f"expected a codec chain (string or list of strings), got {value!r}")
    return [stage.descriptor() for stage in parse_chain(value).stages]


STOCK_COMM = re.compile(r"none|fp16|bf16|powersgd\(([1-9]\d*)\)")


class DownlinkConfig(Strict):
    """What the server sends each round: the ``full`` global model, or its compressed change (``delta``)."""

    kind: Literal["full", "delta"] = "full"
    codec: list[str] = Field(default_factory=list, description="delta: codec chain of the global change")
    error_feedback: bool = Field(True, description="delta: server-side error feedback")

    @field_validator("codec", mode="before")
    @classmethod
    def _codec(cls, v: Any) -> list[str]:
        return _canonical_chain(v)


#: what ExpandNet layers send on the flower engine when ``transport.communicate`` is unset (the one place to flip it).
#: ``compact``: on real CIFAR-10 (BENCHMARKS.md, issue 14) CK r=4 with compact communication (lifted into the previous
#: global factors with the all-factor lift) beat compact FedAvg by 1.6 pp over two seeds at 1.03x its bytes, within
#: 0.2 pp of ``factors``, which sends 2.7x more
DEFAULT_EXPAND_COMMUNICATE: Literal["factors", "compact"] = "compact"


class TransportConfig(Strict):
    """What travels, for every engine (see README "What travels (transport)")."""

    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="dtype of tensors that travel dense")
    codec: list[str] = Field(default_factory=list, description="flower: codec chain of each update, e.g. "
                             "[topk(frac=0.01), qsgd(bits=8,block=256)] (empty = dense in dtype)")
    error_feedback: bool = Field(False, description="add what the codecs dropped to the next update")
    residual_decay: float = Field(1.0, gt=0, le=1, description="residual x decay**rounds skipped")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of tensors sent dense in dtype")
    dense_warmup_rounds: int = Field(0, ge=0, description="first N rounds send dense updates")
    downlink: DownlinkConfig = DownlinkConfig()
    comm: str = Field("none", description="ray gradients: none | fp16 | bf16 | powersgd(RANK) | codec chain")
    expand_sync: Literal["compact", "factors"] = Field(
        "compact", description="ray, fused ExpandNets: average the compact dL/dW, dL/db (exact, compact net's "
        "bytes) or the factor gradients (the chain's bytes; needed for explicit mode and powersgd)")
    communicate: Literal["factors", "compact"] | None = Field(
        None, description="flower, compression.kind expand: ExpandNet layers travel as the compact layer's "
        "update (lifted into the previous global factors on receipt) or as their factors; unset = "
        "DEFAULT_EXPAND_COMMUNICATE")

    @field_validator("codec", mode="before")
    @classmethod
    def _codec(cls, v: Any) -> list[str]:
        return _canonical_chain(v)

    @field_validator("comm", mode="before")
    @classmethod
    def _comm(cls, v: Any) -> str:
        if isinstance(v, str) and STOCK_COMM.fullmatch(v.strip()):
            return v.strip()
        if isinstance(v, str) and v.strip().startswith("powersgd"):
            raise ValueError(f"powersgd needs a rank >= 1, e.g. powersgd(2), got {v!r}")
        stages = _canonical_chain(v)
        return "+".join(stages) or "none"


_LEGACY_KEYS = {("engine", "transport_dtype"): "transport.dtype", ("engine", "comm"): "transport.comm"}

# ------------------------------------------------------------------------------------------- tracking
class MlflowTracking(Strict):
    """MLflow: no ``uri`` = an embedded SQLite store ``<output>/mlflow.db`` (artifacts in ``<output>/mlartifacts``)."""

    enabled: bool = Field(True, description="log this run to MLflow (set COMPACTFL_TRACKING=off to disable all)")
    uri: str | None = Field(None, description="tracking server, e.g. http://host:5000 (None = embedded store)")
    experiment: str = Field("compactfl", min_length=1, description="MLflow experiment name")


class TensorboardTracking(Strict):
    """TensorBoard event files (the same scalars) under ``<run dir>/tensorboard``."""

    enabled: bool = False


class TrackingConfig(Strict):
    """Experiment trackers fed by the process that owns the run dir; never part of a resume fingerprint."""

    mlflow: MlflowTracking = MlflowTracking()
    tensorboard: TensorboardTracking = TensorboardTracking()


# ------------------------------------------------------------------------------------------------ run
class RunConfig(Strict):
    seed: int = 0
    name: str | None = Field(None, description="run name (default: config file stem)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    compression: Compression = NoCompression()
    teacher: TeacherConfig | None = None
    distill: Distill = NoDistill()
    engine: Engine = LocalEngine()
    train: TrainConfig = TrainConfig()
    transport: TransportConfig = TransportConfig()
    output: Path = Path("runs")
    resume: bool = False
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _distill_needs_teacher(self) -> RunConfig:
        if self.distill.kind != "none" and self.teacher is None:
            raise ValueError(f"distill.kind={self.distill.kind} needs a 'teacher' section")
        return self

    @model_validator(mode="after")
    def _transport_fits_run(self) -> RunConfig:
        """The transport section against the engine, the aggregator and the model (first problem found)."""
        for problem in (transport_problem(self.transport, self.engine.kind), robust_codec_problem(self),
                        communicate_problem(self)):
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _expand_sync_fits_model(self) -> RunConfig:
        c, t = self.compression, self.transport
        if self.engine.kind != "ray" or c.kind != "expand" or t.expand_sync != "compact":
            return self
        if c.mode != "fused":
            raise ValueError("transport.expand_sync: compact needs compression.mode: fused (explicit mode has no "
                             "compact W to average); set transport.expand_sync: factors")
        if t.comm.startswith("powersgd"):
            raise ValueError(f"transport.expand_sync: compact does not support comm {t.comm!r}; set "
                             "transport.expand_sync: factors")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output / (self.name or "run")


def communicate_problem(cfg: RunConfig) -> str | None:
    """Why ``transport.communicate`` does not fit ``cfg`` (None if it does): it chooses what ExpandNet layers
    send on the flower engine; the ray engine has ``transport.expand_sync`` for that."""
    value = cfg.transport.communicate
    if value is None:
        return None
    if cfg.engine.kind == "ray":
        return ("transport.communicate: used by the flower engine only (the ray engine sends ExpandNets as set by "
                "transport.expand_sync)")
    if cfg.compression.kind != "expand":
        return (f"transport.communicate: {value} applies only to compression.kind: expand runs, this run has "
                f"compression.kind: {cfg.compression.kind}")
    return None


def communicate_mode(cfg: RunConfig) -> Literal["factors", "compact"] | None:
    """What ExpandNet layers send in this run: ``transport.communicate``, else :data:`DEFAULT_EXPAND_COMMUNICATE`
    for expand runs on the flower engine; None where nothing is expanded or the engine is not flower."""
    if cfg.engine.kind != "flower" or cfg.compression.kind != "expand":
        return None
    return cfg.transport.communicate or DEFAULT_EXPAND_COMMUNICATE


def transport_problem(t: TransportConfig, engine: str) -> str | None:
    """Why ``t`` does not fit ``engine`` (None if it does). Keys an engine would ignore are refused, not dropped.

    The local engine sends nothing and ignores the section. The Flower engine applies ``dtype`` and, for
    uploads, the update ``codec`` chain with its per-tensor rules and error feedback, and the ``delta``
    downlink. The Ray engine applies ``comm`` (and ``error_feedback``/``residual_decay`` with
    library codecs).
    """
    d = TransportConfig()
    if engine == "flower":
        for key in ("comm", "expand_sync"):
            if getattr(t, key) != getattr(d, key):
                return f"transport.{key}: used by the ray engine only (the flower engine encodes with transport.codec)"
        if t.downlink.kind == "full" and t.downlink != d.downlink:
            return "transport.downlink: codec and error_feedback apply only with downlink.kind: delta"
        if t.downlink.kind == "delta" and not t.codec:
            return ("transport.downlink.kind: delta needs a transport.codec chain (nodes then reply with updates "
                    "against the model they hold)")
        if t.downlink.kind == "delta" and not t.downlink.error_feedback:
            return ("transport.downlink.error_feedback: the delta downlink always carries what its codec dropped "
                    "into later rounds (server-side error feedback); false is not supported")
        if not t.codec:
            for key in ("error_feedback", "residual_decay", "exclude", "dense_warmup_rounds"):
                if getattr(t, key) != getattr(d, key):
                    return f"transport.{key}: applies only with a transport.codec chain"
        elif t.residual_decay != d.residual_decay and not t.error_feedback:
            return "transport.residual_decay: applies only with transport.error_feedback: true"
    elif engine == "ray":
        if t.codec:
            return "transport.codec: the ray engine encodes gradients with transport.comm (set the chain there)"
        for key in ("dtype", "exclude", "dense_warmup_rounds", "downlink"):
            if getattr(t, key) != getattr(d, key):
                return f"transport.{key}: not used by the ray engine (it encodes whole gradient buckets with " \
                       "transport.comm)"
        if t.residual_decay != d.residual_decay and not t.error_feedback:
            return "transport.residual_decay: applies only with transport.error_feedback: true"
        if t.error_feedback and STOCK_COMM.fullmatch(t.comm):
            return (f"transport.error_feedback: applies to library codecs in transport.comm, not to "
                    f"{t.comm!r} (powersgd keeps its own error feedback)")
    return None


#: Flower strategies that aggregate coordinate by coordinate (or pick replies by coordinate distances)
COORDINATE_ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def robust_codec_problem(cfg: RunConfig) -> str | None:
    """Why a coordinate-wise robust aggregator cannot take this run's sparse updates (None if it can).

    Decoded top-k updates are dense tensors, but each is zero outside its own support of ``frac`` of the
    coordinates: with different supports the median / trimmed mean of a coordinate is (almost always) 0 and
    Krum's distances measure supports, not models, so the result is meaningless. Dense codecs (cast, qsgd,
    sign) keep every coordinate and stay allowed.
    """
    if cfg.engine.kind != "flower" or cfg.engine.strategy not in COORDINATE_ROBUST:
        return None
    sparse = [stage for stage in cfg.transport.codec if stage.startswith("topk")]
    if sparse:
        return (f"engine.strategy {cfg.engine.strategy} aggregates coordinate-wise and cannot take sparse updates "
                f"(transport.codec {sparse[0]}): use fedavg/fedprox/fedadam, or a dense codec (qsgd, sign, cast)")
    return None


# --------------------------------------------------------------------------------------------- loading
def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in e and e["type"] not in ("missing", "value_error") and not isinstance(e["input"], dict):
        msg = f"{msg} (got {e['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config error: {loc}: {msg}{more}" if loc else f"config error: {msg}{more}"


_UNION_TAGS = {
    "none", "expand", "csg", "cheap", "kd", "at", "local", "flower", "ray",
}


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (so ``3``, ``0.1``, ``true``, ``[16,16,3,3]`` get their types)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict (creating intermediate sections)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config error: override {item!r} must look like key.path=value")
        path, value = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"config error: override {item!r} has an empty key path")
        node = raw
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"config error: {'.'.join(keys[: i + 1])}: is a value, not a section")
            node = nxt
        node[keys[-1]] = parse_value(value)
    return raw


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Validate a raw dict (plus overrides) into a RunConfig, or raise a one-line ConfigError."""
    raw = apply_overrides(copy.deepcopy(dict(raw or {})), list(overrides or []))
    for (section, key), new in _LEGACY_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"config error: {section}.{key}: moved to {new}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (None: the embedded demo config) and apply ``--set`` overrides."""
    p = Path(path) if path is not None else default_config_path()
    if not p.is_file():
        raise ConfigError(f"config error: config file {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"config error: {p}{where}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {p}: top level must be a mapping of sections")
    raw.setdefault("name", p.stem)
    return config_from_dict(raw, overrides)


def default_config_path() -> Path:
    """``configs/demo.yaml`` of the checkout, or the copy shipped inside the package."""
    repo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    return repo if repo.is_file() else Path(__file__).resolve().parent / "assets" / "demo.yaml"


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run dir's ``config.yaml`` holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
