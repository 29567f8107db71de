"""Physically plausible synthetic scenes for the synthetic SAGE generator (pure functions of their inputs).

A scene is a function of view coordinates (u across, v down, both 0..1 over the optical half's field of
view). The optical image samples it on the whole view; the thermal image samples the same scene on the crop
box that the thermal camera sees, so the two modalities agree pixel for pixel the way the real alignment
says they should. World elevation angle decides sky versus ground, so a preset's tilt decides how much sky
it sees: presets 1, 5, ..., 29 look at the sky.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = ["SceneSpec", "TILT_NAMES", "render_optical", "render_thermal", "false_colour"]

TILT_NAMES = ("sky", "horizon", "below", "ground")
_TILT_CENTRE_DEG = (50.0, 8.0, -15.0, -45.0)  # world elevation at the centre of the view, per tilt
_FOV_V_DEG = 45.0  # vertical field of view of the optical half


@dataclass(frozen=True)
class SceneSpec:
    vsn: str
    azimuth: int  # 0..7 (S, SW, W, NW, N, NE, E, SE)
    tilt: int  # 0..3 (sky, horizon, below, ground)
    sun_elevation_deg: float
    cloud_fraction: float  # of the sky area, 0..1
    air_celsius: float
    seed: int  # per-frame randomness: cloud shapes, noise


def _stable_rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _elevation(spec: SceneSpec, v: np.ndarray) -> np.ndarray:
    return _TILT_CENTRE_DEG[spec.tilt] + (0.5 - v) * _FOV_V_DEG


def _horizon(spec: SceneSpec, u: np.ndarray) -> np.ndarray:
    rng = _stable_rng(spec.vsn, "horizon", spec.azimuth)
    a1, a2, p1, p2 = rng.uniform(0.5, 2.0), rng.uniform(0.2, 1.0), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
    return a1 * np.sin(2 * np.pi * 1.3 * u + p1) + a2 * np.sin(2 * np.pi * 4.1 * u + p2)


def _objects(spec: SceneSpec, u: np.ndarray, elev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the fixed objects of this azimuth: a pole and a building (same place every visit)."""
    rng = _stable_rng(spec.vsn, "objects", spec.azimuth)
    pole_u, building_u = rng.uniform(0.1, 0.85), rng.uniform(0.05, 0.7)
    building_w, building_top = rng.uniform(0.12, 0.3), rng.uniform(3.0, 9.0)
    pole = (np.abs(u - pole_u) < 0.012) & (elev < 14.0)
    building = (u > building_u) & (u < building_u + building_w) & (elev < building_top) & ~pole
    if spec.azimuth % 3 == 2:  # not every direction has a building
        building &= False
    return pole, building


def _clouds(spec: SceneSpec, u: np.ndarray, v: np.ndarray, threshold: float | None = None):
    """Smooth cloud field in 0..1 and the opacity for the requested cloud fraction."""
    rng = np.random.default_rng(spec.seed)
    field = np.zeros(np.broadcast(u, v).shape)
    for _ in range(7):
        kx, ky = rng.uniform(0.6, 5.0), rng.uniform(0.6, 5.0)
        phase = rng.uniform(0, 2 * np.pi)
        angle = rng.uniform(0, np.pi)
        field += np.sin(2 * np.pi * (kx * np.cos(angle) * u + ky * np.sin(angle) * v) + phase) / kx
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    if threshold is None:
        threshold = float(np.quantile(field, 1 - spec.cloud_fraction)) if spec.cloud_fraction > 0 else 2.0
    opacity = np.clip((field - threshold) / 0.12, 0, 1)
    return field, opacity, threshold


def _grid(shape: tuple[int, int], box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    left, top, right, bottom = box
    u = left + (np.arange(w) + 0.5) / w * (right - left)
    v = top + (np.arange(h) + 0.5) / h * (bottom - top)
    return u[None, :], v[:, None]


def _cloud_threshold(spec: SceneSpec) -> float:
    """Threshold set on a fixed coarse grid of the whole view, so both modalities cut clouds the same way."""
    u, v = _grid((96, 144), (0.0, 0.0, 1.0, 1.0))
    return _clouds(spec, u, v)[2]


def render_optical(spec: SceneSpec, shape: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (H, W, 3) of the whole optical view."""
    u, v = _grid(shape, (0.0, 0.0, 1.0, 1.0))
    elev = np.broadcast_to(_elevation(spec, v), shape)
    u2 = np.broadcast_to(u, shape)
    sky = elev > _horizon(spec, u2)
    cloud_field, opacity, _ = _clouds(spec, u2, np.broadcast_to(v, shape), _cloud_threshold(spec))
    day = float(np.clip((spec.sun_elevation_deg + 6.0) / 16.0, 0.0, 1.0))
    above = np.clip((elev - _horizon(spec, u2)) / 60.0, 0, 1)[..., None]
    sky_day = np.array([0.75, 0.85, 0.95]) * (1 - above) + np.array([0.30, 0.50, 0.88]) * above
    sky_rgb = np.array([0.02, 0.03, 0.07]) + day * (sky_day - np.array([0.02, 0.03, 0.07]))
    cloud_rgb = (0.08 + day * 0.84) * (0.82 + 0.18 * cloud_field[..., None]) * np.array([1.0, 1.0, 1.02])
    tex = _texture(spec, u2, np.broadcast_to(v, shape))[..., None]
    ground_day = np.array([0.26, 0.34, 0.16]) + 0.05 * tex * np.array([1.0, 0.8, 0.5])
    ground_rgb = np.array([0.03, 0.03, 0.025]) + day * (ground_day - np.array([0.03, 0.03, 0.025]))
    o = (opacity * sky)[..., None]
    rgb = np.where(sky[..., None], sky_rgb * (1 - o) + cloud_rgb * o, ground_rgb)
    pole, building = _objects(spec, u2, elev)
    lit = max(day, 0.08)
    rgb[building] = np.array([0.55, 0.40, 0.30]) * lit
    if day < 0.2:
        windows = building & ((np.floor(u2 * 80) % 3 == 0) & (np.floor(elev) % 3 == 0))
        rgb[windows] = np.array([0.9, 0.8, 0.45])
    rgb[pole] = np.array([0.30, 0.30, 0.32]) * lit
    noise = np.random.default_rng(spec.seed + 1).normal(0, 0.012, rgb.shape)
    return (np.clip(rgb + noise, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_thermal(spec: SceneSpec, shape: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Temperatures in °C, float32 (H, W), of the part of the view inside ``box`` (fractions of the view)."""
    u, v = _grid(shape, box)
    elev = np.broadcast_to(_elevation(spec, v), shape)
    u2 = np.broadcast_to(u, shape)
    horizon = _horizon(spec, u2)
    sky = elev > horizon
    cloud_field, opacity, _ = _clouds(spec, u2, np.broadcast_to(v, shape), _cloud_threshold(spec))
    air = spec.air_celsius
    clear = air - 55.0 + 45.0 * np.exp(-np.maximum(elev - horizon, 0) / 12.0)
    cloud = air - 16.0 + 8.0 * cloud_field
    sun = max(np.sin(np.radians(spec.sun_elevation_deg)), 0.0)
    tex = _texture(spec, u2, np.broadcast_to(v, shape))
    # Sunlit ground warms unevenly (soil, grass, shade differ); at night it cools to nearly one temperature, so
    # by day a thermal image has far more contrast than by night.
    ground = air + 14.0 * sun - 3.0 * (sun == 0) + (1.5 + 8.0 * sun) * tex
    temps = np.where(sky, clear * (1 - opacity) + cloud * opacity, ground)
    pole, building = _objects(spec, u2, elev)
    temps = np.where(building, 18.0 + 6.0 * sun, temps)
    temps = np.where(pole, ground + 4.0 * sun, temps)
    noise = np.random.default_rng(spec.seed + 2).normal(0, 0.15, shape)
    # The camera reports hundredths of a degree.
    return np.round(temps + noise, 2).astype(np.float32)


def _texture(spec: SceneSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fixed ground texture of this azimuth, bilinearly sampled at view coordinates (u, v)."""
    small = _stable_rng(spec.vsn, "texture", spec.azimuth).normal(0, 1, (24, 36))
    h, w = small.shape
    y = np.clip(v * (h - 1), 0, h - 1)
    x = np.clip(u * (w - 1), 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    top = small[y0, x0] * (1 - fx) + small[y0, x1] * fx
    bottom = small[y1, x0] * (1 - fx) + small[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def false_colour(celsius: np.ndarray) -> np.ndarray:
    """Palette render of a thermal frame (what the camera draws in the right half), uint8 (H, W, 3)."""
    finite = np.nan_to_num(celsius, nan=float(np.nanmin(celsius)) if np.isfinite(celsius).any() else 0.0)
    lo, hi = np.percentile(finite, [1, 99])
    t = np.clip((finite - lo) / max(hi - lo, 1e-3), 0, 1)
    r = np.clip(1.5 * t, 0, 1)
    g = np.clip(1.5 * t - 0.5, 0, 1)
    b = np.clip(np.sin(np.pi * t) * 0.8 + (t > 0.85) * (t - 0.85) * 4, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)
