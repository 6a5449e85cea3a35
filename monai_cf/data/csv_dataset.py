# Copyright (c) monai_cf contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Real data: a CSV of image paths and attribute columns, validated up front, loaded through MONAI transforms.

The pieces, from file to network input:

- :func:`load_csv_datalist` reads and validates the CSV against a :class:`~monai_cf.graph.CausalGraph` and
  returns a MONAI datalist (``[{"image": "/abs/path.png", "sex": 1, "age": 63.0, ..., "row": 1}, ...]``).
  Every problem (missing file, unreadable image, value out of range, unknown category, empty value) is
  collected and reported in one :class:`DatasetValidationError` naming the CSV, row, line, column and value.
- :func:`load_image_transforms` loads PNG/JPG/BMP/TIFF, DICOM and NIfTI files in one pipeline through
  :class:`GrayscaleImageReader` (MONAI's ``PILReader``, ``PydicomReader`` and ``NibabelReader``, picked by
  file type) as channel-first ``float32`` images in ``[0, 1]``.
- :class:`EncodeAttributesd` adds the network encoding of the image parents under ``"pa"``.
- :func:`csv_dataset` puts the three together into a ``monai.data.Dataset`` (or ``CacheDataset``).
- :data:`MIMIC_CXR_PRESET` and :func:`mimic_cxr_datalist` read the usual MIMIC-CXR split CSVs.

Orientation: array axes follow the file's own storage order with no reorientation, so a PNG written from a
numpy array ``a`` of shape ``(H, W)`` loads as ``a[None] / 255``; a DICOM loads in ``pixel_array`` order
``(Rows, Columns)`` (frames first for multi-frame files); a NIfTI loads in nibabel's array order
(``np.asanyarray(nib.load(f).dataobj)``), without reorienting to RAS.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.data.image_reader import ImageReader, NibabelReader, PILReader, PydicomReader
from monai.transforms import Compose, LoadImaged, MapTransform, Resized
from monai.utils import MetaKeys, ensure_tuple

from monai_cf.data.encoding import AttributeEncoder
from monai_cf.graph import CausalGraph

__all__ = [
    "DatasetValidationError",
    "RowProblem",
    "IMAGE_SUFFIXES",
    "image_format",
    "check_image",
    "load_csv_datalist",
    "GrayscaleImageReader",
    "LoadGrayscaleImaged",
    "load_image_transforms",
    "EncodeAttributesd",
    "csv_dataset",
    "MIMIC_CXR_PRESET",
    "mimic_cxr_datalist",
]

logger = logging.getLogger("monai_cf.data")

#: File suffixes (lower case) of each supported image format.
IMAGE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "pil": (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"),
    "dicom": (".dcm", ".dicom"),
    "nifti": (".nii", ".nii.gz"),
}

_MAX_LISTED_PROBLEMS = 20
_PARALLEL_CHECK_MIN = 16
# ITU-R BT.601 luma weights, the same PIL uses for its own RGB -> "L" conversion.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class RowProblem:
    """One problem found in a CSV row.

    Args:
        row: 1-based data row (the header is not counted), ``None`` for problems of the whole file.
        line: 1-based line of the file where the row starts.
        column: the CSV column at fault (``None`` if the whole row is malformed).
        value: the offending raw value as written in the CSV.
        message: what is wrong with it.

    Example::

        problem = RowProblem(row=3, line=4, column="age", value="150", message="outside [0, 100]")
        problem.describe("train.csv")  # "train.csv row 3 (line 4), column 'age': value '150': outside [0, 100]"
    """

    row: int | None
    line: int | None
    column: str | None
    value: Any
    message: str

    def describe(self, csv_name: str) -> str:
        if self.row is None:
            return f"{csv_name} header (line {self.line}): {self.message}"
        where = f"{csv_name} row {self.row} (line {self.line})"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: value {self.value!r}: {self.message}"


class DatasetValidationError(ValueError):
    """The CSV has problems; ``problems`` lists all of them, the message the first few.

    Attributes:
        csv_file: the CSV that was validated.
        problems: every :class:`RowProblem` found.
        bad_rows: the data row numbers with at least one problem.

    Example::

        try:
            load_csv_datalist("train.csv", "mimic_cxr")
        except DatasetValidationError as error:
            print(error.bad_rows, [p.column for p in error.problems])
    """

    def __init__(self, csv_file: str, problems: Sequence[RowProblem], total_rows: int, headline: str | None = None):
        self.csv_file = str(csv_file)
        self.problems = list(problems)
        self.bad_rows = sorted({p.row for p in self.problems if p.row is not None})
        name = os.path.basename(self.csv_file)
        headline = headline or (
            f"{len(self.bad_rows)} of {total_rows} data rows of '{self.csv_file}' have problems "
            f"({len(self.problems)} in all); fix them, or pass skip_bad_rows=True to drop them:"
        )
        lines = [p.describe(name) for p in self.problems[:_MAX_LISTED_PROBLEMS]]
        if len(self.problems) > _MAX_LISTED_PROBLEMS:
            lines.append(f"... and {len(self.problems) - _MAX_LISTED_PROBLEMS} more problems")
        super().__init__("\n  ".join([headline, *lines]))


# ---------------------------------------------------------------------------------------------------- images
def image_format(path: str | os.PathLike) -> str | None:
    """``"pil"``, ``"dicom"`` or ``"nifti"`` from the file suffix (a suffix-less DICOM file is sniffed), else None."""
    name = os.fspath(path).lower()
    for fmt, suffixes in IMAGE_SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    if not os.path.splitext(name)[1] and os.path.isfile(path):
        import pydicom

        try:
            if pydicom.misc.is_dicom(path):
                return "dicom"
        except OSError:
            return None
    return None


def check_image(path: str | os.PathLike, full: bool = False, reader: GrayscaleImageReader | None = None) -> str | None:
    """Cheaply check that an image file can be read; the reason if not, else ``None``.

    PNG: ``PIL.Image.verify`` (chunk checksums, truncation). Other PIL formats: a decode (JPEG at 1/8 scale).
    DICOM: the header, the presence of pixel data and, for uncompressed transfer syntaxes, that the file
    holds all the pixel bytes the header announces (compressed pixel data is decoded). NIfTI: the header
    and that the data array is in the file (``.nii``: by size; ``.nii.gz``: by decompressing it).

    Args:
        path: the image file.
        full: decode the image exactly as :class:`GrayscaleImageReader` does in training instead.
        reader: the reader to use with ``full`` (default: a new :class:`GrayscaleImageReader`).
    """
    path = os.fspath(path)
    fmt = image_format(path)
    if fmt is None:
        supported = sorted(s for suffixes in IMAGE_SUFFIXES.values() for s in suffixes)
        return f"unsupported image type; expected one of {supported} (or a DICOM file without suffix)"
    try:
        if full:
            reader = reader or GrayscaleImageReader()
            reader.get_data(reader.read(path))
            return None
        return {"pil": _check_pil, "dicom": _check_dicom, "nifti": _check_nifti}[fmt](path)
    except Exception as error:  # every reader failure is a bad row, whatever library raised it
        return f"cannot be read as {_FORMAT_NAMES[fmt]}: {type(error).__name__}: {error}"


_FORMAT_NAMES = {"pil": "a PNG/JPEG/BMP/TIFF image", "dicom": "DICOM", "nifti": "NIfTI"}


def _check_pil(path: str) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "PNG":
            image.verify()
        else:
            # draft() makes JPEG decode at 1/8 scale; the whole stream is still parsed, so truncation shows.
            image.draft("L", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    return None


def _check_dicom(path: str) -> str | None:
    import pydicom
    from pydicom.pixels.utils import get_expected_length

    dataset = pydicom.dcmread(path, defer_size="64 KB")
    tags = [t for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if t in dataset]
    if not tags:
        return "the DICOM file has no pixel data"
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_compressed:
        _ = dataset.pixel_array  # only a decode tells whether compressed data is readable
        return None
    element = dataset.get_item(tags[0], keep_deferred=True)
    value = getattr(element, "value", None)
    if value is not None:
        available = len(value)
    else:  # deferred: the value was skipped, so the header's length must fit in the file
        end = int(element.value_tell) + int(element.length)
        available = int(element.length) if end <= os.path.getsize(path) else os.path.getsize(path) - element.value_tell
    expected = get_expected_length(dataset, "bytes")
    if available < expected:
        return f"the DICOM pixel data is truncated: {available} of {expected} bytes"
    return None


def _check_nifti(path: str) -> str | None:
    import nibabel as nib

    image = nib.load(path)
    _nifti_spatial_shape(image.shape)
    proxy = image.dataobj
    if path.lower().endswith(".gz") or not hasattr(proxy, "offset"):
        np.asanyarray(proxy)
        return None
    expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    size = os.path.getsize(path)
    if size < expected:
        return f"the NIfTI data is truncated: the file has {size} of {expected} bytes"
    return None


def _nifti_spatial_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """2D or 3D spatial shape of a NIfTI array, trailing singleton axes dropped; ValueError otherwise."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise ValueError(f"expected a single-channel 2D or 3D NIfTI image, got array shape {shape}")
    return shape


def _pil_supported_mode(image: Any) -> Any:
    """Convert PIL modes whose raw arrays are not intensities (palette, 1-bit, CMYK, YCbCr...)."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA", "I", "F") or mode.startswith("I;16"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA"):
        return image.convert("RGBA")
    return image.convert("RGB")


@dataclass
class _ReadImage:
    fmt: str
    filename: str
    native: Any
    photometric: str = ""
    samples_per_pixel: int = 1


class GrayscaleImageReader(ImageReader):
    """A MONAI ``ImageReader`` for 2D/3D grayscale images in ``[0, 1]``, whatever the file type.

    Picks MONAI's reader by file type: ``PILReader(reverse_indexing=False)`` for PNG/JPEG/BMP/TIFF,
    ``PydicomReader(swap_ij=False)`` for DICOM, ``NibabelReader`` for NIfTI, so arrays keep the file's own
    axis order (see the module docstring), then makes one grayscale channel and scales intensities.

    - Colour: RGB(A) becomes BT.601 luma (``0.299 R + 0.587 G + 0.114 B``; exact when R = G = B); alpha is
      dropped; palette and 1-bit images are expanded first.
    - Scaling (``scale_intensity=True``): 8-bit PNG/JPEG/BMP/TIFF divide by 255, 16-bit by 65535, so equal
      stored values mean equal intensities across images. DICOM (after RescaleSlope/Intercept), NIfTI and
      floating-point images are scaled per image from their ``percentiles`` (default ``(0, 100)``: min-max)
      to ``[0, 1]``, clipping outside; a constant image becomes 0. DICOM ``MONOCHROME1`` is inverted so that
      dense tissue is bright, as in ``MONOCHROME2``.
    - The result has no channel axis and ``original_channel_dim = "no_channel"`` in its metadata, so
      ``LoadImaged(..., ensure_channel_first=True)`` gives ``(1, H, W)`` or ``(1, D, H, W)``.
      A NIfTI with trailing singleton axes (``(H, W, 1)``) loads as 2D.

    Args:
        scale_intensity: scale to ``[0, 1]`` as above; otherwise return raw values as float32.
        percentiles: ``(low, high)`` percentiles for per-image scaling of DICOM, NIfTI and float images.

    Example::

        reader = GrayscaleImageReader()
        array, meta = reader.get_data(reader.read("images/000001.png"))  # (H, W) float32 in [0, 1]
    """

    def __init__(self, scale_intensity: bool = True, percentiles: tuple[float, float] = (0.0, 100.0)):
        super().__init__()
        low, high = (float(p) for p in percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}.")
        self.scale_intensity = scale_intensity
        self.percentiles = (low, high)
        self.readers: dict[str, ImageReader] = {
            "pil": PILReader(converter=_pil_supported_mode, reverse_indexing=False),
            "dicom": PydicomReader(swap_ij=False),
            "nifti": NibabelReader(as_closest_canonical=False),
        }

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return all(image_format(name) is not None for name in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> _ReadImage:
        names = ensure_tuple(data)
        if len(names) != 1:
            raise ValueError(f"GrayscaleImageReader reads one file per sample, got {len(names)}: {list(names)}.")
        filename = os.fspath(names[0])
        fmt = image_format(filename)
        if fmt is None:
            raise ValueError(f"Unsupported image file '{filename}'; supported suffixes: {IMAGE_SUFFIXES}.")
        try:
            native = self.readers[fmt].read(filename, **kwargs)
        except Exception as error:
            raise RuntimeError(f"Cannot read image '{filename}' as {_FORMAT_NAMES[fmt]}: {error}") from error
        read = _ReadImage(fmt, filename, native)
        if fmt == "dicom":
            read.photometric = str(getattr(native, "PhotometricInterpretation", "MONOCHROME2")).upper()
            read.samples_per_pixel = int(getattr(native, "SamplesPerPixel", 1))
        return read

    def get_data(self, img: _ReadImage) -> tuple[np.ndarray, dict]:
        try:
            with warnings.catch_warnings():
                # projection radiographs (CR/DX) carry no patient position/orientation: identity affine is fine.
                warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient")
                array, meta = self.readers[img.fmt].get_data(img.native)
            array = np.asarray(array)
            if img.fmt == "pil":
                array, scaling = self._pil_grayscale(array, meta)
            elif img.fmt == "dicom":
                array, scaling = self._dicom_grayscale(array, img)
            else:
                array = array.reshape(_nifti_spatial_shape(array.shape))
                array, scaling = self._by_percentiles(array)
        except Exception as error:
            raise RuntimeError(f"Cannot load image '{img.filename}': {error}") from error
        meta = dict(meta)
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(array.shape)
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
        meta["intensity_scaling"] = scaling
        meta["image_format"] = img.fmt
        return np.ascontiguousarray(array, dtype=np.float32), meta

    # ------------------------------------------------------------------ per-format conversion
    def _pil_grayscale(self, array: np.ndarray, meta: Mapping) -> tuple[np.ndarray, str]:
        stored = array.dtype
        if array.ndim == 3:
            array = _luma(array)
        if not self.scale_intensity:
            return array.astype(np.float32), "none"
        if stored == np.uint8:
            return array.astype(np.float32) / np.float32(255.0), "divide by 255"
        if stored == np.uint16 or (
            meta.get("format") == "PNG" and np.issubdtype(stored, np.integer) and array.min() >= 0
        ):
            # 16-bit PNGs may come back as PIL mode "I" (int32); their range is still 0..65535.
            return array.astype(np.float32) / np.float32(65535.0), "divide by 65535"
        return self._by_percentiles(array)

    def _dicom_grayscale(self, array: np.ndarray, img: _ReadImage) -> tuple[np.ndarray, str]:
        if img.samples_per_pixel > 1 and array.shape[-1] == img.samples_per_pixel:
            array = _luma(array)
        array, scaling = self._by_percentiles(array)
        if img.photometric == "MONOCHROME1":
            array = (1.0 - array) if self.scale_intensity else (array.max() + array.min() - array)
            scaling += ", inverted (MONOCHROME1)"
        return array, scaling

    def _by_percentiles(self, array: np.ndarray) -> tuple[np.ndarray, str]:
        array = array.astype(np.float32)
        if not self.scale_intensity:
            return array, "none"
        low, high = self.percentiles
        if (low, high) == (0.0, 100.0):
            lo, hi, label = float(array.min()), float(array.max()), "min-max"
        else:
            lo, hi = (float(v) for v in np.percentile(array, [low, high]))
            label = f"percentiles {low:g}-{high:g}"
        if not hi > lo:
            return np.zeros_like(array), label + " (constant image)"
        return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), label


def _luma(array: np.ndarray) -> np.ndarray:
    """Channel-last colour (H, W, C) -> (H, W); gray stored as RGB stays exact, alpha is dropped."""
    channels = array.shape[-1]
    if channels in (1, 2):  # L or LA
        return array[..., 0]
    rgb = array[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0]
    return (rgb.astype(np.float64) @ _LUMA_WEIGHTS).astype(np.float32)


class _OncePerProcess(logging.Filter):
    """Lets a log message through the first time only (MONAI logs the missing GPU DICOM codec per reader built)."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.message not in record.getMessage():
            return True
        seen, self.seen = self.seen, True
        return not seen


_CODEC_LOGGER = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
if not any(isinstance(f, _OncePerProcess) for f in _CODEC_LOGGER.filters):
    _CODEC_LOGGER.addFilter(_OncePerProcess("nvImageCodec is not available"))


class LoadGrayscaleImaged(LoadImaged):
    """``LoadImaged`` that always reads through one :class:`GrayscaleImageReader`, channel first, float32.

    Plain ``LoadImaged(reader=...)`` falls back to MONAI's default readers when the given one fails, and
    the default ``PILReader`` transposes PNGs; passing the reader at call time makes failures surface with
    their real reason instead.

    Args:
        keys: the image key(s).
        reader: the reader (default: ``GrayscaleImageReader()``).
        allow_missing_keys: don't raise if a key is missing.
        kwargs: further ``LoadImaged`` arguments.

    Example::

        load = LoadGrayscaleImaged("image")
        load({"image": "images/000001.png"})["image"].shape  # (1, H, W)
    """

    def __init__(
        self,
        keys: Any,
        reader: GrayscaleImageReader | None = None,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        self.grayscale_reader = reader or GrayscaleImageReader()
        kwargs.setdefault("ensure_channel_first", True)
        kwargs.setdefault("dtype", np.float32)
        kwargs.setdefault("image_only", True)
        with warnings.catch_warnings():
            # LoadImage registers every default reader; the GPU DICOM one warns when it has no GPU codec.
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            super().__init__(keys, reader=self.grayscale_reader, allow_missing_keys=allow_missing_keys, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any], reader: ImageReader | None = None) -> dict:
        return super().__call__(data, reader or self.grayscale_reader)


def load_image_transforms(
    spatial_size: int | Sequence[int] | None = None,
    image_key: str = "image",
    scale_intensity: bool = True,
    percentiles: tuple[float, float] = (0.0, 100.0),
    resize_mode: str = "area",
) -> Compose:
    """MONAI transforms that load the image under ``image_key`` as a channel-first float32 grayscale image.

    PNG/JPEG/BMP/TIFF, DICOM and NIfTI files can be mixed in one dataset; see :class:`GrayscaleImageReader`
    for the axis order, colour handling and intensity scaling (8-bit: ``/255``, 16-bit: ``/65535``,
    DICOM/NIfTI: per-image min-max or ``percentiles``).

    Args:
        spatial_size: resize to this size (an int means the same size on every spatial axis, so non-square
            images are stretched); ``None`` keeps the stored size.
        image_key: the key holding the file path.
        scale_intensity: scale intensities to ``[0, 1]``.
        percentiles: per-image scaling percentiles for DICOM, NIfTI and floating-point images.
        resize_mode: interpolation of ``monai.transforms.Resized`` (``"area"`` averages when shrinking).

    Example::

        load = load_image_transforms(spatial_size=64)
        load({"image": "images/000001.png"})["image"].shape  # (1, 64, 64)
    """
    transforms: list[Callable] = [
        LoadGrayscaleImaged(image_key, GrayscaleImageReader(scale_intensity=scale_intensity, percentiles=percentiles))
    ]
    if isinstance(spatial_size, int):
        transforms.append(_ResizeEveryAxisd(image_key, spatial_size, resize_mode))
    elif spatial_size is not None:
        transforms.append(Resized(image_key, spatial_size=spatial_size, mode=resize_mode))
    return Compose(transforms)


class _ResizeEveryAxisd(MapTransform):
    """``Resized`` to ``size`` on every spatial axis, whether the image turns out 2D or 3D."""

    def __init__(self, keys: Any, size: int, mode: str) -> None:
        super().__init__(keys)
        self.size = size
        self.mode = mode
        self._resizers: dict[tuple[Hashable, int], Resized] = {}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            rank = d[key].ndim - 1
            if (key, rank) not in self._resizers:
                self._resizers[key, rank] = Resized(key, spatial_size=(self.size,) * rank, mode=self.mode)
            d = self._resizers[key, rank](d)
        return d


# ---------------------------------------------------------------------------------------------------- encoding
class EncodeAttributesd(MapTransform):
    """Add the network encoding of the image parents to a data dictionary, under ``pa_key``.

    Reads each attribute in ``keys`` (default: the graph's image parents), parses it to its canonical value
    (class index or float in original units; canonical values pass through unchanged, raw ones such as
    ``"female"`` are parsed), writes the canonical value back and adds ``pa_key``: a float32 vector laid
    out as :meth:`AttributeEncoder.parents_vector` (image parents in graph order, one-hot categoricals,
    continuous values scaled to ``[-1, 1]``).

    Args:
        graph: the causal graph, or anything :meth:`CausalGraph.build` accepts.
        keys: attributes to canonicalise; must include every image parent.
        pa_key: where to put the parents vector.
        value_maps: raw-value maps for :class:`AttributeEncoder`.
        allow_missing_keys: don't raise if a key in ``keys`` that is not an image parent is missing.

    Example::

        encode = EncodeAttributesd("mimic_cxr")
        encode({"sex": 1, "race": 2, "age": 50.0, "disease": 0})["pa"]
        # tensor([1., 0., 0., 1., 0., 0.])
    """

    def __init__(
        self,
        graph: CausalGraph | Mapping | str = "mimic_cxr",
        keys: Sequence[str] | None = None,
        pa_key: str = "pa",
        value_maps: Mapping[str, Mapping] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        self.encoder = AttributeEncoder(graph, value_maps=_string_keyed(value_maps))
        self.graph = self.encoder.graph
        keys = list(self.graph.image_parents) if keys is None else self.graph.check_names(keys)
        missing_parents = [p for p in self.graph.image_parents if p not in keys]
        if missing_parents:
            raise ValueError(f"keys must include every image parent; missing {missing_parents}.")
        super().__init__(keys, allow_missing_keys)
        self.pa_key = pa_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        missing = [p for p in self.graph.image_parents if p not in d]
        if missing:
            raise ValueError(f"Image parents {missing} are missing from the data; got keys {sorted(map(str, d))}.")
        for key in self.key_iterator(d):
            d[key] = self.encoder.canonical(key, _as_scalar(d[key]))
        encoded = self.encoder.encode({p: [d[p]] for p in self.graph.image_parents})
        d[self.pa_key] = self.encoder.parents_vector(encoded)[0].to(torch.float32)
        return d


def _as_scalar(value: Any) -> Any:
    """One-element arrays and tensors (e.g. after ``ToTensord``) as Python numbers."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.reshape(()).item()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.reshape(()).item()
    return value


def _string_keyed(value_maps: Mapping[str, Mapping] | None) -> dict[str, dict]:
    """CSV values are strings, so map keys given as numbers (``{0: "male"}``) are matched as ``"0"`` too."""
    result: dict[str, dict] = {}
    for name, mapping in (value_maps or {}).items():
        entries = dict(mapping)
        for raw, target in mapping.items():
            entries.setdefault(str(raw).strip(), target)
        result[name] = entries
    return result


# ---------------------------------------------------------------------------------------------------- the CSV
@dataclass
class _Record:
    row: int
    line: int
    fields: list[str]


def _read_csv(csv_file: str, delimiter: str | None) -> tuple[list[str], list[_Record], int]:
    """Header, data records (with 1-based data row and starting line) and the header's line number."""
    if delimiter is None:
        delimiter = "\t" if csv_file.lower().endswith((".tsv", ".tab")) else ","
    records: list[_Record] = []
    header: list[str] | None = None
    header_line = 0
    with open(csv_file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        next_line = 1
        try:
            for fields in reader:
                start = next_line
                next_line = reader.line_num + 1
                if not fields or all(not f.strip() for f in fields):
                    continue
                if header is None:
                    header, header_line = [f.strip() for f in fields], start
                    continue
                records.append(_Record(len(records) + 1, start, fields))
        except (csv.Error, UnicodeDecodeError) as error:
            raise ValueError(
                f"CSV file '{csv_file}' cannot be parsed near line {next_line} (expected UTF-8 text): {error}"
            ) from error
    if header is None:
        raise DatasetValidationError(
            csv_file, [], 0, headline=f"CSV file '{csv_file}' is empty: it has no header and no data rows."
        )
    return header, records, header_line


def _resolve_columns(
    csv_file: str,
    header: list[str],
    graph: CausalGraph,
    columns: Mapping[str, str | Sequence[str]] | None,
    extra_columns: Sequence[str],
    header_line: int,
) -> dict[str, str]:
    """Graph key -> CSV column; every problem (unknown key, missing or repeated column) in one error."""
    columns = dict(columns or {})
    known = [graph.image_key, *graph.attributes]
    unknown = [k for k in columns if k not in known]
    if unknown:
        raise ValueError(f"columns maps unknown keys {unknown}; the keys are the image key and the attributes {known}.")
    candidates: dict[str, list[str]] = {}
    for key in known:
        given = columns.get(key)
        if given is None:
            # the phantom writes its image paths in a "path" column
            candidates[key] = [key, "path"] if key == graph.image_key else [key]
        else:
            candidates[key] = [given] if isinstance(given, str) else [str(c) for c in given]
    resolved: dict[str, str] = {}
    problems: list[RowProblem] = []
    for key, names in candidates.items():
        found = next((n for n in names if n in header), None)
        if found is None:
            wanted = " or ".join(f"'{n}'" for n in names)
            problems.append(
                RowProblem(None, header_line, None, None, f"missing column {wanted} for '{key}'; available: {header}")
            )
        else:
            resolved[key] = found
    for name in extra_columns:
        if name in known:
            raise ValueError(f"extra column '{name}' clashes with a graph key; keys: {known}.")
        if name not in header:
            problems.append(
                RowProblem(None, header_line, None, None, f"missing extra column '{name}'; available: {header}")
            )
    for name in set(resolved.values()) | set(extra_columns):
        if header.count(name) > 1:
            problems.append(
                RowProblem(None, header_line, name, None, f"column '{name}' appears {header.count(name)} times")
            )
    if problems:
        raise DatasetValidationError(csv_file, problems, 0, headline=f"CSV file '{csv_file}' lacks columns it needs:")
    return resolved


def load_csv_datalist(
    csv_file: str | os.PathLike,
    graph: CausalGraph | Mapping | str = "mimic_cxr",
    columns: Mapping[str, str | Sequence[str]] | None = None,
    image_root: str | os.PathLike | None = None,
    value_maps: Mapping[str, Mapping] | None = None,
    skip_bad_rows: bool = False,
    check_images: bool | str = True,
    exclude: Mapping[str, Sequence[Any]] | None = None,
    extra_columns: Sequence[str] = (),
    row_key: str = "row",
    delimiter: str | None = None,
    num_workers: int | None = None,
) -> list[dict]:
    """Read a CSV of image paths and attributes into a validated MONAI datalist.

    Every row is checked before anything trains: the image file exists and (unless ``check_images`` is
    False) can be read, see :func:`check_image`; each attribute is present, a known category (by class
    name, case-insensitively, by class index, or through ``value_maps``) or a number inside its range.
    All problems are collected and raised together as one :class:`DatasetValidationError` (a
    ``ValueError``) whose lines name the CSV, the 1-based data row, the file line, the column and the value,
    so everything can be fixed in one pass. With ``skip_bad_rows`` the bad rows are dropped instead and a
    warning on the ``"monai_cf.data"`` logger gives their count and first reasons.

    Args:
        csv_file: the CSV (``.tsv``: tab-separated, unless ``delimiter`` says otherwise).
        graph: the causal graph, or anything :meth:`CausalGraph.build` accepts.
        columns: graph key (the image key and each attribute) -> CSV column, or a list of candidate columns
            of which the first present is used. Default: the key itself; for the image, a column named like
            the image key or else ``"path"`` (the phantom's CSVs need no mapping).
        image_root: directory relative image paths are resolved against (default: the CSV's directory).
        value_maps: per-attribute raw-value maps, e.g. ``{"sex": {"M": "male", "F": "female"}}``.
        skip_bad_rows: drop bad rows with a logged warning instead of raising; raises if none is left.
        check_images: ``True``: cheap per-format checks; ``"full"``: decode every image as training will;
            ``False``: only check that the files exist.
        exclude: graph key -> raw values whose rows are left out silently (a selection, not an error),
            e.g. ``{"disease": ["Other"]}``.
        extra_columns: further CSV columns to copy, raw, into each item.
        row_key: the item key holding the 1-based data row.
        delimiter: the field delimiter (default: by suffix).
        num_workers: threads for image checks (default ``min(8, cpu_count)``; used from 16 images on).

    Returns:
        ``[{image_key: absolute path, <attribute>: canonical value, ..., row_key: row, <extra>: str}, ...]``
        with class indices (int) for discrete attributes and floats in original units for continuous ones.

    Raises:
        FileNotFoundError: the CSV does not exist.
        DatasetValidationError: missing columns, or bad rows (unless ``skip_bad_rows``).

    Example::

        datalist = load_csv_datalist("phantom/train.csv", "mimic_cxr")
        datalist[0]  # {'image': '/.../phantom/images/train/000001.png', 'sex': 0, 'race': 2, 'age': 57.3,
                     #  'disease': 0, 'row': 1}
    """
    csv_file = os.path.abspath(os.path.expanduser(os.fspath(csv_file)))
    if not os.path.isfile(csv_file):
        raise FileNotFoundError(f"CSV file '{csv_file}' does not exist.")
    if check_images not in (True, False, "full"):
        raise ValueError(f"check_images must be True, False or 'full', got {check_images!r}.")
    graph = CausalGraph.build(graph)
    encoder = AttributeEncoder(graph, value_maps=_string_keyed(value_maps))
    if row_key == graph.image_key or row_key in graph:
        raise ValueError(f"row_key '{row_key}' clashes with a graph key.")
    image_root = os.path.dirname(csv_file) if image_root is None else os.path.abspath(os.path.expanduser(image_root))
    header, records, header_line = _read_csv(csv_file, delimiter)
    resolved = _resolve_columns(csv_file, header, graph, columns, list(extra_columns), header_line)
    index = {name: header.index(name) for name in [*resolved.values(), *extra_columns]}
    excluded = {k: {str(v).strip() for v in values} for k, values in (exclude or {}).items()}
    unknown = [k for k in excluded if k not in resolved]
    if unknown:
        raise ValueError(f"exclude names unknown keys {unknown}; keys: {list(resolved)}.")

    problems: list[RowProblem] = []
    items: list[dict] = []
    kept_records: list[_Record] = []
    raw_paths: list[str] = []
    n_excluded = 0
    for record in records:
        raw = {key: _field(record, index[column]) for key, column in resolved.items()}
        if any(raw[key] in values for key, values in excluded.items()):
            n_excluded += 1
            continue
        item, row_problems = _parse_record(record, raw, len(header), graph, encoder, resolved, image_root)
        item[row_key] = record.row
        item.update({name: _field(record, index[name]) for name in extra_columns})
        problems += row_problems
        items.append(item)
        kept_records.append(record)
        raw_paths.append(raw[graph.image_key])
    if n_excluded:
        logger.info("%s: left out %d rows by exclude=%s.", csv_file, n_excluded, dict(exclude or {}))
    if not records:
        raise DatasetValidationError(csv_file, [], 0, headline=f"CSV file '{csv_file}' has a header but no data rows.")

    if check_images:
        image_column = resolved[graph.image_key]
        problems += _check_images(
            items, kept_records, raw_paths, graph.image_key, image_column, check_images, num_workers
        )
    problems.sort(key=lambda p: (p.row or 0, header.index(p.column) if p.column in header else -1))

    if problems:
        error = DatasetValidationError(csv_file, problems, len(items))
        if not skip_bad_rows:
            raise error
        bad = set(error.bad_rows)
        items = [item for item in items if item[row_key] not in bad]
        reasons = "; ".join(p.describe(os.path.basename(csv_file)) for p in problems[:3])
        logger.warning(
            "%s: skipped %d bad rows of %d; first problems: %s", csv_file, len(bad), len(bad) + len(items), reasons
        )
        if not items:
            raise DatasetValidationError(
                csv_file, problems, len(bad), headline=f"Every row of '{csv_file}' has problems; nothing is left:"
            )
    if not items:
        raise DatasetValidationError(
            csv_file, [], 0, headline=f"CSV file '{csv_file}': exclude={dict(exclude or {})} left no rows."
        )
    return items


def _field(record: _Record, position: int) -> str:
    return record.fields[position].strip() if position < len(record.fields) else ""


def _parse_record(
    record: _Record,
    raw: Mapping[str, str],
    n_columns: int,
    graph: CausalGraph,
    encoder: AttributeEncoder,
    resolved: Mapping[str, str],
    image_root: str,
) -> tuple[dict[str, Any], list[RowProblem]]:
    """The datalist item of one row (image path resolved, attributes canonical) and the row's problems."""
    problems: list[RowProblem] = []
    if len(record.fields) != n_columns:
        problems.append(
            RowProblem(
                record.row,
                record.line,
                None,
                f"{len(record.fields)} fields",
                f"the row has {len(record.fields)} fields but the header has {n_columns} "
                "(an unquoted delimiter or a missing value?)",
            )
        )
    item: dict[str, Any] = {}
    column, path = resolved[graph.image_key], raw[graph.image_key]
    if not path:
        problems.append(RowProblem(record.row, record.line, column, path, "the image path is empty"))
    else:
        full_path = os.path.normpath(os.path.join(image_root, os.path.expanduser(path)))
        if not os.path.isfile(full_path):
            problems.append(
                RowProblem(record.row, record.line, column, path, f"image file '{full_path}' does not exist")
            )
        item[graph.image_key] = full_path
    for name in graph.attributes:
        try:
            item[name] = encoder.canonical(name, raw[name])
        except ValueError as error:
            problems.append(RowProblem(record.row, record.line, resolved[name], raw[name], str(error)))
    return item, problems


def _check_images(
    items: list[dict],
    records: list[_Record],
    raw_paths: list[str],
    image_key: str,
    column: str,
    mode: bool | str,
    num_workers: int | None,
) -> list[RowProblem]:
    todo = [
        (item, record, raw_path)
        for item, record, raw_path in zip(items, records, raw_paths)
        if os.path.isfile(item.get(image_key, ""))
    ]
    full = mode == "full"

    def check(path: str) -> str | None:
        return check_image(path, full=full)

    paths = [item[image_key] for item, _, _ in todo]
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers > 1 and len(paths) >= _PARALLEL_CHECK_MIN:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check, paths))
    else:
        reasons = [check(path) for path in paths]
    problems = []
    for (item, record, raw_path), reason in zip(todo, reasons):
        if reason is not None:
            problems.append(
                RowProblem(record.row, record.line, column, raw_path, f"image '{item[image_key]}' {reason}")
            )
    return problems


# ---------------------------------------------------------------------------------------------------- datasets
def csv_dataset(
    csv_file: str | os.PathLike,
    graph: CausalGraph | Mapping | str = "mimic_cxr",
    columns: Mapping[str, str | Sequence[str]] | None = None,
    spatial_size: int | Sequence[int] | None = None,
    cache: bool = False,
    transforms: Sequence[Callable] | None = None,
    value_maps: Mapping[str, Mapping] | None = None,
    scale_intensity: bool = True,
    percentiles: tuple[float, float] = (0.0, 100.0),
    pa_key: str = "pa",
    cache_rate: float = 1.0,
    cache_num_workers: int = 1,
    **datalist_kwargs: Any,
) -> Dataset:
    """A validated ``monai.data.Dataset`` (or ``CacheDataset``) of images, canonical attributes and ``"pa"``.

    Combines :func:`load_csv_datalist`, :func:`load_image_transforms` and :class:`EncodeAttributesd`;
    ``transforms`` (e.g. random augmentations) run after them, so a ``CacheDataset`` caches the loaded,
    resized and encoded samples.

    Args:
        csv_file: the CSV, see :func:`load_csv_datalist`.
        graph: the causal graph, or anything :meth:`CausalGraph.build` accepts.
        columns: graph key -> CSV column(s), see :func:`load_csv_datalist`.
        spatial_size: resize images to this size; ``None`` keeps the stored size.
        cache: use ``monai.data.CacheDataset``.
        transforms: further transforms applied after loading and encoding.
        value_maps: per-attribute raw-value maps.
        scale_intensity: scale intensities to ``[0, 1]``, see :class:`GrayscaleImageReader`.
        percentiles: per-image scaling percentiles for DICOM, NIfTI and floating-point images.
        pa_key: key of the encoded parents vector.
        cache_rate: fraction cached by ``CacheDataset``.
        cache_num_workers: threads filling the cache.
        datalist_kwargs: further :func:`load_csv_datalist` arguments (``image_root``, ``skip_bad_rows``,
            ``check_images``, ``exclude``, ``extra_columns``...).

    Example::

        ds = csv_dataset("phantom/train.csv", "mimic_cxr", spatial_size=64)
        ds[0]["image"].shape, ds[0]["pa"]  # (1, 64, 64), tensor([0., 0., 0., 1., -0.1, 0.])
    """
    graph = CausalGraph.build(graph)
    datalist = load_csv_datalist(csv_file, graph, columns=columns, value_maps=value_maps, **datalist_kwargs)
    pipeline: list[Callable] = [
        load_image_transforms(spatial_size, graph.image_key, scale_intensity=scale_intensity, percentiles=percentiles),
        EncodeAttributesd(graph, pa_key=pa_key, value_maps=value_maps),
        *(transforms or ()),
    ]
    # Flattened, so that CacheDataset caches every deterministic step (it stops at the first nested Compose).
    transform = Compose(pipeline).flatten()
    if cache:
        return CacheDataset(datalist, transform, cache_rate=cache_rate, num_workers=cache_num_workers, progress=False)
    return Dataset(datalist, transform)


# ---------------------------------------------------------------------------------------------------- MIMIC-CXR
_MIMIC_RACE_SPELLINGS = {
    "WHITE": "White",
    "WHITE - OTHER EUROPEAN": "White",
    "WHITE - RUSSIAN": "White",
    "WHITE - EASTERN EUROPEAN": "White",
    "WHITE - BRAZILIAN": "White",
    "PORTUGUESE": "White",
    "ASIAN": "Asian",
    "ASIAN - CHINESE": "Asian",
    "ASIAN - SOUTH EAST ASIAN": "Asian",
    "ASIAN - ASIAN INDIAN": "Asian",
    "ASIAN - KOREAN": "Asian",
    "BLACK": "Black",
    "BLACK/AFRICAN AMERICAN": "Black",
    "BLACK/CAPE VERDEAN": "Black",
    "BLACK/CARIBBEAN ISLAND": "Black",
    "BLACK/AFRICAN": "Black",
}

#: Reads the MIMIC-CXR split CSVs of the chexploration / causal-gen preprocessing with the ``mimic_cxr``
#: graph: ``load_csv_datalist(csv, image_root=..., **MIMIC_CXR_PRESET)``. Assumed columns: the image path in
#: ``path_preproc`` (relative to ``image_root``); ``age`` in years; ``sex_label`` (0 male, 1 female) or
#: ``sex`` ("M"/"F"); ``race_label`` (0 White, 1 Asian, 2 Black) or ``race`` (MIMIC strings such as "WHITE",
#: "BLACK/AFRICAN AMERICAN"); ``disease`` ("No Finding" / "Pleural Effusion", or 0/1). Rows whose disease is
#: "Other" are left out, as in the Soft-CFT and causal-gen experiments (a selection, not an error).
MIMIC_CXR_PRESET: dict[str, Any] = {
    "graph": "mimic_cxr",
    "columns": {
        "image": ["path_preproc", "path"],
        "age": ["age", "anchor_age"],
        "sex": ["sex_label", "sex"],
        "race": ["race_label", "race"],
        "disease": ["disease", "disease_label"],
    },
    "value_maps": {
        "sex": {"M": "male", "F": "female", "m": "male", "f": "female"},
        "race": {**_MIMIC_RACE_SPELLINGS, **{k.title(): v for k, v in _MIMIC_RACE_SPELLINGS.items()}},
        "disease": {
            "No Finding": "no_finding",
            "no finding": "no_finding",
            "NO FINDING": "no_finding",
            "Pleural Effusion": "pleural_effusion",
            "pleural effusion": "pleural_effusion",
            "PLEURAL EFFUSION": "pleural_effusion",
        },
    },
    "exclude": {"disease": ["Other"]},
}


def mimic_cxr_datalist(
    csv_file: str | os.PathLike, image_root: str | os.PathLike | None = None, **kwargs: Any
) -> list[dict]:
    """:func:`load_csv_datalist` with :data:`MIMIC_CXR_PRESET` (whose entries ``kwargs`` may override).

    Example::

        train = mimic_cxr_datalist("mimic.sample.train.csv", image_root="/data/mimic-cxr-jpg-224")
    """
    options = {**MIMIC_CXR_PRESET, **kwargs}
    return load_csv_datalist(csv_file, image_root=image_root, **options)
