"""Two timm ViT branches with VICReg expanders, and the VICReg loss (upstream formula, gathered across ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import MODALITIES, ModelConfig, TrainingConfig, parse_direction
from training.dino import DINOHead, DINOLoss, MultiCropWrapper, make_teacher
from training.distributed import SyncBatchNorm1d, gather_rows
from training.transforms import tiled_size

__all__ = ["ModelError", "build_backbone", "Expander", "VICReg", "DINOModel", "vicreg_loss", "off_diagonal", "embedding_std",
           "check_arch", "view_channels", "model_spec", "initial_model"]


class ModelError(ValueError):
    """A model the config asks for cannot be built; the message names the key."""


def check_arch(name: str, key: str) -> None:
    import timm  # about 3 s of import (its model registry) that commands importing this module may not need

    if not timm.is_model(name):
        close = timm.list_models(f"{name.split('_')[0]}_*")[:5]
        hint = f" (e.g. {', '.join(close)})" if close else ""
        raise ModelError(f"{key} = {name!r} is not a timm model name{hint}")


def build_backbone(arch: str, patch: int, in_chans: int, img_hw: tuple[int, int], depth: int = 0,
                   drop_path: float = 0.0, key: str = "model", dynamic_img_size: bool = False) -> nn.Module:
    """A timm ViT from random init, its position embedding built for the true (H, W) patch grid.

    ``dynamic_img_size``: other input sizes too (the position embedding interpolated), as DINO's local crops need.
    """
    import timm  # about 3 s of import (see check_arch)

    check_arch(arch, key)
    if img_hw[0] % patch or img_hw[1] % patch:
        raise ModelError(f"{key}: patch {patch} does not tile {img_hw[0]}x{img_hw[1]} (set data.fit = 'crop' or 'pad')")
    kwargs: dict = {"depth": depth} if depth else {}
    if dynamic_img_size:
        kwargs["dynamic_img_size"] = True
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_hw, patch_size=patch,
                                 in_chans=in_chans, drop_path_rate=drop_path, **kwargs)
    except TypeError as exc:
        raise ModelError(f"{key} = {arch!r} cannot be built as a ViT with patch_size/img_size ({exc})") from None


class Expander(nn.Sequential):
    """Linear -> BN -> ReLU for every width but the last, then Linear without bias (upstream VICReg's projector)."""

    def __init__(self, in_dim: int, widths: tuple[int, ...]) -> None:
        layers: list[nn.Module] = []
        dims = (in_dim, *widths)
        for i in range(len(widths) - 1):
            layers += [nn.Linear(dims[i], dims[i + 1]), SyncBatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
        super().__init__(*layers)


class VICReg(nn.Module):
    """RGB branch (first view) and IR branch (second view): backbone then expander each; no weights shared.

    Parameter names are stable (``rgb_backbone.*``, ``ir_backbone.*``, ``rgb_expander.*``, ``ir_expander.*``), so
    analysis loads a branch straight from a checkpoint.
    """

    def __init__(self, model: ModelConfig, first_hw: tuple[int, int], second_hw: tuple[int, int],
                 channels: tuple[int, int]) -> None:
        super().__init__()
        self.rgb_backbone = build_backbone(model.rgb_arch, model.rgb_patch, channels[0], first_hw, model.depth,
                                           model.drop_path, key="model.rgb_arch")
        self.ir_backbone = build_backbone(model.ir_arch, model.ir_patch, channels[1], second_hw, model.depth,
                                          model.drop_path, key="model.ir_arch")
        self.rgb_expander = Expander(self.rgb_backbone.num_features, model.expander)
        self.ir_expander = Expander(self.ir_backbone.num_features, model.expander)

    def projection(self, modality: str, h: torch.Tensor) -> torch.Tensor:
        """The space the loss aligns across modalities, of backbone output ``h``: the expander's output."""
        return self.rgb_expander(h) if modality == "rgb" else self.ir_expander(h)

    def forward(self, first: torch.Tensor, second: torch.Tensor):
        h_rgb = self.rgb_backbone(first)
        h_ir = self.ir_backbone(second)
        return self.rgb_expander(h_rgb), self.ir_expander(h_ir), h_rgb, h_ir


class DINOModel(nn.Module):
    """Cross-modal DINO: per trained modality a student (backbone + DINOHead in a MultiCropWrapper) and its EMA
    teacher; per direction ``teacher>student`` a DINOLoss holding its centre.

    State-dict names: ``students.rgb.backbone.*``, ``teachers.ir.head.*``, ``losses.rgb>ir.center``. The
    ``rgb_backbone`` / ``ir_backbone`` properties are the teachers' backbones (DINO's evaluated network), so
    analysis embeds a DINO run as it embeds a VICReg one.
    """

    def __init__(self, config: TrainingConfig, first_hw: tuple[int, int], second_hw: tuple[int, int],
                 channels: tuple[int, int]) -> None:
        super().__init__()
        m, d = config.model, config.dino
        inputs = {"rgb": (m.rgb_arch, m.rgb_patch, channels[0], first_hw), "ir": (m.ir_arch, m.ir_patch, channels[1], second_hw)}
        students = {}
        for modality in config.modalities:
            arch, patch, in_chans, hw = inputs[modality]
            backbone = build_backbone(arch, patch, in_chans, hw, m.depth, m.drop_path, key=f"model.{modality}_arch",
                                      dynamic_img_size=True)
            head = DINOHead(backbone.num_features, d.out_dim, d.use_bn_in_head, d.norm_last_layer, d.nlayers,
                            d.hidden_dim, d.bottleneck_dim)
            students[modality] = MultiCropWrapper(backbone, _synced_batchnorms(head))
        self.students = nn.ModuleDict(students)
        self.teachers = nn.ModuleDict({name: make_teacher(student) for name, student in students.items()})
        self.losses = nn.ModuleDict({
            direction: DINOLoss(d.out_dim, 2 + d.local_crops_number, d.warmup_teacher_temp, d.teacher_temp,
                                d.warmup_teacher_temp_epochs, config.train.epochs, d.student_temp, d.center_momentum,
                                same_view_positive=_is_cross_modal(direction))
            for direction in d.directions
        })

    @property
    def rgb_backbone(self) -> nn.Module:
        return self._teacher_backbone("rgb")

    @property
    def ir_backbone(self) -> nn.Module:
        return self._teacher_backbone("ir")

    def projection(self, modality: str, h: torch.Tensor) -> torch.Tensor:
        """The teacher head's L2-normalised bottleneck of backbone output ``h``: its logits over the K prototypes are
        ``projection @ prototypes(modality).T``, so analysis keeps D numbers a sample instead of K."""
        head = self.teachers[modality].head
        return F.normalize(head.mlp(h), dim=-1, p=2)

    def prototypes(self, modality: str) -> torch.Tensor:
        """[K, bottleneck] the teacher head's last layer (weight norm applied): the K prototypes."""
        return self.teachers[modality].head.last_layer.weight.detach()

    def _teacher_backbone(self, modality: str) -> nn.Module:
        if modality not in self.teachers:
            raise ModelError(f"this DINO run trains no {modality} branch (dino.directions)")
        return self.teachers[modality].backbone


def _synced_batchnorms(module: nn.Module) -> nn.Module:
    """Every BatchNorm1d (dino.use_bn_in_head) as SyncBatchNorm1d, as upstream converts the head to SyncBatchNorm:
    statistics over every rank's rows, so 2 ranks x 4 rows equal 1 process x 8 rows."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            synced = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            _synced_batchnorms(child)
    return module


def _is_cross_modal(direction: str) -> bool:
    teacher, student = parse_direction(direction)
    return teacher != student


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_loss(z_a: torch.Tensor, z_b: torch.Tensor, sim: float = 25.0, std: float = 25.0, cov: float = 1.0):
    """Upstream VICReg: invariance on this rank's rows; variance and covariance on every rank's rows.

    Divided by the batch actually gathered (the 2023 code divided by the global batch while holding only the
    local one, so its loss changed with the number of GPUs). Returns (loss, {"sim", "std", "cov"}).
    """
    z_a, z_b = z_a.float(), z_b.float()
    repr_loss = F.mse_loss(z_a, z_b)
    x, y = gather_rows(z_a), gather_rows(z_b)
    n, dim = x.shape
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(dim) + off_diagonal(cov_y).pow_(2).sum().div(dim)
    loss = sim * repr_loss + std * std_loss + cov * cov_loss
    return loss, {"sim": repr_loss.detach(), "std": std_loss.detach(), "cov": cov_loss.detach()}


def embedding_std(h: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings: about 1/sqrt(D) when healthy, 0 when collapsed."""
    with torch.no_grad():
        return F.normalize(h.float(), dim=1).std(dim=0).mean()


def view_channels(mode: str) -> tuple[int, int]:
    """Channels of the first (RGB-slot) and second (IR-slot) view that a ``mode`` feeds the two branches."""
    return (1 if mode == "grey-ir" else 3, 3 if mode == "ir3" else 1)


def model_spec(config: TrainingConfig) -> dict:
    """What fixes the model's shapes: saved in every checkpoint and compared on resume and in analysis."""
    m, d = config.model, config.data
    return {
        "objective": m.objective, **_dino_spec(config),
        "mode": m.mode, "rgb_arch": m.rgb_arch, "ir_arch": m.ir_arch, "rgb_patch": m.rgb_patch, "ir_patch": m.ir_patch,
        "depth": m.depth, "expander": list(m.expander),
        "first_hw": list(tiled_size(d.rgb_size, m.rgb_patch, d.fit)),
        "second_hw": list(tiled_size(d.ir_size, m.ir_patch, d.fit)),
        "channels": list(view_channels(m.mode)),
    }


def _dino_spec(config: TrainingConfig) -> dict:
    if config.model.objective != "dino":
        return {}
    d = config.dino
    return {"head": [d.out_dim, d.hidden_dim, d.bottleneck_dim, d.nlayers, d.norm_last_layer, d.use_bn_in_head],
            "modalities": list(config.modalities), "directions": list(d.directions)}


def initial_model(config: TrainingConfig, spec: dict | None = None) -> VICReg | DINOModel:
    """The model a run starts from: seeded by train.seed, so analysis' random-init baseline is exactly it."""
    spec = model_spec(config) if spec is None else spec
    torch.manual_seed(config.train.seed)
    if config.model.objective == "dino":
        return DINOModel(config, tuple(spec["first_hw"]), tuple(spec["second_hw"]), tuple(spec["channels"]))
    return VICReg(config.model, tuple(spec["first_hw"]), tuple(spec["second_hw"]), tuple(spec["channels"]))
