"""Datasets for the demo and the study: scikit-learn's digits (ships inside the package) or an ImageFolder.

Everything is loaded into memory as float tensors in [0, 1], shape (N, C, S, S); augmentation happens on
the training device with kornia (see :mod:`train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Split:
    x_train: Tensor  # (N, C, S, S) in [0, 1]
    y_train: Tensor  # (N,) long
    x_test: Tensor
    y_test: Tensor
    name: str
    classes: int

    @property
    def mean(self) -> Tuple[float, ...]:
        return tuple(self.x_train.mean(dim=(0, 2, 3)).tolist())

    @property
    def std(self) -> Tuple[float, ...]:
        return tuple(self.x_train.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def _stratified_split(y: np.ndarray, test_share: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_share, random_state=seed, stratify=y)
    return np.sort(tr), np.sort(te)


def load_digits_split(size: int = 32, channels: int = 3, test_share: float = 0.25, split_seed: int = 0) -> Split:
    """scikit-learn's 1,797 handwritten 8x8 digits, upscaled (bilinear) to ``size`` x ``size``.

    The split is fixed (``split_seed``), independent of the training seed, so seeds vary only training.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = _stratified_split(d.target, test_share, split_seed)
    return Split(x[tr], y[tr], x[te], y[te], f"digits{size}", 10)


def load_image_folder(path: str, size: int = 32, channels: int = 3, test_share: float = 0.25, split_seed: int = 0,
                      max_per_class: Optional[int] = None) -> Split:
    """An ImageFolder-style directory (``path/<class>/<image>``): resized (shorter side) and centre-cropped to
    ``size``, held in memory. If ``path`` has ``train/`` and ``val/`` (or ``test/``) sub-folders they are used as
    the split; otherwise a stratified split with ``test_share``.
    """
    from torchvision import datasets, transforms

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {path}: not a directory (expected path/<class>/<images>).")
    tf = transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.Grayscale(channels) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.ToTensor(),
    ])

    def read(folder: Path) -> Tuple[Tensor, Tensor, list]:
        ds = datasets.ImageFolder(str(folder), transform=tf)
        keep = list(range(len(ds)))
        if max_per_class is not None:
            counts: dict = {}
            keep = [i for i, (_, c) in enumerate(ds.samples) if counts.setdefault(c, 0) < max_per_class and not counts.__setitem__(c, counts[c] + 1)]
        xs = torch.stack([ds[i][0] for i in keep])
        ys = torch.tensor([ds.samples[i][1] for i in keep], dtype=torch.long)
        return xs, ys, ds.classes

    split_dirs = [root / "train", root / "val" if (root / "val").is_dir() else root / "test"]
    if all(p.is_dir() for p in split_dirs):
        xtr, ytr, classes = read(split_dirs[0])
        xte, yte, _ = read(split_dirs[1])
        return Split(xtr, ytr, xte, yte, root.name, len(classes))
    x, y, classes = read(root)
    tr, te = _stratified_split(y.numpy(), test_share, split_seed)
    return Split(x[tr], y[tr], x[te], y[te], root.name, len(classes))


def _tiles(img: np.ndarray, tile: int, test_cols: float) -> Tuple[Tensor, Tensor]:
    """Non-overlapping ``tile`` x ``tile`` crops of a grey image (H, W) in [0, 1]; the right ``test_cols`` share of
    the tile columns goes to the test split (spatially disjoint from the training tiles)."""
    h, w = img.shape[0] // tile, img.shape[1] // tile
    t = torch.tensor(img[: h * tile, : w * tile], dtype=torch.float32)
    t = t.view(h, tile, w, tile).permute(0, 2, 1, 3)  # (h, w, tile, tile)
    cut = w - max(1, int(round(w * test_cols)))
    return t[:, :cut].reshape(-1, 1, tile, tile), t[:, cut:].reshape(-1, 1, tile, tile)


def _grey(im: np.ndarray) -> np.ndarray:
    im = np.asarray(im)
    if im.dtype == bool:
        im = im.astype(np.float64)
    elif im.dtype == np.uint8:
        im = im / 255.0
    if im.ndim == 3:
        im = im[..., :3] @ np.array([0.299, 0.587, 0.114])
    return im.astype(np.float32)


def _patch_split(images: Dict[str, np.ndarray], size: int, channels: int, name: str, tile: int = 32,
                 target_tiles: Optional[int] = None) -> Split:
    """A patch-classification set: class = the source image; tiles resized to ``size``."""
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for c, (_, im) in enumerate(sorted(images.items())):
        g = _grey(im)
        if target_tiles is not None:  # resize so the image holds about target_tiles tiles (aspect kept)
            f = math.sqrt(target_tiles * tile * tile / (g.shape[0] * g.shape[1]))
            g = F.interpolate(torch.tensor(g)[None, None], scale_factor=f, mode="bilinear", antialias=True,
                              align_corners=False)[0, 0].clamp(0, 1).numpy()
        tr, te = _tiles(g, tile, 0.25)
        xs_tr.append(tr), xs_te.append(te)
        ys_tr.append(torch.full((len(tr),), c)), ys_te.append(torch.full((len(te),), c))

    def prep(x: list) -> Tensor:
        t = torch.cat(x)
        if size != tile:
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return t.expand(-1, channels, -1, -1).contiguous()

    return Split(prep(xs_tr), torch.cat(ys_tr).long(), prep(xs_te), torch.cat(ys_te).long(), f"{name}{size}", len(images))


TEXTURES = ("brick", "grass", "gravel", "moon")
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "hubble_deep_field", "immunohistochemistry",
          "page", "clock")


def load_textures_split(size: int = 32, channels: int = 3) -> Split:
    """scikit-image's texture photographs (brick, grass, gravel; 512x512) and its lunar-surface image (moon):
    4 classes, 256 non-overlapping 32 px tiles each at full resolution (the right quarter of each image is the
    test split: 768 train / 256 test), resized to ``size``. Ships inside scikit-image; no download."""
    import skimage.data as sd

    return _patch_split({n: getattr(sd, n)() for n in TEXTURES}, size, channels, "textures")


def load_photos_split(size: int = 32, channels: int = 3) -> Split:
    """Patch classification on scikit-image's photographs (astronaut, camera, chelsea, coffee, rocket, coins,
    hubble_deep_field, immunohistochemistry, page, clock) and scikit-learn's two sample images (china, flower):
    12 classes (class = source photograph), greyscale, each photo resized to hold about 144 tiles of 32 px
    (right quarter = test split), tiles resized to ``size``. Ships inside the packages; no download."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    ims = {n: getattr(sd, n)() for n in PHOTOS}
    sk = load_sample_images()
    for fname, im in zip(sk.filenames, sk.images):
        ims[Path(fname).stem] = im
    return _patch_split(ims, size, channels, "photos", target_tiles=144)


DATASETS = ("digits", "textures", "photos")


def load_data(path: Optional[str], size: int = 32, channels: int = 3) -> Split:
    """``None`` or ``"digits"``: scikit-learn digits; ``"textures"`` / ``"photos"``: the scikit-image patch sets;
    anything else: an ImageFolder directory."""
    if path is None or path == "digits":
        return load_digits_split(size, channels)
    if path == "textures":
        return load_textures_split(size, channels)
    if path == "photos":
        return load_photos_split(size, channels)
    return load_image_folder(path, size, channels)


def compose_scene(x: Tensor, y: Tensor, canvas: int, generator: torch.Generator, per_canvas: int = 2,
                  ink: Optional[float] = 0.2, clutter: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Scenes for the dense probe: ``per_canvas`` images of *different* classes pasted at random, non-overlapping
    integer positions on a black ``canvas`` x ``canvas`` image (one scene per group of ``per_canvas`` consecutive
    images after a seeded shuffle). Returns the scenes (M, C, canvas, canvas) and the per-pixel labels (M, canvas,
    canvas): 0 = background, ``1 + class`` where an image covers the pixel — its strokes only (pixels whose mean
    intensity exceeds ``ink``) when ``ink`` is given, the whole pasted square when ``ink`` is None. ``clutter`` > 0
    fills the background with smooth noise (Gaussian-blurred, sigma 2 px) of that standard deviation around 0.5·clutter,
    so telling object from background takes more than "not black". Also returns the pasted squares
    (M, per_canvas, 4) as ``(x0, y0, x1, y1)`` and their classes in a last column: (M, per_canvas, 5)."""
    n, c, s, _ = x.shape
    order = torch.randperm(n, generator=generator)
    scenes, labels, objs = [], [], []
    i = 0
    while i + per_canvas <= n:
        group = [int(order[i])]
        j = i + 1
        while len(group) < per_canvas and j < n:  # the next images whose class is not in the scene yet
            if all(int(y[int(order[j])]) != int(y[g]) for g in group):
                group.append(int(order[j]))
                order[[i + len(group) - 1, j]] = order[[j, i + len(group) - 1]]
            j += 1
        i += per_canvas
        if len(group) < per_canvas:
            break
        img = torch.zeros(c, canvas, canvas)
        if clutter > 0:
            import kornia

            noise = torch.randn(1, 1, canvas, canvas, generator=generator)
            noise = kornia.filters.gaussian_blur2d(noise, (13, 13), (2.0, 2.0))
            noise = noise / noise.std().clamp_min(1e-6)
            img[:] = (0.5 * clutter + clutter * noise[0]).clamp(0, 1)
        lab = torch.zeros(canvas, canvas, dtype=torch.long)
        for _ in range(1000):  # rejection sampling of free positions for the whole scene
            pos = torch.randint(0, canvas - s + 1, (per_canvas, 2), generator=generator).tolist()
            if all(p[0] + s <= o[0] or o[0] + s <= p[0] or p[1] + s <= o[1] or o[1] + s <= p[1]
                   for a, p in enumerate(pos) for o in pos[a + 1:]):
                break
        else:
            raise ValueError(f"cannot place {per_canvas} images of {s} px without overlap on a {canvas} px canvas")
        for k, (r, q) in zip(group, pos):
            img[:, r : r + s, q : q + s] = x[k]
            fg = (x[k].mean(0) > ink) if ink is not None else torch.ones(s, s, dtype=torch.bool)
            lab[r : r + s, q : q + s][fg] = 1 + int(y[k])
        scenes.append(img)
        labels.append(lab)
        objs.append(torch.tensor([[q, r, q + s, r + s, int(y[k])] for k, (r, q) in zip(group, pos)]))
    return torch.stack(scenes), torch.stack(labels), torch.stack(objs)
