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
"""Publish a main job's results into its bundle: ``metadata.json`` ``eval_metrics`` and the README's tables.

The figures a bundle states are written from one evaluation, never by hand::

    python -m monai_cf.pipeline.results bundles/cxr_soft_cft/eval --bundle_root bundles/cxr_soft_cft

copies ``eval/metrics.json`` to ``docs/main_job_metrics.json``, writes ``eval_metrics`` into
``configs/metadata.json`` and replaces the tables between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
in ``docs/README.md`` by the same tables of the report (:func:`~monai_cf.handlers.report.format_report`) of that
``metrics.json``. A test regenerates them from the shipped ``docs/main_job_metrics.json`` and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_cf.handlers.report import format_report

__all__ = ["RESULT_TABLES", "metadata_eval_metrics", "report_tables", "publish_results", "shipped_results_match"]

#: README blocks filled from the report: name -> the report section that holds the table
RESULT_TABLES = {
    "table1": "## Table 1",
    "faithfulness": "## Faithfulness",
    "consistency": "## Counterfactual consistency",
}
SHIPPED_METRICS = Path("docs") / "main_job_metrics.json"
_CF_KEYS = {"none": "no_cft", "hard": "hard_cft", "soft": "soft_cft"}


def metadata_eval_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The headline figures of an evaluation for ``metadata.json`` ``eval_metrics`` (rounded as they are shown).

    Example::

        metadata_eval_metrics(json.load(open("eval/metrics.json")))["mean_truth_gain_soft_cft"]  # e.g. -1.289
    """
    metrics: dict[str, Any] = {}
    for cf_type, key in _CF_KEYS.items():
        if cf_type in results.get("amplification", {}) and cf_type != "none":
            metrics[f"mean_amplification_{key}"] = round(float(results["amplification"][cf_type]), 4)
    for cf_type, value in (results.get("faithfulness") or {}).get("truth_gain_mean", {}).items():
        if cf_type in _CF_KEYS and value is not None:
            metrics[f"mean_truth_gain_{_CF_KEYS[cf_type]}"] = round(float(value), 3)
    outside = (results.get("consistency") or {}).get("outside", {})
    for cf_type, counts in outside.items():
        if cf_type in _CF_KEYS:
            metrics[f"consistency_rows_outside_{_CF_KEYS[cf_type]}"] = {k: int(v) for k, v in counts.items()}
    metrics["note"] = (
        "phantom, default config, fresh clone, 2-core CPU; written by python -m monai_cf.pipeline.results from "
        f"{SHIPPED_METRICS.as_posix()} (amplification, faithfulness.truth_gain_mean, consistency.outside)"
    )
    return metrics


def report_tables(results: Mapping[str, Any], names: Sequence[str] = tuple(RESULT_TABLES)) -> dict[str, str]:
    """The Markdown tables (header to last row) of the report sections in :data:`RESULT_TABLES`."""
    report = format_report(results)
    tables = {}
    for name in names:
        start = report.find(RESULT_TABLES[name])
        if start < 0:
            raise ValueError(f"The report has no section '{RESULT_TABLES[name]}' (needed for the '{name}' table).")
        lines = report[start:].splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("|"))
        last = first
        while last + 1 < len(lines) and lines[last + 1].startswith("|"):
            last += 1
        tables[name] = "\n".join(lines[first : last + 1])
    return tables


def _block(name: str) -> re.Pattern:
    return re.compile(rf"<!-- results:{name} -->\n(?:(.*?)\n)?<!-- /results:{name} -->", re.DOTALL)


def _filled(readme: str, tables: Mapping[str, str], where: str) -> str:
    for name, table in tables.items():
        pattern = _block(name)
        if not pattern.search(readme):
            raise ValueError(f"{where} has no '<!-- results:{name} -->' ... '<!-- /results:{name} -->' block.")
        block = f"<!-- results:{name} -->\n{table}\n<!-- /results:{name} -->"
        readme = pattern.sub(lambda m, b=block: b, readme)
    return readme


def publish_results(eval_dir: str | os.PathLike, bundle_root: str | os.PathLike) -> dict[str, Any]:
    """Write a main job's ``metrics.json`` into the bundle's metadata, README tables and shipped copy.

    Returns:
        The ``eval_metrics`` written.
    """
    eval_dir, bundle_root = Path(eval_dir), Path(bundle_root)
    source = eval_dir / "metrics.json"
    if not source.is_file():
        raise ValueError(f"No '{source}': run the main job first (it writes its evaluation there).")
    with open(source) as handle:
        results = json.load(handle)
    readme_path = bundle_root / "docs" / "README.md"
    metadata_path = bundle_root / "configs" / "metadata.json"
    for path in (readme_path, metadata_path):
        if not path.is_file():
            raise ValueError(f"bundle_root '{bundle_root}' has no '{path.relative_to(bundle_root)}'.")
    readme = _filled(readme_path.read_text(), report_tables(results), str(readme_path))
    with open(metadata_path) as handle:
        metadata = json.load(handle)
    metadata["eval_metrics"] = metadata_eval_metrics(results)
    shipped = bundle_root / SHIPPED_METRICS
    if source.resolve() != shipped.resolve():
        shutil.copyfile(source, shipped)
    readme_path.write_text(readme)
    with open(metadata_path, "w") as handle:
        json.dump(metadata, handle, indent=4)
        handle.write("\n")
    return metadata["eval_metrics"]


def shipped_results_match(bundle_root: str | os.PathLike) -> list[str]:
    """What in the bundle's README and metadata differs from its shipped ``docs/main_job_metrics.json`` (empty: all
    agree)."""
    bundle_root = Path(bundle_root)
    with open(bundle_root / SHIPPED_METRICS) as handle:
        results = json.load(handle)
    problems = []
    readme = (bundle_root / "docs" / "README.md").read_text()
    for name, table in report_tables(results).items():
        match = _block(name).search(readme)
        if match is None:
            problems.append(f"docs/README.md has no results:{name} block")
        elif (match.group(1) or "") != table:
            problems.append(f"docs/README.md results:{name} differs from the report of {SHIPPED_METRICS.as_posix()}")
    with open(bundle_root / "configs" / "metadata.json") as handle:
        metadata = json.load(handle)
    if metadata.get("eval_metrics") != metadata_eval_metrics(results):
        problems.append(f"configs/metadata.json eval_metrics differ from {SHIPPED_METRICS.as_posix()}")
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", help="the main job's evaluation folder (holding metrics.json)")
    parser.add_argument("--bundle_root", required=True, help="the bundle folder (configs/, docs/)")
    args = parser.parse_args(argv)
    written = publish_results(args.eval_dir, args.bundle_root)
    print(json.dumps(written, indent=2))


if __name__ == "__main__":
    main()
