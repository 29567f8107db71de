"""Configuration of `training run`: frozen dataclasses, loaded from TOML, overridden by ``--set``, written back.

Every field carries its own help text (``metadata["help"]``), so ``training init-config`` prints a complete,
commented default config that cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from catalog.runinfo import ConfigError, config_from_dict, config_to_dict, read_toml

__all__ = [
    "untrained_teachers",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "TrainLoopConfig",
    "RunConfig",
    "DINOConfig",
    "TrainingConfig",
    "MODES",
    "OBJECTIVES",
    "IR3_REFERENCES",
    "MODALITIES",
    "parse_direction",
    "parse_set",
    "apply_sets",
    "load_training_config",
    "default_config_toml",
    "config_toml",
]

MODES = ("rgb-ir", "rgb-grey", "grey-ir", "ir3")
OBJECTIVES = ("vicreg", "dino")
IR3_REFERENCES = ("fixed", "frame")  # what mode ir3's band edges are relative to: 0 degrees C, or the frame
MODALITIES = ("rgb", "ir")  # DINO's names of the two branches: rgb takes the first view, ir the second


def _f(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - reads as the field's help text
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults (frozen dataclasses)")
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("", "DATASET directory (made by `ingest build-shards`), or a published one: s3://bucket/prefix, https://host/prefix; required")
    where: str = _f("split = 'train'", "SQL predicate over the catalog's `samples` view choosing what to train on")
    ir_size: tuple[int, int] = _f((120, 160), "[H, W] fed to the IR branch (the sensor's 4:3); RGB gets rgb_scale x that")
    rgb_scale: int = _f(2, "RGB input = rgb_scale x ir_size (2: patch-16 RGB and patch-8 IR see the same token grid)")
    fit: str = _f("error", "a size the patch does not tile: 'error', 'crop' (centre, to the multiple below) or 'pad' (zeros, to the multiple above)")
    workers: int = _f(2, "DataLoader worker processes per rank (0: load in the training process)")
    cache: str = _f("", "a published dataset only: local directory keeping whole shards by sha256 (empty: none; ranks on a node may share it)")
    cache_limit: str = _f("20GB", "most data.cache may hold (e.g. '500GB'); least recently used shards go first")
    prefetch: int = _f(4, "batches each worker prepares ahead")
    decode: str = _f("cpu", "'cpu': workers decode at the smallest DCT scale that covers the crop; 'gpu': nvJPEG decodes batches on the GPU")
    crop_scale: tuple[float, float] = _f((0.35, 1.0), "random resized crop: range of the box's area as a fraction of the image")
    crop_ratio: tuple[float, float] = _f((0.75, 1.3333), "random resized crop: range of the box's aspect relative to the image's")
    hflip: float = _f(0.5, "probability of a horizontal flip (both views together; no vertical flips: skies are up)")
    rgb_brightness: float = _f(0.2, "RGB photometric jitter: brightness factor in 1 +- this")
    rgb_contrast: float = _f(0.2, "RGB photometric jitter: contrast factor in 1 +- this")
    rgb_saturation: float = _f(0.2, "RGB photometric jitter: saturation factor in 1 +- this")
    ir_gain: float = _f(0.05, "IR photometric jitter: gain about the image mean in 1 +- this")
    ir_offset_c: float = _f(1.0, "IR photometric jitter: offset in degrees C, normal with this std")
    ir_noise_c: float = _f(0.1, "IR per-pixel sensor noise in degrees C (std)")
    ir_mean: float | None = _f(None, "IR normalisation mean in degrees C; unset: computed from the catalog over the selection and recorded here")
    ir_std: float | None = _f(None, "IR normalisation std in degrees C; unset: computed like ir_mean")
    ir3_bounds: tuple[float, float] = _f((-20.0, 10.0), "mode ir3, ir3_reference 'fixed': degrees C splitting IR into 3 channels (<= lower, between, > upper), each clamped to its band")
    ir3_reference: str = _f("fixed", "mode ir3: 'fixed' (band edges at ir3_bounds, standardised by ir_mean and ir_std) or 'frame' (edges at reference + ir3_offsets_c, reference = the 95th percentile of the whole frame's finite pixels, so a cloud lands in one band at any air temperature)")
    ir3_offsets_c: tuple[float, float] = _f((-45.0, -2.0), "mode ir3, ir3_reference 'frame': [lower, upper] band edges in degrees C relative to the frame's reference")

    def __post_init__(self) -> None:
        if len(self.ir_size) != 2 or min(self.ir_size) < 8:
            raise ValueError(f"data.ir_size must be [H, W], each at least 8, got {list(self.ir_size)}")
        if self.rgb_scale < 1:
            raise ValueError(f"data.rgb_scale must be >= 1, got {self.rgb_scale}")
        if self.fit not in ("error", "crop", "pad"):
            raise ValueError(f"data.fit must be 'error', 'crop' or 'pad', got {self.fit!r}")
        if self.workers < 0 or self.prefetch < 1:
            raise ValueError("data.workers must be >= 0 and data.prefetch >= 1")
        if self.decode not in ("cpu", "gpu"):
            raise ValueError(f"data.decode must be 'cpu' or 'gpu', got {self.decode!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"data.crop_ratio must satisfy 0 < low <= high, got {list(self.crop_ratio)}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"data.hflip must be a probability, got {self.hflip}")
        if self.ir_std is not None and self.ir_std <= 0:
            raise ValueError(f"data.ir_std must be > 0, got {self.ir_std}")
        if not self.ir3_bounds[0] < self.ir3_bounds[1]:
            raise ValueError(f"data.ir3_bounds must be [lower, upper] with lower < upper, got {list(self.ir3_bounds)}")
        if self.ir3_reference not in IR3_REFERENCES:
            raise ValueError(f"data.ir3_reference must be one of {', '.join(IR3_REFERENCES)}, got {self.ir3_reference!r}")
        if len(self.ir3_offsets_c) != 2 or not self.ir3_offsets_c[0] < self.ir3_offsets_c[1]:
            raise ValueError(f"data.ir3_offsets_c must be [lower, upper] with lower < upper, got {list(self.ir3_offsets_c)}")

    @property
    def rgb_size(self) -> tuple[int, int]:
        return self.ir_size[0] * self.rgb_scale, self.ir_size[1] * self.rgb_scale


@dataclass(frozen=True)
class ModelConfig:
    objective: str = _f("vicreg", "'vicreg' (two branches, one VICReg loss) or 'dino' (cross-modal DINO: EMA teachers, multi-crop; see [dino])")
    mode: str = _f("rgb-ir", "'rgb-ir'; controls: 'rgb-grey' (second view = luma of the RGB image), 'grey-ir' (first view = luma), 'ir3' (IR in 3 temperature bands)")
    rgb_arch: str = _f("vit_small_patch16_224", "timm model name of the RGB (first) branch; built with pretrained=False")
    ir_arch: str = _f("vit_small_patch16_224", "timm model name of the IR (second) branch; built with pretrained=False")
    rgb_patch: int = _f(16, "patch size of the RGB branch")
    ir_patch: int = _f(8, "patch size of the IR branch")
    depth: int = _f(0, "transformer blocks per branch (0: the architecture's own); small values make tiny test models")
    drop_path: float = _f(0.0, "stochastic depth rate of both backbones")
    expander: tuple[int, ...] = _f((8192, 8192, 8192), "expander MLP widths per branch (upstream VICReg: 8192-8192-8192)")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.mode not in MODES:
            raise ValueError(f"model.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.rgb_patch < 1 or self.ir_patch < 1 or self.depth < 0:
            raise ValueError("model.rgb_patch and model.ir_patch must be >= 1, model.depth >= 0")
        if not self.expander or min(self.expander) < 1:
            raise ValueError(f"model.expander must be a non-empty list of widths, got {list(self.expander)}")


@dataclass(frozen=True)
class LossConfig:
    sim: float = _f(25.0, "VICReg invariance coefficient")
    std: float = _f(25.0, "VICReg variance coefficient")
    cov: float = _f(1.0, "VICReg covariance coefficient")


@dataclass(frozen=True)
class OptimConfig:
    name: str = _f("lars", "'lars' (upstream VICReg) or 'adamw'; model.objective = 'dino' always uses AdamW (upstream DINO)")
    base_lr: float | None = _f(None, "learning rate per 256 pairs of global batch (lr = base_lr x global_batch / 256); unset: 0.2 for LARS (upstream VICReg), 5e-4 for AdamW and for DINO (upstream's lr)")
    weight_decay: float = _f(1e-6, "weight decay (biases and norms excluded); DINO: dino.weight_decay .. dino.weight_decay_end instead")
    warmup_epochs: float = _f(10.0, "linear warm-up length in epochs; must be shorter than train.epochs")
    final_lr_ratio: float = _f(0.001, "the cosine decays to this fraction of the peak learning rate; DINO: to dino.min_lr instead")
    momentum: float = _f(0.9, "LARS momentum")
    eta: float = _f(0.001, "LARS trust coefficient")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")

    def __post_init__(self) -> None:
        if self.name not in ("lars", "adamw"):
            raise ValueError(f"optim.name must be 'lars' or 'adamw', got {self.name!r}")
        if (self.base_lr is not None and self.base_lr <= 0) or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.base_lr must be > 0, optim.weight_decay and optim.warmup_epochs >= 0")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"optim.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")

    @property
    def lr_per_256(self) -> float:
        if self.base_lr is not None:
            return self.base_lr
        return 0.2 if self.name == "lars" else 5e-4


@dataclass(frozen=True)
class TrainLoopConfig:
    epochs: int = _f(100, "epochs of the schedule")
    batch_size: int = _f(64, "pairs per rank per step (global batch = batch_size x ranks)")
    seed: int = _f(0, "seeds the data order, the augmentations and the model's initialisation")
    checkpoint_every: int = _f(10, "keep checkpoints/epoch_NNNN.pt every this many epochs (last.pt is always kept)")
    checkpoint_minutes: float = _f(10.0, "also refresh checkpoints/last.pt this often within an epoch")
    log_every: int = _f(10, "write a metrics.jsonl row every this many steps (the first step is always logged)")
    precision: str = _f("auto", "'auto' (bf16 autocast where the hardware has it: CUDA with bf16), 'bf16' or 'fp32'")
    max_steps: int = _f(0, "stop this invocation after this global step, saving last.pt (0: run the whole schedule); not part of the schedule")
    timeout_s: float = _f(300.0, "collective timeout: a rank that waits this long on a dead peer exits with an error")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("train.epochs must be >= 1 and train.batch_size >= 2 (VICReg's variance needs 2 samples)")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.checkpoint_minutes <= 0:
            raise ValueError("train.checkpoint_every and train.log_every must be >= 1, train.checkpoint_minutes > 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.seed < 0:
            raise ValueError(f"train.seed must be >= 0, got {self.seed}")
        if self.max_steps < 0 or self.timeout_s <= 0:
            raise ValueError("train.max_steps must be >= 0 and train.timeout_s > 0")


@dataclass(frozen=True)
class RunConfig:
    dir: str = _f("runs/vicreg", "RUN directory: config.toml, metrics.jsonl, checkpoints/, loss.png; running again resumes")
    record_keys: bool = _f(False, "also write keys.jsonl: the sample keys of every global step (an audit of the data order)")


@dataclass(frozen=True)
class DINOConfig:
    """The ``[dino]`` section: upstream main_dino.py's keys and defaults, plus the cross-modal ones.

    The learning rate's peak (per 256 samples) and warm-up come from ``[optim]`` (optim.base_lr is upstream's
    ``lr``, already per 256), so they are not repeated here.
    """

    out_dim: int = _f(65536, "K, the head's output dimension (upstream out_dim)")
    norm_last_layer: bool = _f(True, "weight-normalised last layer with its g frozen at 1 (upstream norm_last_layer)")
    use_bn_in_head: bool = _f(False, "BatchNorm in the head's MLP (upstream use_bn_in_head)")
    hidden_dim: int = _f(2048, "head MLP width")
    bottleneck_dim: int = _f(256, "head bottleneck before the weight-normalised last layer")
    nlayers: int = _f(3, "head MLP layers")
    momentum_teacher: float = _f(0.996, "EMA momentum at step 0; cosine to 1 by the last step")
    warmup_teacher_temp: float = _f(0.04, "teacher temperature at epoch 0")
    teacher_temp: float = _f(0.04, "teacher temperature after the warm-up (the README's ViT-S recipe: 0.07)")
    warmup_teacher_temp_epochs: int = _f(0, "epochs of linear teacher-temperature warm-up (ViT-S recipe: 30)")
    student_temp: float = _f(0.1, "student temperature")
    center_momentum: float = _f(0.9, "momentum of the teacher-output centre")
    weight_decay: float = _f(0.04, "weight decay at step 0 (decayed group only); cosine to weight_decay_end")
    weight_decay_end: float = _f(0.4, "weight decay at the last step")
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine")
    clip_grad: float = _f(3.0, "clip each parameter tensor's gradient norm to this (0: no clipping)")
    freeze_last_layer: int = _f(1, "epochs during which the head's last layer gets no gradient")
    global_crops_scale: tuple[float, float] = _f((0.4, 1.0), "area range of the 2 global crops")
    local_crops_number: int = _f(8, "local crops per sample (0: no multi-crop)")
    local_crops_scale: tuple[float, float] = _f((0.05, 0.4), "area range of the local crops")
    local_crop_fraction: float = _f(96 / 224, "local crop side / global crop side (upstream: 96 px at 224)")
    directions: tuple[str, ...] = _f(("rgb>ir", "ir>rgb"), "teacher>student modality pairs, e.g. 'rgb>ir', 'ir>ir'")
    alternate: bool = _f(False, "true: one direction per step, in turn; false: every direction every step, averaged")

    def __post_init__(self) -> None:
        if self.out_dim < 1 or self.nlayers < 1 or self.hidden_dim < 1 or self.bottleneck_dim < 1:
            raise ValueError("dino.out_dim, dino.nlayers, dino.hidden_dim and dino.bottleneck_dim must be >= 1")
        if not 0 <= self.momentum_teacher <= 1 or not 0 <= self.center_momentum <= 1:
            raise ValueError("dino.momentum_teacher and dino.center_momentum must be in [0, 1]")
        if min(self.warmup_teacher_temp, self.teacher_temp, self.student_temp) <= 0:
            raise ValueError("dino temperatures must be > 0")
        if self.warmup_teacher_temp_epochs < 0 or self.freeze_last_layer < 0 or self.local_crops_number < 0:
            raise ValueError("dino.warmup_teacher_temp_epochs, freeze_last_layer, local_crops_number must be >= 0")
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"dino.{name} must satisfy 0 < low <= high <= 1, got {[lo, hi]}")
        if not 0 < self.local_crop_fraction <= 1:
            raise ValueError(f"dino.local_crop_fraction must be in (0, 1], got {self.local_crop_fraction}")
        if not self.directions:
            raise ValueError("dino.directions must name at least one teacher>student pair")
        for direction in self.directions:
            parse_direction(direction)


def parse_direction(direction: str) -> tuple[str, str]:
    """``'rgb>ir'`` -> ``('rgb', 'ir')``: (teacher modality, student modality); ValueError on anything else."""
    teacher, sep, student = direction.partition(">")
    if not sep or teacher not in MODALITIES or student not in MODALITIES:
        raise ValueError(f"dino direction {direction!r} is not teacher>student with each of {', '.join(MODALITIES)}")
    return teacher, student


def untrained_teachers(directions: tuple[str, ...]) -> list[str]:
    """Teacher modalities whose own student no direction trains: such a teacher (the EMA of its student) never moves."""
    pairs = [parse_direction(d) for d in directions]
    students = {student for _, student in pairs}
    return sorted({teacher for teacher, _ in pairs} - students)


@dataclass(frozen=True)
class TrainingConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)

    def __post_init__(self) -> None:
        if self.model.objective == "dino":
            self._check_dino()
        if self.optim.warmup_epochs >= self.train.epochs:
            raise ValueError(
                f"optim.warmup_epochs ({self.optim.warmup_epochs:g}) must be shorter than train.epochs "
                f"({self.train.epochs}), or the learning rate never decays"
            )

    def _check_dino(self) -> None:
        d, epochs = self.dino, self.train.epochs
        if d.warmup_teacher_temp_epochs > epochs:
            raise ValueError(f"dino.warmup_teacher_temp_epochs ({d.warmup_teacher_temp_epochs}) is longer than the run "
                             f"(train.epochs {epochs})")
        if self.optim.warmup_epochs != int(self.optim.warmup_epochs):
            raise ValueError(f"optim.warmup_epochs must be whole epochs with model.objective = 'dino' (upstream's "
                             f"schedule), got {self.optim.warmup_epochs:g}")
        untrained = untrained_teachers(d.directions)
        if untrained:
            raise ValueError(f"dino.directions {list(d.directions)}: the {' and '.join(untrained)} teacher is the EMA of "
                             f"a student no direction trains, so it would never change; add e.g. "
                             f"'{untrained[0]}>{untrained[0]}' or '{'ir' if untrained[0] == 'rgb' else 'rgb'}>{untrained[0]}'")

    @property
    def modalities(self) -> tuple[str, ...]:
        """DINO's trained modalities (students, and so teachers), in MODALITIES order."""
        students = {parse_direction(d)[1] for d in self.dino.directions}
        return tuple(m for m in MODALITIES if m in students)

    def with_ir_stats(self, mean: float, std: float) -> TrainingConfig:
        return dataclasses.replace(self, data=dataclasses.replace(self.data, ir_mean=float(mean), ir_std=float(std)))


# -- --set section.key=value ----------------------------------------------------------------------------

def parse_set(item: str) -> tuple[list[str], Any]:
    """``section.key=value``: the value is TOML (``[120, 160]``, ``0.3``, ``'x'``); a bare word is a string."""
    name, sep, text = item.partition("=")
    path = name.strip().split(".")
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return path, value


def _is_text_field(path: list[str]) -> bool:
    """Whether section.key is a string in the config, so ``--set data.where=true`` stays the text 'true'."""
    section = _SECTIONS.get(path[0])
    if section is None or len(path) != 2:
        return False
    hints = typing.get_type_hints(section)
    return hints.get(path[1]) is str


def apply_sets(values: dict[str, Any], items: list[str]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in items:
        path, value = parse_set(item)
        if _is_text_field(path) and not isinstance(value, str):
            value = item.partition("=")[2].strip()
        table = out
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
        table[path[-1]] = value
    return out


def load_training_config(path: str | None, sets: list[str] | None = None) -> TrainingConfig:
    """Defaults, then the TOML file, then ``--set`` items; a ``[provenance]`` table (from a run's config) is ignored."""
    values: dict[str, Any] = read_toml(path) if path is not None else {}
    values.pop("provenance", None)
    values = apply_sets(values, sets or [])
    return config_from_dict(TrainingConfig, values, where=str(path) if path else "config")


def config_toml(config: TrainingConfig, provenance: dict[str, Any] | None = None) -> str:
    data = config_to_dict(config)
    if provenance:
        data["provenance"] = {k: v for k, v in provenance.items() if v is not None}
    return tomli_w.dumps(data)


def default_config_toml() -> str:
    """The default config as TOML, every key preceded by its help; unset keys are shown commented out."""
    lines = [
        "# sagepairs training config: `training run --config train.toml [--set section.key=value ...]`",
        "# Every key is shown with its default. Running the same command again resumes from RUN/checkpoints/last.pt.",
    ]
    for section in dataclasses.fields(TrainingConfig):
        lines += ["", f"[{section.name}]"]
        for f in dataclasses.fields(section.type if isinstance(section.type, type) else _SECTIONS[section.name]):
            lines.append(f"# {f.metadata['help']}")
            value = f.default
            if value is None:
                lines.append(f"# {f.name} = <unset>")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = "):]


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainLoopConfig,
    "run": RunConfig,
    "dino": DINOConfig,
}
