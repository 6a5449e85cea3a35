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
from __future__ import annotations

import csv
import gzip
import logging
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from monai_cf.data import (
    MIMIC_CXR_PRESET,
    DatasetValidationError,
    EncodeAttributesd,
    GrayscaleImageReader,
    LoadGrayscaleImaged,
    check_image,
    csv_dataset,
    load_csv_datalist,
    load_image_transforms,
    mimic_cxr_datalist,
)

PHANTOM_HEADER = ["patient_id", "path", "sex", "race", "age", "disease"]


# ---------------------------------------------------------------------------------------------------- writers
def asymmetric(shape, dtype=np.uint8, seed=0):
    """Random values plus a ramp, so any transpose or flip changes the array."""
    rng = np.random.default_rng(seed)
    high = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    ramp = np.linspace(0, high // 2 if np.issubdtype(dtype, np.integer) else 0.5, int(np.prod(shape)))
    noise = rng.uniform(0, high / 2, size=int(np.prod(shape)))
    return (ramp + noise).reshape(shape).astype(dtype)


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_dicom(path, array, photometric="MONOCHROME2"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = array.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_nifti(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def minmax(array):
    array = array.astype(np.float64)
    return ((array - array.min()) / (array.max() - array.min())).astype(np.float32)


@pytest.fixture
def phantom_csv(tmp_path):
    """A phantom-format CSV: 6 rows, paths relative to the CSV's directory, class names as in the phantom."""
    rows = [
        ["p1", "images/train/000001.png", "male", "White", "63.0", "no_finding"],
        ["p2", "images/train/000002.png", "female", "Black", "50", "pleural_effusion"],
        ["p3", "images/train/000003.png", "female", "Asian", "21.5", "no_finding"],
        ["p4", "images/train/000004.png", "male", "Black", "88", "pleural_effusion"],
        ["p5", "images/train/000005.png", "male", "white", "40", "no_finding"],
        ["p6", "images/train/000006.png", "female", "Asian", "71", "pleural_effusion"],
    ]
    for i, row in enumerate(rows):
        write_png(str(tmp_path / row[1]), asymmetric((12, 10), seed=i))
    return write_csv(tmp_path / "train.csv", PHANTOM_HEADER, rows), rows


# ---------------------------------------------------------------------------------------------------- loading
def test_png_round_trips_exactly_in_numpy_order(tmp_path):
    array = asymmetric((13, 7))
    load = load_image_transforms()
    image = load({"image": write_png(str(tmp_path / "a.png"), array)})["image"]
    assert tuple(image.shape) == (1, 13, 7) and image.dtype == torch.float32
    np.testing.assert_array_equal(image.numpy(), array[None].astype(np.float32) / np.float32(255.0))

    array16 = asymmetric((9, 5), dtype=np.uint16, seed=1)
    image16 = load({"image": write_png(str(tmp_path / "b16.png"), array16)})["image"]
    np.testing.assert_array_equal(image16.numpy(), array16[None].astype(np.float32) / np.float32(65535.0))

    gray_rgb = np.repeat(array[..., None], 3, axis=-1)
    np.testing.assert_array_equal(load({"image": write_png(str(tmp_path / "g.png"), gray_rgb)})["image"], image)
    colour = np.stack([array, array[::-1], np.zeros_like(array)], axis=-1)
    loaded = load({"image": write_png(str(tmp_path / "c.png"), colour)})["image"][0].numpy()
    expected = (0.299 * array + 0.587 * array[::-1]) / 255.0
    np.testing.assert_allclose(loaded, expected, atol=1e-6)


def test_jpeg_matches_pil_decode_and_resize(tmp_path):
    path = str(tmp_path / "a.jpg")
    Image.fromarray(asymmetric((16, 24))).save(path, quality=90)
    decoded = np.asarray(Image.open(path)).astype(np.float32) / np.float32(255.0)
    image = load_image_transforms()({"image": path})["image"]
    np.testing.assert_array_equal(image.numpy(), decoded[None])
    small = load_image_transforms(spatial_size=(8, 12))({"image": path})["image"]
    assert tuple(small.shape) == (1, 8, 12)
    # "area" halving averages 2x2 blocks
    np.testing.assert_allclose(small[0, 0, 0].item(), decoded[:2, :2].mean(), atol=1e-6)


def test_dicom_loads_in_pixel_array_order_min_max_scaled(tmp_path):
    array = asymmetric((11, 6), dtype=np.uint16, seed=2)
    path = write_dicom(str(tmp_path / "a.dcm"), array)
    assert np.array_equal(pydicom.dcmread(path).pixel_array, array)
    image = load_image_transforms()({"image": path})["image"]
    assert tuple(image.shape) == (1, 11, 6)
    np.testing.assert_allclose(image.numpy(), minmax(array)[None], atol=1e-6)
    inverted = load_image_transforms()({"image": write_dicom(str(tmp_path / "m1.dcm"), array, "MONOCHROME1")})
    np.testing.assert_allclose(inverted["image"].numpy(), 1.0 - minmax(array)[None], atol=1e-6)


def test_nifti_2d_and_3d_load_in_nibabel_array_order(tmp_path):
    array2d = asymmetric((9, 14), dtype=np.int16, seed=3)
    image = load_image_transforms()({"image": write_nifti(str(tmp_path / "a.nii.gz"), array2d)})["image"]
    assert tuple(image.shape) == (1, 9, 14)
    np.testing.assert_allclose(image.numpy(), minmax(array2d)[None], atol=1e-6)

    volume = asymmetric((5, 7, 4), dtype=np.float32, seed=4)
    loaded = load_image_transforms()({"image": write_nifti(str(tmp_path / "v.nii"), volume)})["image"]
    assert tuple(loaded.shape) == (1, 5, 7, 4)
    np.testing.assert_allclose(loaded.numpy(), minmax(volume)[None], atol=1e-6)
    resized = load_image_transforms(spatial_size=4)({"image": str(tmp_path / "v.nii")})["image"]
    assert tuple(resized.shape) == (1, 4, 4, 4)

    # a 2D image stored as (H, W, 1) is 2D
    flat = load_image_transforms()({"image": write_nifti(str(tmp_path / "f.nii"), array2d[..., None])})["image"]
    np.testing.assert_allclose(flat.numpy(), image.numpy())


def test_percentile_scaling_clips(tmp_path):
    array = np.arange(100, dtype=np.uint16).reshape(10, 10) * 10
    reader = GrayscaleImageReader(percentiles=(10, 90))
    data, meta = reader.get_data(reader.read(write_dicom(str(tmp_path / "a.dcm"), array)))
    low, high = np.percentile(array, [10, 90])
    np.testing.assert_allclose(data, np.clip((array - low) / (high - low), 0, 1), atol=1e-6)
    assert meta["intensity_scaling"] == "percentiles 10-90"
    with pytest.raises(ValueError, match="percentiles"):
        GrayscaleImageReader(percentiles=(50, 10))


# ---------------------------------------------------------------------------------------------------- datalists
def test_phantom_csv_needs_no_mapping_and_encodes_pa(phantom_csv, tmp_path):
    csv_file, rows = phantom_csv
    datalist = load_csv_datalist(csv_file, "mimic_cxr", extra_columns=["patient_id"])
    assert len(datalist) == 6
    assert datalist[1] == {
        "image": str(tmp_path / "images/train/000002.png"),
        "sex": 1,
        "race": 2,
        "age": 50.0,
        "disease": 1,
        "row": 2,
        "patient_id": "p2",
    }
    assert [d["race"] for d in datalist] == [0, 2, 1, 2, 0, 1]  # "white" matched case-insensitively
    sample = EncodeAttributesd("mimic_cxr")(datalist[1])
    # sex 1 | race one-hot (Black) | age 50 in [0, 100] -> 0 | disease 1
    torch.testing.assert_close(sample["pa"], torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0]))
    assert sample["pa"].dtype == torch.float32 and sample["sex"] == 1 and sample["age"] == 50.0
    first = EncodeAttributesd("mimic_cxr")(datalist[0])["pa"]
    torch.testing.assert_close(first, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.26, 0.0]))


def test_encode_attributes_parses_raw_values():
    sample = EncodeAttributesd("mimic_cxr", value_maps={"sex": {"F": "female"}})(
        {"sex": "F", "race": "Asian", "age": torch.tensor(75.0), "disease": "0"}
    )
    assert (sample["sex"], sample["race"], sample["age"], sample["disease"]) == (1, 1, 75.0, 0)
    torch.testing.assert_close(sample["pa"], torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="missing"):
        EncodeAttributesd("mimic_cxr")({"sex": 1})


def test_user_graph_and_column_mapping(tmp_path):
    graph = {
        "view": {"kind": "categorical", "class_names": ["AP", "PA", "LAT", "LL"]},
        "bmi": {"kind": "continuous", "range": [10, 50]},
        "smoker": {"kind": "binary", "parents": ["bmi"]},
        "scan": {"kind": "image", "parents": ["bmi", "view"]},
    }
    header = ["file", "ViewPosition", "BMI", "smoke"]
    rows = [["x/a.dcm", "LAT", "40", "1"], ["x/b.nii.gz", "PA", "10", "no"]]
    os.makedirs(tmp_path / "x")
    write_dicom(str(tmp_path / "x/a.dcm"), asymmetric((8, 8), np.uint16))
    write_nifti(str(tmp_path / "x/b.nii.gz"), asymmetric((8, 8), np.int16))
    csv_file = write_csv(tmp_path / "u.csv", header, rows)
    columns = {"scan": "file", "view": "ViewPosition", "bmi": "BMI", "smoker": "smoke"}
    value_maps = {"smoker": {"no": 0, "yes": 1}}
    datalist = load_csv_datalist(csv_file, graph, columns=columns, value_maps=value_maps)
    assert [(d["view"], d["bmi"], d["smoker"]) for d in datalist] == [(2, 40.0, 1), (1, 10.0, 0)]
    ds = csv_dataset(csv_file, graph, columns=columns, value_maps=value_maps, spatial_size=4)
    # image parents in graph order: bmi (scaled to [-1, 1]) then view one-hot
    torch.testing.assert_close(ds[0]["pa"], torch.tensor([0.5, 0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(ds[1]["pa"], torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]))
    assert tuple(ds[0]["scan"].shape) == (1, 4, 4)


def test_mixed_formats_in_one_dataloader(tmp_path):
    header = PHANTOM_HEADER
    rows = []
    for i in range(20):  # enough images for the threaded check
        rows.append([f"p{i}", f"img/{i}.png", "male", "White", str(30 + i), "no_finding"])
        write_png(str(tmp_path / f"img/{i}.png"), asymmetric((20, 16), seed=i))
    Image.fromarray(asymmetric((20, 16))).save(tmp_path / "img/j.jpg")
    write_dicom(str(tmp_path / "img/d.dcm"), asymmetric((20, 16), np.uint16))
    write_nifti(str(tmp_path / "img/n.nii.gz"), asymmetric((20, 16), np.int16))
    rows += [
        ["j", "img/j.jpg", "female", "Asian", "70", "pleural_effusion"],
        ["d", "img/d.dcm", "female", "Black", "80", "pleural_effusion"],
        ["n", "img/n.nii.gz", "male", "Asian", "90", "no_finding"],
    ]
    csv_file = write_csv(tmp_path / "mixed.csv", header, rows)
    ds = csv_dataset(csv_file, "mimic_cxr", spatial_size=8, check_images="full", num_workers=2)
    batches = list(DataLoader(ds, batch_size=8, shuffle=False, num_workers=0))
    assert [tuple(b["image"].shape) for b in batches] == [(8, 1, 8, 8), (8, 1, 8, 8), (7, 1, 8, 8)]
    last = batches[-1]
    assert last["image"].dtype == torch.float32 and 0.0 <= last["image"].min() and last["image"].max() <= 1.0
    assert tuple(last["pa"].shape) == (7, 6) and last["pa"].dtype == torch.float32
    assert last["row"].tolist() == [17, 18, 19, 20, 21, 22, 23]
    assert last["race"].tolist() == [0, 0, 0, 0, 1, 2, 1]
    torch.testing.assert_close(last["pa"][-1], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.8, 0.0]))

    cached = csv_dataset(csv_file, "mimic_cxr", spatial_size=8, cache=True)
    assert isinstance(cached, CacheDataset)
    torch.testing.assert_close(cached[21]["image"], ds[21]["image"])


def test_mimic_preset_reads_common_spellings(tmp_path):
    header = ["path_preproc", "age", "sex", "sex_label", "race", "race_label", "disease", "Pleural Effusion"]
    rows = [
        ["a.png", "60", "F", "1", "WHITE", "0", "No Finding", "0"],
        ["b.png", "70", "M", "0", "BLACK/AFRICAN AMERICAN", "2", "Pleural Effusion", "1"],
        ["c.png", "55", "M", "0", "ASIAN", "1", "Other", ""],
    ]
    root = tmp_path / "images"
    for row in rows:
        write_png(str(root / row[0]), asymmetric((6, 6)))
    csv_file = write_csv(tmp_path / "mimic.sample.train.csv", header, rows)
    datalist = mimic_cxr_datalist(csv_file, image_root=str(root))
    assert [(d["sex"], d["race"], d["age"], d["disease"], d["row"]) for d in datalist] == [
        (1, 0, 60.0, 0, 1),
        (0, 2, 70.0, 1, 2),
    ]
    # CSVs with only the string columns work too
    strings = write_csv(
        tmp_path / "s.csv",
        ["path_preproc", "age", "sex", "race", "disease"],
        [[r[0], r[1], r[2], r[4], r[6]] for r in rows],
    )
    again = load_csv_datalist(strings, image_root=str(root), **MIMIC_CXR_PRESET)
    assert [(d["sex"], d["race"], d["disease"]) for d in again] == [(1, 0, 0), (0, 2, 1)]


# ---------------------------------------------------------------------------------------------------- bad rows
def _break(tmp_path, rows, case):
    """Make row 3 (file line 4) bad in the way ``case`` says; return (column, value) that must be named."""
    bad = rows[2]
    if case == "missing_file":
        bad[1] = "images/train/nope.png"
        return "path", "images/train/nope.png"
    if case == "corrupt_png":
        data = bytearray((tmp_path / bad[1]).read_bytes())
        data[60:80] = b"\xff" * 20
        (tmp_path / bad[1]).write_bytes(bytes(data))
        return "path", bad[1]
    if case == "text_dcm":
        (tmp_path / "fake.dcm").write_text("this is not DICOM")
        bad[1] = "fake.dcm"
        return "path", "fake.dcm"
    if case == "truncated_nifti":
        path = write_nifti(str(tmp_path / "v.nii.gz"), np.random.default_rng(0).normal(size=(16, 16, 16)))
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        bad[1] = "v.nii.gz"
        return "path", "v.nii.gz"
    if case == "age_out_of_range":
        bad[4] = "150"
        return "age", "150"
    if case == "unknown_category":
        bad[3] = "Martian"
        return "race", "Martian"
    if case == "empty_value":
        bad[2] = ""
        return "sex", ""
    raise AssertionError(case)


BAD_CASES = [
    "missing_file",
    "corrupt_png",
    "text_dcm",
    "truncated_nifti",
    "age_out_of_range",
    "unknown_category",
    "empty_value",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_is_named(phantom_csv, tmp_path, case):
    _, rows = phantom_csv
    column, value = _break(tmp_path, rows, case)
    csv_file = write_csv(tmp_path / "bad.csv", PHANTOM_HEADER, rows)
    with pytest.raises(DatasetValidationError) as info:
        load_csv_datalist(csv_file, "mimic_cxr")
    message = str(info.value)
    assert "bad.csv row 3 (line 4)" in message
    assert f"column '{column}'" in message and f"value {value!r}" in message
    assert info.value.bad_rows == [3] and isinstance(info.value, ValueError)
    if column == "path":
        assert str(tmp_path) in message  # the resolved image path


def test_all_problems_reported_at_once_and_skipped(phantom_csv, tmp_path, caplog):
    _, rows = phantom_csv
    rows[0][4] = "-3"
    rows[2][3] = "Martian"
    rows[2][5] = "flu"
    rows[4][1] = "gone.png"
    csv_file = write_csv(tmp_path / "bad.csv", PHANTOM_HEADER, rows)
    with pytest.raises(DatasetValidationError) as info:
        load_csv_datalist(csv_file, "mimic_cxr")
    assert info.value.bad_rows == [1, 3, 5] and len(info.value.problems) == 4
    assert "3 of 6 data rows" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="monai_cf.data"):
        kept = load_csv_datalist(csv_file, "mimic_cxr", skip_bad_rows=True)
    assert [d["row"] for d in kept] == [2, 4, 6]
    assert "skipped 3 bad rows of 6" in caplog.text and "'-3'" in caplog.text


def test_listing_is_capped(tmp_path):
    rows = [[f"p{i}", f"{i}.png", "male", "White", "200", "no_finding"] for i in range(25)]
    csv_file = write_csv(tmp_path / "many.csv", PHANTOM_HEADER, rows)
    with pytest.raises(DatasetValidationError) as info:
        load_csv_datalist(csv_file, "mimic_cxr", check_images=False)
    assert len(info.value.problems) == 50  # a missing file and an age per row
    assert "... and 30 more problems" in str(info.value)
    assert len(str(info.value).splitlines()) == 22
    with pytest.raises(DatasetValidationError, match="nothing is left"):
        load_csv_datalist(csv_file, "mimic_cxr", skip_bad_rows=True)


def test_check_images_false_only_checks_existence(phantom_csv, tmp_path):
    _, rows = phantom_csv
    _break(tmp_path, rows, "text_dcm")
    csv_file = write_csv(tmp_path / "ok.csv", PHANTOM_HEADER, rows)
    assert len(load_csv_datalist(csv_file, check_images=False)) == 6
    rows[0][1] = "missing.png"
    csv_file = write_csv(tmp_path / "ok.csv", PHANTOM_HEADER, rows)
    with pytest.raises(DatasetValidationError, match="row 1 .*does not exist"):
        load_csv_datalist(csv_file, check_images=False)


def test_missing_column_and_missing_csv(phantom_csv, tmp_path):
    _, rows = phantom_csv
    csv_file = write_csv(tmp_path / "nocol.csv", ["patient_id", "path", "sex", "ethnicity", "age", "disease"], rows)
    with pytest.raises(DatasetValidationError) as info:
        load_csv_datalist(csv_file, "mimic_cxr")
    message = str(info.value)
    assert "nocol.csv" in message and "missing column 'race'" in message and "'ethnicity'" in message
    assert len(load_csv_datalist(csv_file, columns={"race": "ethnicity"})) == 6
    with pytest.raises(DatasetValidationError, match="missing column 'img' for 'image'"):
        load_csv_datalist(csv_file, columns={"image": "img", "race": "ethnicity"})
    with pytest.raises(ValueError, match="unknown keys"):
        load_csv_datalist(csv_file, columns={"colour": "x"})
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        load_csv_datalist(tmp_path / "nothere.csv")


def test_malformed_rows_and_empty_csv(phantom_csv, tmp_path):
    _, rows = phantom_csv
    rows[1] = rows[1] + ["surplus"]
    csv_file = write_csv(tmp_path / "wide.csv", PHANTOM_HEADER, rows)
    with pytest.raises(DatasetValidationError, match="wide.csv row 2 .line 3.: value '7 fields'"):
        load_csv_datalist(csv_file)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DatasetValidationError, match="empty"):
        load_csv_datalist(tmp_path / "empty.csv")
    header_only = write_csv(tmp_path / "header.csv", PHANTOM_HEADER, [])
    with pytest.raises(DatasetValidationError, match="no data rows"):
        load_csv_datalist(header_only)


def test_check_image_reasons(tmp_path):
    good = write_png(str(tmp_path / "a.png"), asymmetric((8, 8)))
    assert check_image(good) is None and check_image(good, full=True) is None
    data = open(good, "rb").read()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    assert "cannot be read" in check_image(tmp_path / "t.png")
    jpg = tmp_path / "a.jpg"
    Image.fromarray(asymmetric((64, 64))).save(jpg)
    (tmp_path / "t.jpg").write_bytes(jpg.read_bytes()[:800])
    assert "truncated" in check_image(tmp_path / "t.jpg")
    dcm = write_dicom(str(tmp_path / "a.dcm"), asymmetric((64, 64), np.uint16))
    (tmp_path / "t.dcm").write_bytes(open(dcm, "rb").read()[:-100])
    assert check_image(dcm) is None and "truncated" in check_image(tmp_path / "t.dcm")
    nii = write_nifti(str(tmp_path / "a.nii"), asymmetric((8, 8, 8), np.int16))
    (tmp_path / "t.nii").write_bytes(open(nii, "rb").read()[:-10])
    assert check_image(nii) is None and "truncated" in check_image(tmp_path / "t.nii")
    with gzip.open(tmp_path / "x.txt.gz", "wb") as handle:
        handle.write(b"x")
    assert "unsupported" in check_image(tmp_path / "x.txt.gz")


def test_the_missing_gpu_codec_is_logged_once_per_process():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    codec_logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    codec_logger.addHandler(handler)
    try:
        for _ in range(3):
            LoadGrayscaleImaged("image")  # MONAI builds its GPU DICOM reader (and logs) for every loader
    finally:
        codec_logger.removeHandler(handler)
    assert len([r for r in records if "nvImageCodec is not available" in r.getMessage()]) <= 1
