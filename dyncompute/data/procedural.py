"""Procedural shapes: a CPU-sized dataset on which dynamic-compute claims can be checked.

Each image carries its class in textured objects (class = shape x texture) sitting on smooth,
low-information backgrounds, and the textured share of the image varies from image to image
(roughly ``detail_range``). Token compression is therefore natural but not uniform, and the
ground-truth ``mask`` says where the detail is, so a model's compute map can be scored against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dyncompute.errors import ConfigError
from dyncompute.registry import DATASETS

# Each shape is a predicate on object-local coordinates (u, v) in [-1, 1]^2, image y pointing down.
SHAPES = {
    "disc": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.85,
    "triangle": lambda u, v: (u.abs() <= (v + 1.0) / 2.0) & (v <= 1.0),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.3),
    "cross": lambda u, v: ((u.abs() <= 0.33) & (v.abs() <= 1.0)) | ((v.abs() <= 0.33) & (u.abs() <= 1.0)),
}
# Area of each shape in units of R^2 (R = half the object's box): the first guess of the object size.
SHAPE_AREA = {"disc": math.pi, "square": 2.89, "triangle": 2.0, "ring": 0.7 * math.pi, "cross": 2.23}
TEXTURES = ("stripes", "checker", "dots", "noise")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
_RGB_TO_GRAY = torch.tensor([0.299, 0.587, 0.114])


def class_to_shape_texture(label: int) -> tuple[str, str]:
    """Shapes vary fastest, so the default 10 classes are all five shapes, striped then checkered."""
    shapes = list(SHAPES)
    return shapes[label % len(shapes)], TEXTURES[label // len(shapes)]


def item_seed(seed: int, index: int) -> int:
    """One generator seed per (seed, index): items never depend on worker, order or global RNG."""
    return (seed * 1_000_003 + index) % (2**63)


class _Draws:
    """Uniform numbers drawn in one call and handed out as Python floats (cheap per item)."""

    def __init__(self, generator: torch.Generator, n: int = 96):
        self._values = torch.rand(n, generator=generator).tolist()

    def __call__(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * self._values.pop()


@DATASETS.register("procedural")
class ProceduralShapes(Dataset):
    """Class-conditional textured shapes on smooth backgrounds, with a ground-truth detail mask.

    Items are ``{"x": (C, H, W) float in [-1, 1], "y": long scalar, "mask": (H, W) bool}``; the mask
    marks textured object pixels plus a 1-px band around each object boundary (background False).
    Labels are ``index % num_classes`` so every split is exactly class-balanced.
    """

    def __init__(
        self,
        size: int = 32,
        channels: int = 3,
        num_classes: int = 10,
        length: int = 10_000,
        seed: int = 0,
        detail_range: tuple[float, float] = (0.15, 0.6),
    ):
        _check_args(size, channels, num_classes, length, detail_range)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"datasets.procedural.seed = {seed!r}: must be an int")
        self.size, self.channels, self.num_classes = size, channels, num_classes
        self.length, self.seed = length, seed
        self.detail_range = (float(detail_range[0]), float(detail_range[1]))
        self.period = max(4, size // 8)  # texture period in pixels: visible at 16x16, not noise
        axis = torch.arange(size, dtype=torch.float32)
        ys, xs = torch.meshgrid(axis, axis, indexing="ij")
        self._xs, self._ys = xs + 0.5, ys + 0.5  # pixel centres

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for ProceduralShapes of length {self.length}")
        g = torch.Generator().manual_seed(item_seed(self.seed, index))
        draw = _Draws(g)
        label = index % self.num_classes
        shape, texture = class_to_shape_texture(label)
        background = self._background(draw)
        objects, mask = self._objects(shape, draw)
        colour_a, colour_b = _object_colours(draw)
        t = self._texture(texture, draw, g).unsqueeze(0)
        rgb = torch.where(objects, colour_a * (1 - t) + colour_b * t, background)
        return {"x": self._to_channels(rgb), "y": torch.tensor(label, dtype=torch.long), "mask": mask}

    # -- backgrounds ---------------------------------------------------------------------------

    def _background(self, draw: _Draws) -> torch.Tensor:
        """Flat colour, linear gradient or radial gradient between two muted colours: (3, H, W)."""
        c0 = torch.tensor([draw(-0.7, 0.7) for _ in range(3)]).view(3, 1, 1)
        c1 = torch.tensor([draw(-0.7, 0.7) for _ in range(3)]).view(3, 1, 1)
        kind = int(draw(0, 3))
        if kind == 0:
            return c0.expand(3, self.size, self.size).clone()
        x, y = self._xs / self.size, self._ys / self.size
        if kind == 1:
            angle = draw(0, 2 * math.pi)
            ramp = 0.5 + ((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)) / math.sqrt(2)
        else:
            cx, cy = draw(0.2, 0.8), draw(0.2, 0.8)
            ramp = ((x - cx) ** 2 + (y - cy) ** 2).sqrt() / math.sqrt(0.5)
        return c0 + (c1 - c0) * ramp.clamp(0, 1)

    # -- objects -------------------------------------------------------------------------------

    def _objects(self, shape: str, draw: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
        """1-3 objects sized so the detail mask covers a target fraction drawn from detail_range."""
        target = draw(*self.detail_range)
        count = 1 + int(draw(0, min(3, max(1, int(target / 0.1)))))  # small targets: few, legible objects
        layout = _spread_layout(draw, count)
        radius = math.sqrt(target * self.size**2 / (count * SHAPE_AREA[shape]))
        objects, mask = self._render(shape, radius, layout)
        for _ in range(2):  # multiplicative corrections absorb overlaps, clipping and the 1-px band
            radius *= math.sqrt(target / max(mask.float().mean().item(), 1e-3))
            objects, mask = self._render(shape, radius, layout)
        return objects, mask

    def _render(self, shape: str, radius: float, layout: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Union of the objects (object mask) and its 1-px dilation (detail mask), both (H, W)."""
        radius = min(max(radius, 2.0), 0.5 * self.size)
        margin = 0.7 * radius
        cx = torch.tensor([margin + px * (self.size - 2 * margin) for px, _, _ in layout]).view(-1, 1, 1)
        cy = torch.tensor([margin + py * (self.size - 2 * margin) for _, py, _ in layout]).view(-1, 1, 1)
        angle = torch.tensor([a for _, _, a in layout]).view(-1, 1, 1)
        dx, dy = (self._xs - cx) / radius, (self._ys - cy) / radius
        u = dx * angle.cos() + dy * angle.sin()
        v = -dx * angle.sin() + dy * angle.cos()
        objects = SHAPES[shape](u, v).any(0)
        mask = F.max_pool2d(objects[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()
        return objects, mask

    # -- textures ------------------------------------------------------------------------------

    def _texture(self, texture: str, draw: _Draws, g: torch.Generator) -> torch.Tensor:
        """A two-tone pattern t in [0, 1] over the whole image, (H, W); objects reveal it."""
        p, angle = self.period, draw(-math.pi / 4, math.pi / 4)
        if texture in ("checker", "dots"):
            angle = 0.0  # rotated 2-px grids alias into mazes at 16-32 px
        u = self._xs * math.cos(angle) + self._ys * math.sin(angle) + draw(0, p)
        v = -self._xs * math.sin(angle) + self._ys * math.cos(angle) + draw(0, p)
        if texture == "stripes":
            return ((u / p) % 1.0 < 0.5).float()
        if texture == "checker":
            return (((u // (p / 2)) + (v // (p / 2))) % 2).float()
        if texture == "dots":
            du, dv = (u % p) - p / 2, (v % p) - p / 2
            return (du * du + dv * dv <= (0.3 * p) ** 2).float()
        return torch.rand(self.size, self.size, generator=g)

    def _to_channels(self, rgb: torch.Tensor) -> torch.Tensor:
        """3 channels as is; 1 = luminance; 4 = RGB plus a red-blue opponent channel (latent-like)."""
        if self.channels == 3:
            return rgb
        if self.channels == 1:
            return (rgb * _RGB_TO_GRAY.view(3, 1, 1)).sum(0, keepdim=True)
        return torch.cat([rgb, 0.5 * (rgb[:1] - rgb[2:])])


def _spread_layout(draw: _Draws, count: int, tries: int = 4) -> list[tuple[float, float, float]]:
    """(x, y, angle) per object; best of a few draws by closest pair, so objects rarely merge."""

    def closest(layout):
        pairs = [(a, b) for i, a in enumerate(layout) for b in layout[i + 1 :]]
        return min((math.dist(a[:2], b[:2]) for a, b in pairs), default=0.0)

    candidates = [[(draw(), draw(), draw(-math.pi / 6, math.pi / 6)) for _ in range(count)] for _ in range(tries)]
    return max(candidates, key=closest)


def _object_colours(draw: _Draws) -> tuple[torch.Tensor, torch.Tensor]:
    """Two strongly contrasting colours (every channel, hence luminance, differs by >= 0.6)."""
    a = torch.tensor([draw(0.4, 1.0) * (1 if draw() < 0.5 else -1) for _ in range(3)])
    b = -a * draw(0.6, 1.0)
    return a.view(3, 1, 1), b.view(3, 1, 1)


def _check_args(size, channels, num_classes, length, detail_range) -> None:
    name = "datasets.procedural"
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
        raise ConfigError(f"{name}.size = {size!r}: must be an int >= 8 divisible by 8 (e.g. 16, 32, 64)")
    if channels not in (1, 3, 4) or isinstance(channels, bool):
        raise ConfigError(f"{name}.channels = {channels!r}: must be 1, 3 or 4")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"{name}.num_classes = {num_classes!r}: must be an int in [1, {MAX_CLASSES}] "
                          "(shapes x textures)")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"{name}.length = {length!r}: must be a positive int")
    try:
        low, high = (float(v) for v in detail_range)
    except (TypeError, ValueError):
        low, high = math.nan, math.nan
    if not 0.0 < low <= high < 1.0:
        raise ConfigError(f"{name}.detail_range = {detail_range!r}: must be (low, high) with 0 < low <= high < 1")
