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
"""The bundle's stated figures come from its shipped metrics.json, through one command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from monai_cf.pipeline.results import (
    SHIPPED_METRICS,
    main,
    metadata_eval_metrics,
    report_tables,
    shipped_results_match,
)

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "cxr_soft_cft"


def test_readme_tables_and_metadata_agree_with_the_shipped_metrics():
    assert shipped_results_match(BUNDLE) == []
    with open(BUNDLE / SHIPPED_METRICS) as handle:
        results = json.load(handle)
    readme = (BUNDLE / "docs" / "README.md").read_text()
    soft = results["faithfulness"]["truth_gain_mean"]["soft"]
    assert "| mean truth gain |  | " in readme and f"{soft:.2f} |" in readme
    assert "| do(age) | sex | 0.000 |" in readme  # the consistency table


def _bundle_copy(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    for name in ("configs/metadata.json", "docs/README.md", str(SHIPPED_METRICS)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BUNDLE / name, root / name)
    return root


def test_publishing_a_new_evaluation_rewrites_the_blocks_and_the_metadata(tmp_path, capsys):
    root = _bundle_copy(tmp_path)
    with open(root / SHIPPED_METRICS) as handle:
        results = json.load(handle)
    results["amplification"]["hard"] = 0.0321
    results["baseline"]["sex"] = 0.5
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    with open(eval_dir / "metrics.json", "w") as handle:
        json.dump(results, handle)
    assert shipped_results_match(root) == []
    main([str(eval_dir), "--bundle_root", str(root)])
    assert '"mean_amplification_hard_cft": 0.0321' in capsys.readouterr().out
    with open(root / "configs" / "metadata.json") as handle:
        assert json.load(handle)["eval_metrics"] == metadata_eval_metrics(results)
    readme = (root / "docs" / "README.md").read_text()
    assert "| None | Real images | 50.0 |" in readme and report_tables(results)["table1"] in readme
    assert shipped_results_match(root) == []  # the new metrics.json was shipped with them
    # a README edited by hand no longer matches
    (root / "docs" / "README.md").write_text(
        readme.replace("| None | Real images | 50.0 |", "| None | Real images | 51.0 |")
    )
    assert shipped_results_match(root) == [
        "docs/README.md results:table1 differs from the report of docs/main_job_metrics.json"
    ]


def test_publishing_names_what_is_missing(tmp_path):
    root = _bundle_copy(tmp_path)
    with pytest.raises(ValueError, match="run the main job first"):
        main([str(tmp_path / "nowhere"), "--bundle_root", str(root)])
    readme = (root / "docs" / "README.md").read_text()
    (root / "docs" / "README.md").write_text(readme.replace("<!-- results:consistency -->", ""))
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    shutil.copyfile(root / SHIPPED_METRICS, eval_dir / "metrics.json")
    metadata = (root / "configs" / "metadata.json").read_text()
    with pytest.raises(ValueError, match="no '<!-- results:consistency -->'"):
        main([str(eval_dir), "--bundle_root", str(root)])
    assert (root / "configs" / "metadata.json").read_text() == metadata  # nothing written
