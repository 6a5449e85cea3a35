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
"""The bundle README's three overrides (own network, another optimiser, a handler on fine-tuning), run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from monai_cf.pipeline import load_checkpoint, load_scm
from tests.pipeline.helpers import REPO, TINY, TRAIN, cli, messages, run_bundle
from tests.pipeline.user_network import ConditionalAutoencoder

README = REPO / "bundles" / "cxr_soft_cft" / "docs" / "README.md"
USER_NETWORK = "tests.pipeline.user_network.ConditionalAutoencoder"


def readme_override(name: str) -> dict:
    """The YAML block the bundle README shows under ``<!-- override: name -->``."""
    found = re.search(rf"<!-- override: {name} -->\n```yaml\n(.*?)```", README.read_text(), re.S)
    assert found, f"the bundle README has no '{name}' override block"
    return yaml.safe_load(found.group(1))


def layered(tmp_path: Path, override: dict, name: str = "override.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(override))
    return [str(TRAIN), str(path)]


def test_own_image_network_trains_fine_tunes_and_is_rebuilt_for_inference(tmp_path):
    override = readme_override("network")
    override["network_def"]["_target_"] = USER_NETWORK  # the README's my_package.MyNetwork
    root = tmp_path / "bundle"
    run_bundle(layered(tmp_path, override), run_id="run_cft", bundle_root=str(root), **{**TINY, "cft#modes": ["soft"]})
    models = root / "models"
    hvae = load_checkpoint(models / "hvae.pt")
    recorded = hvae["settings"]["image_model"]
    assert recorded["_target_"] == USER_NETWORK and recorded["width"] == 8 and recorded["spatial_size"] == 32
    network = ConditionalAutoencoder(2, 1, 32, parents_dim=6, width=8)
    assert set(hvae["state_dict"]) == set(network.state_dict())
    tuned = load_checkpoint(models / "hvae_cft_soft.pt")["state_dict"]
    assert any(not torch.equal(tuned[k], hvae["state_dict"][k]) for k in tuned), "fine-tuning changed nothing"

    scm = load_scm(models, cf_type="soft")
    assert isinstance(scm.image_model, ConditionalAutoencoder) and scm.image_model.parents_dim == 6
    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    pa = {"sex": [0, 1, 0, 1], "race": [0, 1, 2, 0], "age": [40.0, 50.0, 60.0, 70.0], "disease": [0, 0, 1, 1]}
    with torch.no_grad():
        x_null, _ = scm.counterfactual(x, pa, do={"sex": torch.tensor([0, 1, 0, 1])})
        x_cf, pa_cf = scm.counterfactual(x, pa, do={"sex": torch.tensor([1, 0, 1, 0])})
    torch.testing.assert_close(x_null, x.clamp(0, 1), atol=1e-5, rtol=0)
    assert pa_cf["sex"].tolist() == [1, 0, 1, 0] and (x_cf - x).abs().mean() > 0


def test_own_image_network_lacking_the_interface_fails_when_the_pipeline_is_built(tmp_path):
    override = {"network_def": {"_target_": "torch.nn.Conv2d", "_mode_": "callable", "in_channels": 1,
                                "out_channels": 1, "kernel_size": 3}}  # fmt: skip
    with pytest.raises(Exception) as error:
        run_bundle(layered(tmp_path, override), run_id="run_hvae", bundle_root=str(tmp_path / "b"), **TINY)
    assert "lacks spatial_dims" in messages(error.value) and "elbo()" in messages(error.value)
    built = {"network_def": {"_target_": USER_NETWORK, "spatial_dims": 2, "in_channels": 1, "spatial_size": 32,
                             "parents_dim": 6}}  # fmt: skip
    with pytest.raises(Exception) as error:
        run_bundle(layered(tmp_path, built), run_id="run_hvae", bundle_root=str(tmp_path / "b"), **TINY)
    assert "_mode_: callable" in messages(error.value)
    assert not (tmp_path / "b" / "models").exists(), "nothing may train before the config is checked"


def test_another_optimizer_trains_the_hvae_and_is_recorded(tmp_path):
    override = readme_override("optimizer")
    root = tmp_path / "bundle"
    run_bundle(layered(tmp_path, override), run_id="run_hvae", bundle_root=str(root), **TINY)
    run = root / "models" / "runs" / "hvae"
    checkpoint = torch.load(sorted(run.glob("checkpoint_*.pt"))[-1], map_location="cpu", weights_only=False)
    group = checkpoint["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and "nesterov" in group and "betas" not in group  # SGD's, not AdamW's
    assert all("momentum_buffer" in state for state in checkpoint["optimizer"]["state"].values())
    recorded = load_checkpoint(root / "models" / "hvae.pt")["settings"]["training"]["optimizer"]
    assert recorded == {"_target_": "torch.optim.sgd.SGD", "lr": 0.01, "momentum": 0.9}
    # the same models without the override: the HVAE file is not reused silently
    with pytest.raises(Exception) as error:
        run_bundle(TRAIN, run_id="run_hvae", bundle_root=str(root), **TINY)
    assert "training.optimizer" in messages(error.value) and "--retrain" in messages(error.value)


@pytest.mark.parametrize(
    "optimizer, expected",
    [
        ({"_target_": "torch.optim.SGD", "_mode_": "callable", "lr": -1.0}, "hvae_training.optimizer: Invalid"),
        ({"_target_": "torch.optim.SGD", "_mode_": "callable", "lr": 0.1, "momentm": 0.9}, "momentm"),
        (
            {"_target_": "torch.optim.SGD", "params": "$[torch.nn.Parameter(torch.zeros(1))]", "lr": 0.1},
            "_mode_: callable",
        ),
    ],
)
def test_a_bad_optimizer_fails_before_training(optimizer, expected, tmp_path):
    with pytest.raises(Exception) as error:
        run_bundle(layered(tmp_path, {"hvae_training#optimizer": optimizer}), bundle_root=str(tmp_path / "b"), **TINY)
    assert expected in messages(error.value)
    assert not (tmp_path / "b" / "models").exists()


def _every_second_iteration(override: dict) -> dict:
    handler = override["cft#handlers"][0]
    assert "iteration % 50 == 0" in handler["iteration_log"]
    # the tiny run has two iterations per mode, not 50: its second iteration is logged
    handler["iteration_log"] = handler["iteration_log"].replace("% 50", "% 2")
    return override


def test_a_handler_on_the_fine_tuning_stage_runs_with_it(tmp_path, capfd):
    root = tmp_path / "bundle"
    run_bundle(TRAIN, run_id="run_hvae", bundle_root=str(root), **TINY)
    capfd.readouterr()
    override = _every_second_iteration(readme_override("handlers"))
    run_bundle(layered(tmp_path, override), run_id="run_cft", bundle_root=str(root), **TINY)
    log = "".join(capfd.readouterr())
    lines = [line for line in log.splitlines() if "-- cft_loss: " in line]
    # two fine-tuning modes (hard, soft), two iterations each: the second one of each logged, and nothing else
    assert len(lines) == 2 and all("Iter: 2/2" in line for line in lines), log[-4000:]
    assert not (root / "models" / "hvae_cft_none.pt").exists()
    settings = load_checkpoint(root / "models" / "hvae_cft_soft.pt")["settings"]["cft"]
    assert "handlers" not in settings and "optimizer" not in settings


def test_a_handler_with_a_lambda_reaches_side_by_side_fine_tuning(tmp_path, capfd):
    override = readme_override("handlers")
    root = tmp_path / "bundle"
    run_bundle(TRAIN, run_id="run_hvae", bundle_root=str(root), **TINY)
    capfd.readouterr()
    override = _every_second_iteration(readme_override("handlers"))
    run_bundle(layered(tmp_path, override), run_id="run_cft", bundle_root=str(root), **{**TINY, "parallel": True})
    log = "".join(capfd.readouterr())
    assert "Training cft hard, cft soft side by side" in log
    for mode in ("hard", "soft"):
        assert len(re.findall(rf"\[cft {mode}\].*Iter: 2/2 -- cft_loss", log)) == 1, log[-3000:]


def test_a_non_handler_in_handlers_is_named(tmp_path):
    override = {"predictor#handlers": [{"_target_": "torch.nn.Identity"}]}
    with pytest.raises(Exception) as error:
        run_bundle(layered(tmp_path, override), bundle_root=str(tmp_path / "b"), **TINY)
    assert "predictor.handlers[0] is a Identity" in messages(error.value)


def test_a_bad_optimizer_is_the_last_line_from_the_cli(tmp_path):
    optimizer = {"_target_": "torch.optim.SGD", "_mode_": "callable", "lr": -1.0}
    files = layered(tmp_path, {"hvae_training#optimizer": optimizer})
    result = cli("--config_file", str(files), "--bundle_root", str(tmp_path / "b"), timeout=60)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == "ValueError: hvae_training.optimizer: Invalid learning rate: -1.0"
