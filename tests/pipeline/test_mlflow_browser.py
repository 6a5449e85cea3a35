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
"""The MLflow record of a bundle run, looked at the way a user does: ``mlflow ui`` in a headless Chromium.

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``; ``.ci/run`` installs them)
and Selenium (the test extra); marked ``browser`` and skipped when Chromium is missing.
``MONAI_CF_SCREENSHOT=path.png`` saves the evaluation run's page (the bundle README's screenshot).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.pipeline.helpers import TINY, TRAIN, run_bundle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason="needs chromium and chromedriver"),
]

STAGE_RUNS = {"guidance", "evaluation_predictor", "mechanisms", "hvae", "cft_hard", "cft_soft", "evaluate"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked_bundle")
    run_bundle(TRAIN, bundle_root=str(root), tracking="mlflow", **TINY)
    return root


@pytest.fixture(scope="module")
def mlflow_ui(tracked_run):
    port = _free_port()
    store = f"sqlite:///{tracked_run / 'eval' / 'mlruns.db'}"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, cwd=tracked_run, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"mlflow ui did not start: {server.stderr.read().decode()[-2000:]}")
    yield url, store
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _page_text(driver, url: str | None, wanted: list[str], timeout: float = 60) -> str:
    """Open ``url`` (``None``: stay) and wait until the rendered page text holds every string of ``wanted``."""
    from selenium.webdriver.common.by import By

    if url is not None:
        driver.get(url)
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = driver.find_element(By.TAG_NAME, "body").text
        if all(w in text for w in wanted):
            return text
        time.sleep(0.5)
    missing = [w for w in wanted if w not in text]
    raise AssertionError(f"{url}: the page never showed {missing}; it showed:\n{text[:3000]}")


def _click(driver, text: str, timeout: float = 30) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        shown = [
            e for e in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']") if e.is_displayed()
        ]
        if shown:
            shown[0].click()
            return
        time.sleep(0.5)
    raise AssertionError(f"Nothing named '{text}' to click on {driver.current_url}.")


def _runs(store: str) -> tuple[str, dict[str, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("cxr_soft_cft")
    runs = client.search_runs([experiment.experiment_id])
    return experiment.experiment_id, {r.info.run_name: r.info.run_id for r in runs}


def test_the_experiment_lists_one_run_per_stage(mlflow_ui, browser):
    url, store = mlflow_ui
    experiment_id, runs = _runs(store)
    assert STAGE_RUNS <= set(runs)
    _page_text(browser, f"{url}/#/experiments/{experiment_id}/runs", [*sorted(STAGE_RUNS), "7 matching runs"])


def test_the_evaluation_run_shows_its_metrics_report_and_figures(mlflow_ui, browser, tracked_run):
    url, store = mlflow_ui
    experiment_id, runs = _runs(store)
    page = f"{url}/#/experiments/{experiment_id}/runs/{runs['evaluate']}"
    metrics = json.loads((tracked_run / "eval" / "metrics.json").read_text())
    _page_text(browser, page, ["evaluate", "Metrics (", "baseline/sex", str(metrics["baseline"]["sex"])[:5]])
    from mlflow import MlflowClient

    run = MlflowClient(store).get_run(runs["evaluate"])
    assert json.loads(run.data.params["cf_types"]) == metrics["config"]["cf_types"]
    assert run.info.end_time - run.info.start_time >= 1000 * metrics["timing"]["total_s"] * 0.9  # not 10 ms
    _page_text(browser, f"{page}/artifacts", ["evaluation"])
    _click(browser, "evaluation")
    figures = [f"counterfactuals_{c}.png" for c in ("none", "hard", "soft")] + ["embedding_sex.png"]
    _page_text(browser, None, ["report.md", "metrics.json", *figures])
    _click(browser, "counterfactuals_soft.png")
    _page_text(browser, None, ["evaluation/counterfactuals_soft.png"])
    time.sleep(2)  # the image preview loads after its title
    screenshot = os.environ.get("MONAI_CF_SCREENSHOT")
    if screenshot:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(screenshot)
    _click(browser, "report.md")
    _page_text(browser, None, ["Counterfactual evaluation report", "Table 1"])


def test_a_training_stage_run_shows_its_curves(mlflow_ui, browser):
    url, store = mlflow_ui
    experiment_id, runs = _runs(store)
    from mlflow import MlflowClient

    logged = MlflowClient(store).get_run(runs["hvae"]).data
    assert logged.metrics and logged.params
    name = sorted(logged.metrics)[0]
    _page_text(browser, f"{url}/#/experiments/{experiment_id}/runs/{runs['hvae']}", ["hvae", name])
