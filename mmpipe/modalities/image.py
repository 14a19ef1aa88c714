"""Image modality: its params, validation and normalisation (clean), fixed-size pixel features
(preprocess), corruptions for the robustness sweep (evaluate), its encoder and its predictor input."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Callable, Literal

import numpy as np
import pyarrow as pa
import pyspng
import simplejpeg
from pydantic import Field, model_validator

from mmpipe.errors import PipelineError
from mmpipe.modalities import inputs
from mmpipe.modalities.base import Cleaned
from mmpipe.modalities.portable import PASS_THROUGH_FORMATS, decode_image, describe, load_pixels
from mmpipe.schema import Backbone, Embeddable, Strict

NAME = "image"
EXTENSIONS = (".png", ".jpg", ".jpeg")
# How clean stores the normalised content, and which facts of clean's info it keeps as columns.
STORED_AS = pa.binary()
INFO_COLUMNS = {"width": pa.int32(), "height": pa.int32()}
INLINE = False
PREDICTOR_INPUT = (Path(inputs.__file__), "ImageInput")


# --------------------------------------------------------------------------- params


class Clean(Strict):
    min_side: int = Field(8, ge=1)
    max_side: int = Field(4096, ge=1)
    max_pixels: int = Field(16_777_216, ge=1, le=89_478_485)  # at most Pillow's own decompression-bomb limit

    @model_validator(mode="after")
    def _check(self) -> "Clean":
        self.check_order(("min_side", "max_side"))
        return self


class Preprocess(Embeddable):
    # auto: the resolution a torchvision backbone's weights were trained at, else the train images' median
    # short side within AUTO_SIZE (resolve_preprocess)
    size: Annotated[int, Field(ge=8, le=1024)] | Literal["auto"] = "auto"
    mode: Literal["rgb", "grayscale"] = "rgb"
    fit: Literal["pad", "crop"] = "pad"


class Encoder(Backbone):
    # arch: small_cnn (PixelCNN) or any torchvision classification architecture by name (resnet18, resnet50,
    # mobilenet_v3_large, efficientnet_b0, convnext_tiny, vit_b_16, ...): mmpipe/models/backbones.py;
    # weights: a local state-dict file (.pt/.pth/.safetensors)
    width: int = Field(24, ge=4, le=512)  # small_cnn only


PARAMS = {"clean": Clean, "preprocess": Preprocess, "model": Encoder}

# the encoder's width under each preset (params.PRESETS; balanced = the schema default)
PRESETS = {"quick": {"model": {"width": 16}}, "balanced": {"model": {"width": 24}},
           "best": {"model": {"width": 32}}}


# small_cnn's side for ``size: auto``: the train images' median short side, to a multiple of 8, within these
# bounds — a network trained from scratch costs in proportion to the pixels (64 px: 4x the built-in 32), and
# past that a pretrained backbone (whose own resolution ``auto`` takes) is the better use of the compute
AUTO_SIZE = (16, 64)


def resolve_preprocess(cfg: Preprocess, encoder: Encoder | None, train_info: dict) -> tuple[Preprocess, dict]:
    """``size: auto`` -> the crop size of the torchvision backbone's default weights (224 for a ResNet,
    240 for EfficientNet-B1, ...) when ``model.encoders.image`` is one; with small_cnn, the train images'
    median short side rounded to a multiple of 8 within AUTO_SIZE (the built-in corpus: 32)."""
    if cfg.size != "auto":
        return cfg, {}
    if encoder is not None and encoder.arch != "small_cnn":
        from mmpipe.models.backbones import torchvision_transforms

        transforms, _ = torchvision_transforms(NAME, encoder.arch)
        size = int(transforms.crop_size[0])
        return cfg.model_copy(update={"size": size}), {"size": {
            "value": size, "why": f"the resolution model.encoders.{NAME}.arch {encoder.arch}'s weights were trained at"}}
    short = np.minimum(train_info.get("width", []), train_info.get("height", []))
    if not len(short):
        raise PipelineError(f"preprocess.{NAME}.size: auto reads the train split's image sizes, and it has no image; "
                            f"set a number of pixels")
    median = float(np.median(short))
    size = int(min(max(8 * round(median / 8), AUTO_SIZE[0]), AUTO_SIZE[1]))
    bound = " (the small_cnn bound; a pretrained backbone takes its own resolution)" if size == AUTO_SIZE[1] < median \
        else " (the lower bound)" if size == AUTO_SIZE[0] > median else ""
    return cfg.model_copy(update={"size": size}), {"size": {
        "value": size, "why": f"median short side of {len(short):,} train images: {median:g} px, to a multiple of 8 "
                              f"within {AUTO_SIZE[0]}..{AUTO_SIZE[1]}{bound}"}}


def describe_rules(rules: dict) -> str:
    return (f"images (PNG, JPEG, BMP, GIF, TIFF, WebP) with sides of {rules['min_side']}–{rules['max_side']} pixels "
            f"and at most {rules['max_pixels']:,} pixels")


def clean(data: bytes, cfg) -> Cleaned:
    """Decode under clean.image's bounds (portable.decode_image), convert to 8-bit L/RGB; re-encode as
    PNG only when needed."""
    normalized, facts = decode_image(data, cfg.model_dump())
    info = {k: facts[k] for k in ("width", "height", "mode", "format", "original_mode")}
    if facts["format"] in PASS_THROUGH_FORMATS and not facts["changed"]:
        return Cleaned(data, converted=False, info=info)
    out = io.BytesIO()
    normalized.save(out, format="PNG")
    return Cleaned(out.getvalue(), converted=True, info=info)


# --------------------------------------------------------------------------- features (preprocess)

PNG_MAGIC, JPEG_MAGIC = b"\x89PNG", b"\xff\xd8"


def decode_fast(data: bytes, size: int, channels: int) -> np.ndarray | None:
    """libspng (pyspng) / libjpeg-turbo (simplejpeg): 4-7x faster than Pillow on small images (measured).

    Returns (C, size, size) uint8 where no resize or colour conversion is needed — C may be 1 for a
    grey image when ``channels`` is 3: assigning it into a 3-channel row replicates it, exactly as
    Pillow's L -> RGB does. There the pixels are Pillow's, exactly (tested on PNG and JPEG, grey and
    colour). Returns None otherwise, and the caller takes the Pillow path, which the predictor uses.
    """
    try:
        if data.startswith(PNG_MAGIC):
            pixels = pyspng.load(data)
            if pixels.dtype != np.uint8 or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
                return None  # 16-bit or alpha: not what clean writes
        elif data.startswith(JPEG_MAGIC):
            gray = simplejpeg.decode_jpeg_header(data)[2] == "Gray"
            if channels == 1 and not gray:
                return None  # RGB -> L is Pillow's formula, not libjpeg's
            pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB")
        else:
            return None
    except Exception:  # whatever these decoders make of a file, Pillow's path decides
        return None
    if pixels.shape[:2] != (size, size):
        return None
    if pixels.ndim == 2:
        return pixels[None]
    if pixels.shape[2] == 3 and channels == 1:
        return None  # RGB -> L: Pillow path
    return pixels.transpose(2, 0, 1)


class Features:
    """Clean images -> uint8 (C, size, size); per-channel mean/std (0..1 scale) fitted on train."""

    gpu = False  # tiny, decode-bound images; decoding stays on the CPU

    def __init__(self, cfg, dataset: dict):
        self.cfg = cfg
        channels = 1 if cfg.mode == "grayscale" else 3
        self.arrays = {NAME: ((channels, cfg.size, cfg.size), np.uint8)}
        self.stats = (NAME, (0, 2, 3), 1.0 / 255.0)  # array, axes reduced, scale before mean/std

    @classmethod
    def from_state(cls, folder: Path, state: dict) -> "Features":
        """The fitted featurizer back from a preprocess output folder."""
        return cls(SimpleNamespace(size=state["size"], mode=state["mode"], fit=state["fit"]), {})

    def fit(self, train_values: list) -> None:
        pass  # the mean/std are preprocess's running statistics (``stats``)

    def transform(self, items: list[bytes | None], ids: list[str],
                  noise: Callable[[np.ndarray], np.ndarray] | None = None,
                  *, errors: dict[int, str], device: str = "cpu") -> dict[str, np.ndarray]:
        """``noise`` (evaluate's robustness sweep) maps the decoded (n, C, H, W) uint8 pixels of the present
        items. An item that does not decode stays all zeros and is recorded in ``errors`` (position ->
        reason): the caller makes it unavailable and lists it."""
        shape, dtype = self.arrays[NAME]
        out = np.zeros((len(items), *shape), dtype)
        present = np.array([data is not None for data in items], bool)
        for i, data in enumerate(items):
            if data is None:
                continue
            try:
                fast = decode_fast(data, self.cfg.size, shape[0])
                out[i] = fast if fast is not None else load_pixels(data, self.cfg.size, self.cfg.mode, self.cfg.fit)
                # (a 1-channel ``fast`` broadcasts into 3 channels: grey -> RGB replication)
            except Exception as exc:
                errors[i] = f"image does not decode: {describe(exc)}"
                present[i] = False
        if noise is not None and present.any():
            out[present] = noise(out[present])
        return {NAME: out}

    def state(self) -> dict:
        return {"size": self.cfg.size, "mode": self.cfg.mode, "fit": self.cfg.fit, "resample": "bilinear"}

    def save(self, folder) -> None:
        pass

    @staticmethod
    def state_files(state: dict) -> list[str]:
        return []


# --------------------------------------------------------------------------- corruptions (evaluate)


def gaussian_noise(pixels: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, standard deviation ``level`` x the full 0..255 range; level 0 = unchanged."""
    if level <= 0:
        return pixels
    noisy = pixels.astype(np.float32) + rng.normal(0.0, 255.0 * level, pixels.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def occlusion(pixels: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """A black square covering a ``level`` share of each image's area, at a random place."""
    if level <= 0:
        return pixels
    out = pixels.copy()
    height, width = pixels.shape[-2:]
    side_h, side_w = round(height * level ** 0.5), round(width * level ** 0.5)
    tops = rng.integers(0, height - side_h + 1, len(out))
    lefts = rng.integers(0, width - side_w + 1, len(out))
    for image, top, left in zip(out, tops, lefts):
        image[:, top:top + side_h, left:left + side_w] = 0
    return out


CORRUPTIONS = {"gaussian_noise": gaussian_noise, "occlusion": occlusion}


# --------------------------------------------------------------------------- encoder (train)


def build_encoder(state: dict, cfg: Encoder, model):
    channels, size = state["arrays"][NAME]["shape"][:2]
    if cfg.arch != "small_cnn":  # normalised with the backbone's weights' mean/std, not the data's
        from mmpipe.models.backbones import TorchvisionEncoder

        vit = {"image_size": size} if cfg.arch.startswith("vit_") else {}  # ViT builders fix their input size
        return TorchvisionEncoder(NAME, cfg.arch, size, model.dim, cfg.weights, cfg.freeze, cfg.lr_scale,
                                  model.augment, vit, cfg.checkpointing)
    from mmpipe.models.encoders import PixelCNN  # torch only where a model is built

    return PixelCNN(channels, state["mean"], state["std"], model.dim, cfg.width, model.augment)
