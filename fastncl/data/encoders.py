"""Image encoders of ``fastncl data embed``: an image in, region or image vectors out.

Each encoder is built from local files only (nothing is ever downloaded: a missing file is a
one-line error) and has two halves:
* ``preprocess(image)``: a decoded Pillow image -> a numpy array, run on the decoding threads
  (Pillow and numpy, no torchvision);
* ``encode(batch)``: the stacked arrays -> (B, R, D) float32 vectors, R regions or tokens
  (R = 1 for one vector per image), run on the main thread.

Encoders:
* ``patches``: the built-in, dependency-free region descriptor (the emoji set's): the image,
  composited on white, centre-cropped to a square and resized to 72x72, is cut into a 6x6 grid of
  12x12 patches, one 65-d vector per patch (``region_features``). Its vectors are standardised
  with the training split's statistics when the folder is written (``standardise``).
* ``torchscript``: a ``torch.jit`` (or ``torch.export``) image encoder file, with its input size
  and normalisation given as options; its output is (B, D) or (B, T, D).
* ``hf``: a local CLIP-style checkpoint folder read by ``transformers`` (vision tower only).
* ``open_clip``: a local OpenCLIP checkpoint with its architecture name.

Every encoder maps one image to the same vectors whatever else is in its batch, as far as its
arithmetic allows; ``fastncl.data.embed`` keeps the batch boundaries fixed besides, so that the
output does not depend on the number of processes.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from fastncl import FastnclError, optional_import

from .sources import sha256_of

KINDS = ("patches", "torchscript", "hf", "open_clip")
GRANULARITIES = ("image", "tokens")
GRID, PATCH = 6, 12  # patches: a 6x6 grid of 12x12-pixel patches of a 72x72 image
DESCRIPTOR_VERSION = 2  # region_features: bump when its numbers change
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the normalisation CLIP models were trained with
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_HINT = "pip install pillow"


def pil_image():
    return optional_import("PIL.Image", f"decoding images needs Pillow: {PIL_HINT}")


# -- preprocessing (Pillow + numpy) -------------------------------------------------------------
def on_white(im):
    """An RGB image, transparent pixels composited on white (icons, emoji, logos)."""
    image_mod = pil_image()
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = image_mod.new("RGBA", rgba.size, (255, 255, 255, 255))
        return image_mod.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def centre_square(im):
    """The largest centred square of ``im`` (unchanged when it is square)."""
    w, h = im.size
    if w == h:
        return im
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def clip_pixels(im, size: int, mean, std) -> np.ndarray:
    """CLIP's preprocessing in Pillow and numpy: the shorter side resized to ``size`` (bicubic),
    the centre ``size`` x ``size`` crop, scaled to [0, 1] and normalised: (3, size, size) float32."""
    image_mod = pil_image()
    im = on_white(im)
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), image_mod.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def patches_pixels(im) -> np.ndarray:
    """The patches encoder's input: (72, 72, 4) uint8 RGBA, the centre square resized (bilinear)
    when it is not 72x72 already."""
    image_mod = pil_image()
    im = centre_square(im.convert("RGBA"))
    if im.size != (GRID * PATCH, GRID * PATCH):
        im = im.resize((GRID * PATCH, GRID * PATCH), image_mod.Resampling.BILINEAR)
    return np.asarray(im)


def region_features(rgba: np.ndarray) -> np.ndarray:
    """(N, 72, 72, 4) uint8 -> (N, 36, 65) float32 unstandardised region features.

    Per 12x12 patch of the image composited on white: a 3x3 average-pooled RGB thumbnail, the
    colours' mean and standard deviation, the opaque fraction, a hue histogram (8 bins) weighted
    by saturation and opacity plus three grey levels, a histogram of luminance-gradient
    orientations (8 bins) weighted by magnitude, and the patch's row and column (one-hot). Each
    image's vectors depend on that image alone (bit for bit, whatever the batch).
    """
    x = rgba.astype(np.float64) / 255.0
    alpha = x[..., 3:]
    rgb = x[..., :3] * alpha + (1.0 - alpha)  # composited on white
    n = x.shape[0]

    def patches(a):  # (N, 72, 72, C) -> (N, 36, 12, 12, C)
        c = a.shape[-1]
        return a.reshape(n, GRID, PATCH, GRID, PATCH, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, GRID * GRID, PATCH, PATCH, c)

    p_rgb, p_alpha = patches(rgb), patches(alpha)[..., 0]
    thumb = p_rgb.reshape(n, 36, 3, 4, 3, 4, 3).mean(axis=(3, 5)).reshape(n, 36, 27)  # 3x3 cells of 4x4 pixels
    mean = p_rgb.mean(axis=(2, 3))
    std = p_rgb.std(axis=(2, 3))
    coverage = p_alpha.mean(axis=(2, 3))[..., None]
    # colour: hue histogram (8 bins) weighted by saturation x opacity, and 3 grey levels
    mx, mn = p_rgb.max(-1), p_rgb.min(-1)
    chroma = mx - mn
    r, g, b = p_rgb[..., 0], p_rgb[..., 1], p_rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    sat = chroma * p_alpha
    hue_bin = np.minimum((hue * 8).astype(np.int64), 7)
    hue_hist = np.stack([(sat * (hue_bin == k)).mean(axis=(2, 3)) for k in range(8)], axis=-1)
    grey = (1 - chroma) * p_alpha
    grey_bin = np.minimum((mx * 3).astype(np.int64), 2)
    grey_hist = np.stack([(grey * (grey_bin == k)).mean(axis=(2, 3)) for k in range(3)], axis=-1)
    # shape: gradient orientations (8 bins over [0, pi)) of the luminance, weighted by magnitude
    # element-wise arithmetic only (correctly rounded, the same bits on every CPU): no BLAS, whose
    # kernels and summation order follow the CPU, no SIMD-dispatched transcendental functions
    lum = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    gy, gx = np.gradient(lum, axis=(1, 2))
    mag = np.sqrt(gx * gx + gy * gy)
    ori = orientation_bins(gx, gy)
    p_mag, p_ori = patches(mag[..., None])[..., 0], patches(ori[..., None])[..., 0]
    grad_hist = np.stack([(p_mag * (p_ori == k)).mean(axis=(2, 3)) for k in range(8)], axis=-1)
    position = np.concatenate([np.repeat(np.eye(GRID), GRID, axis=0), np.tile(np.eye(GRID), (GRID, 1))], axis=1)
    position = np.broadcast_to(position, (n, 36, 2 * GRID))
    feats = np.concatenate([thumb, mean, std, coverage, hue_hist, grey_hist, grad_hist, position], axis=-1)
    return feats.astype(np.float32)


TAN_PI_8 = 0.41421356237309503  # tan(pi / 8) = sqrt(2) - 1, the nearest double


def orientation_bins(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The bin (0-7) of each gradient's orientation in [0, pi), bin k holding [k pi/8, (k+1) pi/8),
    found by comparisons instead of arctan2: numpy's arctan2 follows the CPU (its AVX-512 routine
    rounds differently), and a gradient on a bin edge (a diagonal edge, gx == gy, is common in
    drawn images) then fell into either bin: the built-in sets' features changed with the machine
    that built them. An edge belongs to the bin above it; a zero gradient to bin 0."""
    flip = (gy < 0) | ((gy == 0) & (gx < 0))  # the opposite direction: the same orientation
    x, y = np.where(flip, -gx, gx), np.where(flip, -gy, gy)  # now y >= 0, and x >= 0 where y == 0
    right = x > 0  # [0, pi/2): edges at pi/8 (y = x tan(pi/8)), pi/4 (y = x), 3pi/8 (x = y tan(pi/8))
    low = (y >= TAN_PI_8 * x).astype(np.int64) + (y >= x) + (x <= TAN_PI_8 * y)
    u = -x  # [pi/2, pi), measured from the vertical: edges at 5pi/8, 3pi/4 (u = y), 7pi/8
    high = 4 + (u >= TAN_PI_8 * y).astype(np.int64) + (u >= y) + (y <= TAN_PI_8 * u)
    return np.where(right, low, np.where(y == 0, 0, high))  # y == 0 off the right half: the zero gradient


# -- checkpoints --------------------------------------------------------------------------------
def _checkpoint(path: str | None, kind: str, what: str) -> Path:
    if not path:
        raise FastnclError(f"--encoder {kind} needs --checkpoint ({what})")
    p = Path(path).expanduser()
    if not p.exists():
        raise FastnclError(f"--checkpoint {p}: does not exist (nothing is downloaded: give a local {what})")
    return p


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _model_error(e: BaseException) -> str:
    """A model's error in one line: a TorchScript interpreter's error ends with the original one."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "TorchScript interpreter" in lines[0]:
        return lines[-1]
    return _first_line(e)


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# -- the encoders -------------------------------------------------------------------------------
class Encoder:
    kind = ""
    standardise = False  # the folder's vectors standardised with the training split's statistics
    default_dtype = "float16"
    granularity = "image"

    def preprocess(self, im) -> np.ndarray:
        raise NotImplementedError

    def encode(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the manifest records: kind, checkpoint and its SHA-256, preprocessing."""
        raise NotImplementedError


class Patches(Encoder):
    kind = "patches"
    standardise = True
    default_dtype = "float32"
    granularity = "tokens"

    def preprocess(self, im):
        return patches_pixels(im)

    def encode(self, batch):
        return region_features(batch)

    def describe(self):
        return {"kind": self.kind, "granularity": "tokens", "preprocessing": {
            "pixels": f"RGBA, centre square, bilinear resize to {GRID * PATCH}x{GRID * PATCH}, composited on white",
            "regions": f"{GRID}x{GRID} patches of {PATCH}x{PATCH} pixels, 65-d descriptor each",
            # 2: the same bits on every CPU (orientation_bins; 1 binned gradients with arctan2)
            "descriptor_version": DESCRIPTOR_VERSION,
            "standardised": "with the training split's mean and standard deviation per dimension"}}


class _TorchEncoder(Encoder):
    """A torch image model: CLIP-style pixels in, (B, D) or (B, T, D) out."""

    def __init__(self, checkpoint: Path, granularity: str, size: int, mean, std, device: str):
        import torch

        self.torch = torch
        self.checkpoint, self.granularity = checkpoint, granularity
        self.size, self.mean, self.std = int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise FastnclError(f"--mean/--std: three values each, std > 0 (got {self.mean}, {self.std})")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, ValueError):
            raise FastnclError(f"--device {device}: not a device (auto, cpu, cuda or cuda:N)") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FastnclError(f"--device {device}: this machine has no CUDA device")

    def preprocess(self, im):
        return clip_pixels(im, self.size, self.mean, self.std)

    def forward(self, x):
        raise NotImplementedError

    def encode(self, batch):
        torch = self.torch
        with torch.inference_mode():
            try:
                out = self.forward(torch.from_numpy(batch).to(self.device))
            except Exception as e:  # noqa: BLE001 (e.g. an input size the model does not take)
                raise FastnclError(f"--checkpoint {self.checkpoint}: the model failed on {batch.shape[0]} images of "
                                   f"{batch.shape[2]}x{batch.shape[3]} pixels ({_model_error(e)}); is --image-size "
                                   f"{batch.shape[2]} its input size?") from None
        if not isinstance(out, torch.Tensor):
            raise FastnclError(f"--checkpoint {self.checkpoint}: the model returned a {type(out).__name__}, "
                               "not a tensor of image vectors")
        out = out.float().cpu().numpy()
        want = 2 if self.granularity == "image" else 3
        if out.ndim != want or out.shape[0] != batch.shape[0]:
            hint = ("(B, D) image vectors: use --granularity tokens for (B, T, D) tokens" if want == 2
                    else "(B, T, D) tokens: use --granularity image for (B, D) vectors")
            raise FastnclError(f"--checkpoint {self.checkpoint}: the model returned shape {tuple(out.shape)} for "
                               f"{batch.shape[0]} images; --granularity {self.granularity} expects {hint}")
        return out[:, None, :] if want == 2 else out

    def describe(self):
        return {"kind": self.kind, "checkpoint": str(self.checkpoint), "checkpoint_sha256": sha256_of(self.checkpoint),
                "granularity": self.granularity, "preprocessing": {
                    "pixels": "RGB (transparent pixels on white), shorter side bicubic-resized to the input size, "
                              "centre crop", "input_size": self.size, "mean": list(self.mean), "std": list(self.std)}}


class TorchScript(_TorchEncoder):
    kind = "torchscript"

    def __init__(self, checkpoint, granularity, size, mean, std, device):
        super().__init__(checkpoint, granularity, size, mean, std, device)
        torch = self.torch
        try:
            model = torch.jit.load(str(checkpoint), map_location=self.device)
        except Exception as jit_error:  # not TorchScript: a torch.export program?
            try:
                model = torch.export.load(str(checkpoint)).module().to(self.device)
            except Exception:
                raise FastnclError(f"--checkpoint {checkpoint}: not a TorchScript or torch.export file that loads "
                                   f"({_first_line(jit_error)})") from None
        with contextlib.suppress(AttributeError, NotImplementedError):  # an exported module has no eval()
            model.eval()
        self.model = model

    def forward(self, x):
        return self.model(x)


@contextlib.contextmanager
def _own_kernels_off_path():
    """transformers >= 5 imports the PyPI package ``kernels``; the repository root on sys.path (a
    `python -m` or `torchrun -m` from a clone) would hand it fastncl's own top-level ``kernels/``
    folder instead. The root is left off sys.path while transformers and that package import."""
    own = Path(importlib.util.find_spec("fastncl.kernels").origin).resolve()
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if (Path(p or ".") / "kernels" / "__init__.py").resolve() != own]
    try:
        yield
    finally:
        sys.path[:] = saved


class HuggingFace(_TorchEncoder):
    kind = "hf"
    HINT = "--encoder hf needs transformers: pip install 'fastncl[hf]'"

    def __init__(self, checkpoint, granularity, size, mean, std, device):
        if not checkpoint.is_dir():
            raise FastnclError(f"--checkpoint {checkpoint}: --encoder hf reads a checkpoint folder (config.json, weights)")
        with _own_kernels_off_path():
            transformers = optional_import("transformers", self.HINT)
            with contextlib.suppress(ImportError):
                importlib.import_module("kernels")  # while the root is off sys.path (see above)
            clip_model, vision_model = transformers.CLIPModel, transformers.CLIPVisionModelWithProjection
        transformers.logging.set_verbosity_error()  # no per-tensor loading bars or config chatter on stderr
        transformers.utils.logging.disable_progress_bar()
        processor = self._processor_config(checkpoint)
        config = self._json(checkpoint / "config.json", required=True)
        # a whole CLIP model (the usual saved checkpoint: its projection size is the top level's) or
        # a vision tower saved on its own; either way its vision_model and visual_projection
        model_class = clip_model if config.get("model_type") == "clip" else vision_model
        try:
            model = model_class.from_pretrained(str(checkpoint), local_files_only=True)
            self.vision, self.projection = model.vision_model, model.visual_projection
        except Exception as e:
            raise FastnclError(f"--checkpoint {checkpoint}: not a CLIP-style checkpoint transformers can load "
                               f"locally ({_first_line(e)})") from None
        crop = processor.get("crop_size")
        size = size or (crop.get("height") if isinstance(crop, dict) else crop) or self.vision.config.image_size
        super().__init__(checkpoint, granularity, size, mean or processor.get("image_mean") or CLIP_MEAN,
                         std or processor.get("image_std") or CLIP_STD, device)
        self.model = model.to(self.device).eval()

    @classmethod
    def _processor_config(cls, checkpoint: Path) -> dict:
        return cls._json(checkpoint / "preprocessor_config.json", required=False)

    @staticmethod
    def _json(path: Path, required: bool) -> dict:
        if not path.exists():
            if required:
                raise FastnclError(f"--checkpoint {path.parent}: no config.json (a transformers save_pretrained folder)")
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise FastnclError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise FastnclError(f"{path}: not a JSON object")
        return data

    def forward(self, x):
        out = self.vision(pixel_values=x)
        if self.granularity == "image":  # CLIP's image embedding: the CLS token, normed, projected
            return self.projection(out.pooler_output)
        # every token (CLS first) through the tower's final norm and the projection: the image vector's space
        return self.projection(self.vision.post_layernorm(out.last_hidden_state))

    def describe(self):
        return {**super().describe(), "transformers": package_version("transformers")}


class OpenCLIP(_TorchEncoder):
    kind = "open_clip"
    HINT = "--encoder open_clip needs open_clip_torch (and its torchvision): pip install 'fastncl[open_clip]'"

    def __init__(self, checkpoint, granularity, size, mean, std, device, arch):
        if not arch:
            raise FastnclError("--encoder open_clip needs --arch (the model name, e.g. ViT-B-32)")
        try:
            open_clip = importlib.import_module("open_clip")
        except Exception as e:  # ImportError, or torchvision failing beside this torch
            raise FastnclError(f"{self.HINT} ({_first_line(e)})") from None
        try:
            model = open_clip.create_model(arch, pretrained=str(checkpoint), device="cpu")
        except Exception as e:
            raise FastnclError(f"--checkpoint {checkpoint}: open_clip could not load it as {arch} "
                               f"({_first_line(e)})") from None
        visual = model.visual
        image_size = getattr(visual, "image_size", 224)
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        super().__init__(checkpoint, granularity, size or image_size, mean or getattr(visual, "image_mean", None) or CLIP_MEAN,
                         std or getattr(visual, "image_std", None) or CLIP_STD, device)
        self.arch = arch
        self.model = model.to(self.device).eval()
        if granularity == "tokens":
            if not hasattr(visual, "output_tokens"):
                raise FastnclError(f"--arch {arch}: this tower gives no tokens; use --granularity image")
            visual.output_tokens = True

    def forward(self, x):
        if self.granularity == "image":
            return self.model.encode_image(x)
        pooled, tokens = self.model.visual(x)
        proj = getattr(self.model.visual, "proj", None)
        tokens = tokens @ proj if proj is not None else tokens
        return self.torch.cat([pooled[:, None, :], tokens], dim=1)

    def describe(self):
        return {**super().describe(), "arch": self.arch, "open_clip": package_version("open_clip_torch")}


def build_encoder(kind: str, *, checkpoint: str | None = None, granularity: str | None = None, image_size: int | None = None,
                  mean=None, std=None, device: str = "auto", arch: str | None = None) -> Encoder:
    """The encoder ``kind`` from local files, or a one-line FastnclError."""
    if kind not in KINDS:
        raise FastnclError(f"--encoder {kind}: one of {', '.join(KINDS)}")
    if image_size is not None and image_size < 1:
        raise FastnclError(f"--image-size {image_size}: at least 1 pixel")
    if granularity is not None and granularity not in GRANULARITIES:
        raise FastnclError(f"--granularity {granularity}: one of {', '.join(GRANULARITIES)}")
    if kind == "patches":
        if granularity == "image":
            raise FastnclError("--granularity image: the patches encoder describes regions (--granularity tokens)")
        if checkpoint:
            raise FastnclError("--checkpoint: the patches encoder has no weights")
        return Patches()
    granularity = granularity or "image"
    if kind == "torchscript":
        path = _checkpoint(checkpoint, kind, "torch.jit.save or torch.export.save file")
        return TorchScript(path, granularity, image_size or 224, mean or CLIP_MEAN, std or CLIP_STD, device)
    if kind == "hf":
        return HuggingFace(_checkpoint(checkpoint, kind, "checkpoint folder"), granularity, image_size, mean, std, device)
    return OpenCLIP(_checkpoint(checkpoint, kind, "checkpoint file"), granularity, image_size, mean, std, device, arch)
