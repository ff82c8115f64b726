"""Media of a pair dataset: relative paths that never leave the folder, and images.

Media paths are POSIX paths relative to the dataset folder: absolute paths, ``..`` components,
backslashes and symlinks resolving outside the folder (or looping) are rejected with an error
naming the field. :func:`load_image` opens, verifies and fully decodes an image as RGB (never
tolerating truncation); :func:`add_media` copies or saves media into a folder atomically.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from mmalign.files import atomic_write_bytes
from mmalign.pairs.errors import MediaError, PairFormatError, _surrogate_problem

__all__ = ["MAX_PIXELS", "check_rel_path", "pair_media_path", "resolve_media", "load_image", "image_size", "add_media"]


# The largest image (width x height) the loader decodes: 2**27 = 134,217,728 pixels, e.g.
# 11,585 x 11,585 or 16,384 x 8,192 (a 10,000 x 10,000 photo passes). Between PIL's decompression-
# bomb warning (89.5 M pixels) and its error (179 M); a decoded RGB image at the cap is 384 MiB.
MAX_PIXELS = 1 << 27


def check_rel_path(rel: Any, field: str | None = None) -> str:
    """Validate a media path relative to a dataset folder; return it in normal POSIX form.

    Rejected: non-strings, empty paths, backslashes, NUL bytes, absolute paths (``/x``, ``C:x``),
    and any ``..`` component (a path that could leave the dataset folder).
    """
    if not isinstance(rel, str):
        raise PairFormatError(f"media path must be a string, got {type(rel).__name__}", field=field)
    if rel.strip() == "":
        raise PairFormatError("empty media path", field=field)
    if "\x00" in rel:
        raise PairFormatError("media path contains a NUL byte", field=field)
    problem = _surrogate_problem(rel)
    if problem is not None:
        raise PairFormatError(f"media path {problem}", field=field)
    if "\\" in rel:
        raise PairFormatError(f"media path {rel!r} contains a backslash; use '/' separators", field=field)
    if rel.startswith("/") or (len(rel) >= 2 and rel[1] == ":" and rel[0].isalpha()):
        raise PairFormatError(
            f"absolute media path {rel!r}: media paths are relative to the dataset folder", field=field
        )
    parts = PurePosixPath(rel).parts
    if ".." in parts:
        raise PairFormatError(f"media path {rel!r} leaves the dataset folder ('..')", field=field)
    norm = PurePosixPath(rel).as_posix()
    if norm in ("", "."):
        raise PairFormatError(f"media path {rel!r} names no file", field=field)
    return norm


def pair_media_path(pair: Any, item: str | os.PathLike[str], field: str,
                    fallback_root: str | os.PathLike[str] | None = None) -> Path:
    """The file of one media entry of ``pair``, by the one precedence rule of every adapter.

    An absolute path is used as it is (pairs built in memory); a relative one resolves inside the
    folder the pair was read from (its :attr:`PreferencePair.root`), else inside ``fallback_root`` (the
    adapter's folder, for pairs built in memory). It may not leave that folder. Errors name the pair
    and the field.
    """
    path = Path(item)
    if path.is_absolute():
        return path
    root = getattr(pair, "root", None) or fallback_root
    pid = getattr(pair, "id", "?")
    if root is None:
        raise ValueError(f"pair {pid!r}, field {field}: {str(item)!r} is relative but neither the pair nor the "
                         "adapter knows the dataset folder (read pairs with mmalign.pairs.read_pairs, or pass "
                         "the adapter the folder)")
    try:
        return resolve_media(root, str(item))
    except PairFormatError as exc:
        raise PairFormatError(f"pair {pid!r}: {exc.reason}", field=field) from exc


def resolve_media(folder: str | os.PathLike[str], rel: str, *, follow_symlinks: bool = False) -> Path:
    """Absolute path of media ``rel`` inside ``folder``; raises if it would leave the folder.

    With ``follow_symlinks=False`` (default) the real path (symlinks resolved) must also lie inside
    the folder, so a symlink pointing elsewhere is rejected like ``../``.
    """
    norm = check_rel_path(rel)
    root = Path(folder).resolve()
    path = root / norm
    if not follow_symlinks:
        try:
            real = path.resolve()
        except RuntimeError as exc:  # Python < 3.13 raises RuntimeError for a loop
            raise PairFormatError(f"media path {rel!r} is a symlink loop ({exc})") from exc
        except OSError as exc:  # ELOOP on newer Pythons, EACCES, ...
            raise PairFormatError(f"cannot resolve media path {rel!r} (a symlink loop?): {exc}") from exc
        if not real.is_relative_to(root):
            raise PairFormatError(
                f"media path {rel!r} resolves to {str(real)!r}, outside the dataset folder {str(root)!r} "
                "(a symlink?); pass follow_symlinks=True to allow it"
            )
    return path


def _image_note(mode: str) -> str | None:
    if mode == "RGB":
        return None
    kinds = {
        "L": "grayscale",
        "1": "1-bit",
        "I": "32-bit grayscale",
        "I;16": "16-bit grayscale",
        "I;16B": "16-bit grayscale",
        "I;16L": "16-bit grayscale",
        "F": "float grayscale",
        "CMYK": "CMYK",
        "RGBA": "RGBA (alpha composited on white)",
        "LA": "grayscale+alpha (alpha composited on white)",
        "P": "palette",
        "PA": "palette+alpha (alpha composited on white)",
        "YCbCr": "YCbCr",
        "LAB": "LAB",
        "HSV": "HSV",
    }
    return f"converted {kinds.get(mode, mode)} ({mode}) to RGB"


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


class _StrictDecoding:
    """Decode with ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` off, safely across threads.

    The flag is a PIL global: it is switched off while any decode of ours runs and restored by
    the last one to finish, so concurrent loads (a thread pool) never see it flip mid-decode.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved = False

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = self._saved


_STRICT = _StrictDecoding()


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`load_image` returns it (EXIF orientation applied), read from
    its header without decoding the pixels. Raises :class:`MediaError` (naming the file) where the header
    cannot be read; a corrupt body is only found by :func:`load_image`."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112)
    except Exception as exc:  # PIL raises many types
        raise MediaError(f"cannot read image {str(path)!r}: {exc}") from exc
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_image(
    path: str | os.PathLike[str] | bytes | io.IOBase,
    *,
    notes: list[str] | None = None,
    min_side: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Open, ``verify`` and fully decode an image; return it as RGB.

    Raises :class:`MediaError` (naming the file) for a missing, unreadable, empty, truncated or
    corrupt image, or one over ``max_pixels`` (width x height, checked on the header before any
    decoding; default :data:`MAX_PIXELS`); truncation is never tolerated, whatever
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says elsewhere. Non-RGB images are converted (alpha
    composited on white, 16-bit scaled to 8-bit) and a note such as ``"converted grayscale (L) to
    RGB"`` is appended to ``notes`` and stored in ``image.info["mmalign_note"]``. EXIF orientation
    is applied (what a rater saw), also noted.

    ``min_side``: the shortest side the caller needs (e.g. the training resolution). The image may
    then come back smaller, never with its shorter side below ``min_side`` (nor upscaled): a JPEG
    is decoded at a reduced DCT scale (``Image.draft``: 1/2, 1/4 or 1/8, much faster and smaller
    than a full decode), other formats are decoded in full and shrunk by an integer factor
    (``Image.reduce``, a box filter). The full oriented size is kept in
    ``image.info["mmalign_original_size"]`` (width, height) either way.
    """
    name = "<bytes>" if isinstance(path, bytes | bytearray | memoryview | io.IOBase) else str(path)
    if isinstance(path, bytes | bytearray | memoryview):
        data: bytes | None = bytes(path)
    elif isinstance(path, io.IOBase):
        data = path.read()
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise MediaError(f"cannot read image {name!r}: {exc}") from exc
    if not data:
        raise MediaError(f"image {name!r} is empty (0 bytes)")
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be a positive number of pixels, got {min_side}")
    try:
        with _STRICT:
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise MediaError(
                    f"image {name!r} is {width}x{height} = {width * height:,} pixels, over the limit "
                    f"max_pixels={max_pixels:,}; downscale it, or raise max_pixels"
                )
            if min_side is not None and img.format == "JPEG":
                img.draft(None, (min_side, min_side))
            img.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(
            f"image {name!r} is over the pixel limit max_pixels={max_pixels:,} and PIL's "
            f"decompression-bomb limit: {exc}"
        ) from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise MediaError(f"cannot decode image {name!r} (unreadable or truncated): {exc}") from exc
    added: list[str] = []
    orientation = img.getexif().get(0x0112)  # EXIF Orientation tag
    if orientation not in (None, 1):
        transposed = ImageOps.exif_transpose(img)
        if transposed is not None:
            img = transposed
            added.append(f"applied EXIF orientation {orientation}")
    original = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    note = _image_note(img.mode)
    if note is not None:
        added.append(note)
        img = _to_rgb(img)
    if min_side is not None:
        factor = min(img.size) // min_side
        if factor >= 2:
            img = img.reduce(factor)  # after the RGB conversion: reducing palette indices is meaningless
    img.info["mmalign_original_size"] = original
    if added:
        img.info["mmalign_note"] = "; ".join(added)
        if notes is not None:
            notes.extend(added)
    return img


def _encode_image(img: Image.Image, fmt: str) -> bytes:
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = _to_rgb(img)
    if fmt == "PNG" and img.mode == "CMYK":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _media_bytes(src: Any, *, fmt: str = "PNG") -> bytes:
    """Bytes of an image given as a path, bytes, PIL image or uint8 array (encoded as ``fmt``)."""
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src)
    if isinstance(src, str | os.PathLike):
        try:
            return Path(src).read_bytes()
        except OSError as exc:
            raise MediaError(f"cannot read media {str(src)!r}: {exc}") from exc
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8:
            raise MediaError(f"array media must be uint8 (H,W) or (H,W,3|4), got dtype {src.dtype}")
        src = Image.fromarray(src)
    if isinstance(src, Image.Image):
        return _encode_image(src, fmt)
    raise MediaError(f"unsupported media source {type(src).__name__}: give a path, bytes, PIL image or array")


def add_media(
    folder: str | os.PathLike[str],
    src: Any,
    rel_name: str,
    *,
    overwrite: bool = False,
    verify: bool = True,
    durable: bool = True,
) -> str:
    """Copy or save media into ``folder/rel_name`` atomically; return the normalised relative path.

    ``src``: a file path (bytes copied verbatim), raw bytes, a PIL image or a uint8 array (encoded
    by the extension of ``rel_name``). With ``verify`` the bytes must decode fully as an image
    (pass ``verify=False`` for non-image media such as videos). An existing file with identical
    bytes is left alone; different bytes raise ``FileExistsError`` unless ``overwrite``.
    """
    rel = check_rel_path(rel_name, "rel_name")
    dest = resolve_media(folder, rel)
    fmt = "PNG"
    if not isinstance(src, bytes | bytearray | memoryview | str | os.PathLike):
        ext = PurePosixPath(rel).suffix.lower()
        fmt = Image.registered_extensions().get(ext, "")
        if not fmt:
            raise MediaError(f"cannot tell the image format from the name {rel!r}; use e.g. '.png'")
    data = _media_bytes(src, fmt=fmt)
    if verify:
        load_image(data)
    if dest.exists():
        if dest.read_bytes() == data:
            return rel
        if not overwrite:
            raise FileExistsError(f"media {rel!r} already exists in {str(folder)!r} with different content")
    atomic_write_bytes(dest, data, durable=durable)
    return rel


def _decode_problem(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` is not a usable image (unreadable, corrupt, truncated, too large), or ``None``.

    The check decodes the whole file: a JPEG at its smallest DCT scale (every coded block is still
    read, so truncation and corrupt entropy data are found), other formats in full.
    """
    try:
        load_image(path, min_side=8, max_pixels=max_pixels)
    except MediaError as exc:
        return str(exc)
    except (OSError, RuntimeError) as exc:  # anything the file system says past load_image's read
        return f"cannot read image {str(path)!r}: {exc}"
    return None
