"""One image file of any kind -> 8-bit grayscale or RGB: the form every image takes for training.

The network, the host crops and the on-device augmentation all work on uint8 images with 1 or 3
channels, so every file is brought to that form by one set of rules, written down once:

- 8-bit JPEG and PNG in grayscale or RGB are kept as they are (their bytes are stored unchanged);
- 16-bit images (PNG, TIFF) keep their high byte, v >> 8, as libpng, PIL and TensorFlow all do
  when they read them as 8 bits (data whose range is narrower, 12-bit scans, should be windowed
  first and saved as .npy floats in [0, 1]);
- alpha is dropped (RGBA -> RGB, LA -> L); palettes, CMYK and other colour modes become RGB, and
  bilevel images L, by PIL's conversions; an animated image gives its first frame;
- float images (TIFF mode F) must lie in [0, 1] and become round(v * 255);
- `.npy` arrays, for non-photo data: [H, W] or [H, W, C] with C in 1, 3 or 4 (the fourth is
  dropped); uint8 as is, uint16 by its high byte, bool as 0/255, floats in [0, 1] as round(v * 255).

Anything converted is stored as a lossless PNG. A file that breaks a rule, or that PIL cannot
decode to the end, raises UnreadableImage with the reason; callers count and list those files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Iterator

import numpy as np
from etils import epath

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)  # fmt: skip
ARRAY_EXTENSIONS = (".npy",)
_KEPT = {("JPEG", "L"), ("JPEG", "RGB"), ("PNG", "L"), ("PNG", "RGB")}  # stored as they are
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PNG_BIT_DEPTH_OFFSET = 24  # signature (8) + IHDR length, type, width, height (4 each)


class UnreadableImage(ValueError):
    """A file that is not an image this module can read; the message says why."""


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """What a prepared dataset keeps of one file."""

    data: bytes  # JPEG or PNG, decodable by tf.io.decode_image and PIL
    height: int
    width: int
    channels: int  # 1 or 3
    source: str  # the file's kind, e.g. 'JPEG RGB', 'PNG I;16', 'npy uint16 [H, W, 3]'
    conversion: str  # '' when stored as it was, else what changed (e.g. '16-bit to 8-bit')


def is_image_file(name: str) -> bool:
    """Files the readers take, by extension; hidden files are left out."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)


def read_stored(path: str) -> StoredImage:
    """The file as a prepared dataset stores it (see the module docstring for the rules)."""
    data = epath.Path(path).read_bytes()
    if path.lower().endswith(ARRAY_EXTENSIONS):
        return _as_png(*_array_pixels(data))
    with _opened(data) as image:
        bit_depth = _bit_depth(data, image.format)
        source = f"{image.format} {image.mode}"
        if (image.format, image.mode) in _KEPT and bit_depth == 8:
            width, height = image.size  # before _check_decodes' draft shrinks it
            _check_decodes(image)
            return StoredImage(data, height, width, len(image.mode), source, "")
        pixels, conversion = _converted(image, bit_depth)
    return _as_png(pixels, source, conversion)


def read_pixels(path: str, channels: int | None = None) -> np.ndarray:
    """uint8 [H, W, C] of any readable file by the same rules; `channels` 1 or 3 converts
    (grayscale repeated; RGB to PIL's luma), None keeps the file's own."""
    data = epath.Path(path).read_bytes()
    if path.lower().endswith(ARRAY_EXTENSIONS):
        return with_channels(_array_pixels(data)[0], channels)
    with _opened(data) as image:
        if (image.format, image.mode) in _KEPT and _bit_depth(data, image.format) == 8:
            pixels = np.asarray(image, np.uint8).reshape(image.size[1], image.size[0], -1)
        else:
            pixels, _ = _converted(image, _bit_depth(data, image.format))
    return with_channels(pixels, channels)


def decode_stored(data: bytes, channels: int | None = None) -> np.ndarray:
    """uint8 [H, W, C] of the bytes a prepared dataset stores (JPEG or PNG, 1 or 3 channels)."""
    with _opened(data) as image:
        pixels = np.asarray(image, np.uint8).reshape(image.size[1], image.size[0], -1)
    return with_channels(pixels, channels)


def with_channels(pixels: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 [H, W, C] -> [H, W, channels]: grayscale repeated, RGB to PIL's luma (L = (299 R +
    587 G + 114 B) / 1000); None keeps them."""
    from PIL import Image

    if channels is None or channels == pixels.shape[-1]:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=-1)
    return np.asarray(Image.fromarray(pixels).convert("L"), np.uint8)[..., None]


@contextlib.contextmanager
def _opened(data: bytes) -> Iterator:
    """A PIL image of `data`; any failure to decode it becomes UnreadableImage with the reason."""
    from PIL import Image  # PIL is only needed for image files

    try:
        with Image.open(io.BytesIO(data)) as image:
            yield image
    except UnreadableImage:
        raise
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image file PIL can identify") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types; all mean "unreadable"
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None


def _bit_depth(data: bytes, image_format: str) -> int:
    if image_format == "PNG" and len(data) > _PNG_BIT_DEPTH_OFFSET:
        return data[_PNG_BIT_DEPTH_OFFSET]
    return 8


def _check_decodes(image) -> None:
    """Decode to the end (a truncated or corrupt file raises); JPEGs at 1/8 scale, which still
    reads every coded block but skips most of the inverse DCT."""
    if image.format == "JPEG":
        image.draft(image.mode, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
    image.load()


def _converted(image, bit_depth: int) -> tuple[np.ndarray, str]:
    """(uint8 [H, W, 1 or 3], what changed) of a PIL image that cannot be stored as it is."""
    mode = image.mode
    image.load()
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise UnreadableImage(f"{mode} pixels outside 0-65535")
        return (values.astype(np.uint32) >> 8).astype(np.uint8)[..., None], "16-bit to 8-bit"
    if mode == "F":
        return _unit_floats(np.asarray(image))[..., None], "float to 8-bit"
    notes = [] if bit_depth == 8 else [f"{bit_depth}-bit to 8-bit"]  # 16: PIL kept the high byte
    target = mode if mode in ("L", "RGB") else "L" if mode in ("1", "LA", "La") else "RGB"
    if "A" in mode or "a" in mode:
        notes.append("alpha dropped")
    elif mode != target:
        notes.append(f"{mode} to {target}")
    converted = image if mode == target else image.convert(target)
    pixels = np.asarray(converted, np.uint8).reshape(converted.size[1], converted.size[0], -1)
    return pixels, ", ".join(notes) or f"{image.format} as PNG"


def _unit_floats(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
        raise UnreadableImage("float pixels must be finite and lie in [0, 1]")
    return np.round(values * 255.0).astype(np.uint8)


def _array_pixels(data: bytes) -> tuple[np.ndarray, str, str]:
    """(uint8 [H, W, 1 or 3], source, conversion) of a .npy file's array."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - numpy raises several types for a bad file
        raise UnreadableImage(f"not a .npy array: {type(error).__name__}: {error}") from None
    shape = "[H, W]" if array.ndim == 2 else f"[H, W, {array.shape[-1]}]"
    source = f"npy {array.dtype} {shape}"
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise UnreadableImage(f"arrays must be [H, W] or [H, W, C] with C 1, 3 or 4, got {shape}")
    notes = []
    if array.shape[-1] == 4:
        array, _ = array[..., :3], notes.append("fourth channel dropped")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels, _ = (array >> 8).astype(np.uint8), notes.append("16-bit to 8-bit")
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        pixels, _ = _unit_floats(array), notes.append("float to 8-bit")
    else:
        raise UnreadableImage(f"array dtype {array.dtype}: use uint8, uint16, bool or floats")
    return np.ascontiguousarray(pixels), source, ", ".join(notes) or "array to PNG"


def _as_png(pixels: np.ndarray, source: str, conversion: str) -> StoredImage:
    from PIL import Image

    height, width, channels = pixels.shape
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, format="PNG")
    return StoredImage(buffer.getvalue(), height, width, channels, source, conversion)
