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
"""The benchmark's reference loader builds a checkout's HVAE from its own presets, steps it, and names what is missing.

The checkout here is a stand-in written by the test with the reference's interface (``hps.HPARAMS_REGISTRY``,
``hps.add_arguments``, ``vae.HVAE(args)`` with ``forward(x, parents, beta)``, ``abduct`` and ``forward_latents``).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))

from reference_hvae import load_reference, reference_batch, reference_step  # noqa: E402

HPS = """
class Hparams:
    pass

tiny = Hparams()
tiny.lr = 0.05
tiny.wd = 0.0
tiny.input_res = 8
tiny.context_dim = 3
HPARAMS_REGISTRY = {"tiny": tiny}

def add_arguments(parser):
    parser.add_argument("--hps", default="other")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=0.01)
    parser.add_argument("--betas", nargs="+", type=float, default=[0.9, 0.9])
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--input_res", type=int, default=64)
    parser.add_argument("--input_channels", type=int, default=1)
    parser.add_argument("--context_dim", type=int, default=4)
    return parser
"""

VAE = """
import torch
from torch import nn

class HVAE(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.hps = args.hps
        self.enc = nn.Conv2d(args.input_channels, 2, 3, padding=1)
        self.dec = nn.Conv2d(2 + args.context_dim, args.input_channels, 3, padding=1)

    def forward(self, x, parents, beta=1):
        z = self.enc(x)
        nll = (self.dec(torch.cat([z, parents], 1)) - x).pow(2).mean()
        kl = z.pow(2).mean()
        return dict(elbo=nll + beta * kl, nll=nll, kl=kl)

    def abduct(self, x, parents):
        return [self.enc(x)]

    def forward_latents(self, latents, parents):
        return self.dec(torch.cat([latents[0], parents], 1)), None
"""


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hps.py").write_text(textwrap.dedent(HPS))
    (tmp_path / "src" / "vae.py").write_text(textwrap.dedent(VAE))
    return tmp_path


def test_the_preset_overrides_the_checkout_defaults(checkout):
    model, args = load_reference(checkout, "tiny")
    assert model.hps == "tiny" and args.lr == 0.05 and args.wd == 0.0 and args.input_res == 8
    assert args.betas == [0.9, 0.9] and args.context_dim == 3
    x, pa = reference_batch(args, batch=4)
    assert x.shape == (4, 1, 8, 8) and pa.shape == (4, 3, 8, 8)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert torch.equal(pa[..., 0, 0], pa[..., 7, 5])  # parents broadcast over the image
    assert torch.allclose(torch.round((x + 1) * 127.5), (x + 1) * 127.5, atol=1e-4)  # 256 levels


def test_a_training_step_moves_the_weights_and_a_counterfactual_does_not(checkout):
    model, args = load_reference(checkout, "tiny")
    before = [p.detach().clone() for p in model.parameters()]
    reference_step(model, args, "train", batch=4)()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    trained = [p.detach().clone() for p in model.parameters()]
    reference_step(model, args, "cf", batch=4)()
    assert all(torch.equal(t, p) for t, p in zip(trained, model.parameters())) and not model.training
    with pytest.raises(ValueError, match="task must be 'train' or 'cf', got 'sample'"):
        reference_step(model, args, "sample", batch=4)


def test_a_missing_checkout_or_preset_is_named(checkout, tmp_path):
    with pytest.raises(ValueError, match="has no preset 'mimic192' \\(searched .*hps.py\\)"):
        load_reference(checkout, "mimic192")
    with pytest.raises(ValueError, match="is not a folder"):
        load_reference(tmp_path / "nowhere", "tiny")
    (checkout / "src" / "vae.py").unlink()
    with pytest.raises(ValueError, match="has no vae.py"):
        load_reference(checkout, "tiny")
