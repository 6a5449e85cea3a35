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

import math

import pytest
import torch
import torch.nn.functional as F

from monai_cf.graph import CausalGraph
from monai_cf.networks.nets.mechanisms import (
    BinaryGumbelMaxMechanism,
    GumbelMaxMechanism,
    SplineFlowMechanism,
    abduct_all,
    build_mechanisms,
    counterfactual_all,
    log_prob_all,
    predict_all,
    sample_all,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gumbel(shape, generator):
    u = torch.rand(*shape, generator=generator, dtype=torch.float64).clamp(1e-300, 1 - 1e-16)
    return -torch.log(-torch.log(u))


def _linear_logits(mech: GumbelMaxMechanism, base: list[float], shift: list[float]) -> None:
    """Make ``logits(pa) = base + pa * shift`` for a one-parent mechanism built with ``hidden_channels=()``."""
    linear = mech.net[0]
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(shift, dtype=linear.weight.dtype).unsqueeze(-1))
        linear.bias.copy_(torch.tensor(base, dtype=linear.bias.dtype))


# ---------------------------------------------------------------------- continuous
@pytest.mark.parametrize("parents_dim", [0, 3])
def test_flow_round_trip(parents_dim):
    torch.manual_seed(0)
    mech = SplineFlowMechanism(parents_dim=parents_dim).double()
    # Random spline parameters, so the round trip is tested through a non-trivial warp (much larger ones
    # give near-flat spline pieces whose inverse amplifies rounding beyond 1e-5, which training does not reach).
    with torch.no_grad():
        for param in mech.parameters():
            param.normal_(0.0, 0.2)
    value = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64).unsqueeze(-1)
    parents = torch.randn(201, parents_dim, dtype=torch.float64) if parents_dim else None
    noise = mech.abduct(value, parents)
    assert noise.shape == (201, 1)
    assert noise.std() > 0.1  # a real transform, not a constant
    assert torch.allclose(mech.predict(noise, parents), value, atol=1e-5, rtol=0)
    # Monotone in the value for fixed parents, as an increasing bijection must be.
    fixed = parents[:1].expand(201, -1) if parents_dim else None
    fixed_noise = mech.abduct(value, fixed)
    assert (fixed_noise[1:] > fixed_noise[:-1]).all()
    # float32 as well.
    mech32 = mech.float()
    v32 = value.float()
    p32 = parents.float() if parents is not None else None
    assert torch.allclose(mech32.predict(mech32.abduct(v32, p32), p32), v32, atol=1e-5, rtol=0)


def test_flow_untrained_prior_and_clamp():
    mech = SplineFlowMechanism(parents_dim=0)
    draws = mech.sample(n=4000, generator=_gen(0))
    # Identity splines at start: N(0, 1/scale^2) in encoded units, clipped to [-1, 1].
    assert abs(draws.std().item() - 1 / 3) < 0.02
    assert draws.min() >= -1 and draws.max() <= 1
    far = mech.predict(torch.tensor([[10.0], [-10.0]]))
    assert far.flatten().tolist() == [1.0, -1.0]
    loose = SplineFlowMechanism(parents_dim=0, clamp=False)
    assert loose.predict(torch.tensor([[10.0]])).item() > 1.0


def test_flow_log_prob_normalised():
    torch.manual_seed(1)
    mech = SplineFlowMechanism(parents_dim=1).double()
    with torch.no_grad():
        for param in mech.parameters():
            param.normal_(0.0, 0.3)
    grid = torch.linspace(-6.0, 6.0, 24001, dtype=torch.float64).unsqueeze(-1)
    parents = torch.full_like(grid, 0.7)
    density = mech.log_prob(grid, parents).exp().detach()
    integral = torch.trapezoid(density, grid[:, 0]).item()
    assert abs(integral - 1.0) < 1e-3


def test_flow_maximum_likelihood_fit():
    torch.manual_seed(0)
    mech = SplineFlowMechanism(parents_dim=1, hidden_channels=(32, 32))
    optimizer = torch.optim.Adam(mech.parameters(), lr=3e-3)

    def toy(n):
        x = torch.rand(n, 1) * 2 - 1
        return x, 0.5 * x + 0.1 * torch.randn(n, 1)

    x_val, y_val = toy(2000)
    with torch.no_grad():
        nll_before = -mech.log_prob(y_val, x_val).mean().item()
    for _ in range(300):
        x, y = toy(256)
        loss = -mech.log_prob(y, x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nll_after = -mech.log_prob(y_val, x_val).mean().item()
        nll_true = -torch.distributions.Normal(0.5 * x_val, 0.1).log_prob(y_val).mean().item()
        assert nll_before - nll_after > 0.8
        assert nll_after < nll_true + 0.05
        round_trip = mech.predict(mech.abduct(y_val.clamp(-1, 1), x_val), x_val)
        assert torch.allclose(round_trip, y_val.clamp(-1, 1), atol=1e-5, rtol=0)
        for x0 in (-0.8, 0.0, 0.8):
            draws = mech.sample(torch.full((4000, 1), x0), generator=_gen(1))
            assert abs(draws.mean().item() - 0.5 * x0) < 0.03
            assert abs(draws.std().item() - 0.1) < 0.02


# ---------------------------------------------------------------------- discrete
def test_gumbel_round_trip_is_exact():
    torch.manual_seed(0)
    n = 50000
    categorical = GumbelMaxMechanism(4, parents_dim=3, hidden_channels=(8,))
    binary = BinaryGumbelMaxMechanism(parents_dim=3)
    parents = torch.randn(n, 3)
    for mech in (categorical, binary):
        with torch.no_grad():  # large logits stress the truncation numerically
            for param in mech.parameters():
                param.normal_(0.0, 5.0)
        if mech is binary:
            value = torch.randint(0, 2, (n, 1)).float()
        else:
            value = F.one_hot(torch.randint(0, 4, (n,)), 4).float()
        noise = mech.abduct(value, parents, generator=_gen(2))
        assert noise.shape == (n, 2 if mech is binary else 4)
        assert torch.isfinite(noise).all()
        assert torch.equal(mech.predict(noise, parents), value)
    # Roots as well, and abduction is reproducible with a generator and random without.
    root = GumbelMaxMechanism(3)
    value = F.one_hot(torch.tensor([2, 0, 1, 1]), 3).float()
    noise_a = root.abduct(value, generator=_gen(5))
    assert torch.equal(noise_a, root.abduct(value, generator=_gen(5)))
    assert not torch.equal(noise_a, root.abduct(value, generator=_gen(6)))
    assert torch.equal(root.predict(noise_a), value)


def test_gumbel_posterior_noise_marginal():
    # Averaged over the observed class drawn from the prior, posterior Gumbels are again i.i.d. Gumbel(0, 1).
    mech = GumbelMaxMechanism(3).double()
    with torch.no_grad():
        mech.root_logits.copy_(torch.tensor([0.4, -0.7, 1.1]))
    value = mech.sample(n=100000, generator=_gen(0))
    noise = mech.abduct(value, generator=_gen(1))
    euler_gamma = 0.5772156649
    assert torch.allclose(noise.mean(0), torch.full((3,), euler_gamma, dtype=torch.float64), atol=0.02)
    assert torch.allclose(noise.std(0), torch.full((3,), math.pi / math.sqrt(6), dtype=torch.float64), atol=0.02)


def test_categorical_counterfactual_distribution_matches_rejection_sampling():
    base = [0.5, -0.3, 0.1]
    shift = [-1.5, 1.5, 0.3]  # logits under pa=1 are base + shift
    mech = GumbelMaxMechanism(3, parents_dim=1, hidden_channels=()).double()
    _linear_logits(mech, base, shift)
    logits0 = torch.tensor(base, dtype=torch.float64)
    logits1 = logits0 + torch.tensor(shift, dtype=torch.float64)
    gen = _gen(0)
    prior_noise = _gumbel((400000, 3), gen)
    factual_class = (logits0 + prior_noise).argmax(-1)
    counterfactual_class = (logits1 + prior_noise).argmax(-1)
    n = 40000
    for k in range(3):
        kept = counterfactual_class[factual_class == k]
        reference = torch.bincount(kept, minlength=3).double() / kept.numel()
        value = F.one_hot(torch.full((n,), k), 3).double()
        noise = mech.abduct(value, torch.zeros(n, 1, dtype=torch.float64), generator=gen)
        cf = mech.predict(noise, torch.ones(n, 1, dtype=torch.float64)).argmax(-1)
        ours = torch.bincount(cf, minlength=3).double() / n
        std = (reference * (1 - reference) * (1 / n + 1 / kept.numel())).sqrt()
        assert ((ours - reference).abs() <= 4 * std + 1e-3).all(), (k, ours, reference)
        # Not trivially the factual class: the parent change moves a real share of samples.
        assert ours[k] < 0.95 or k == 1


@pytest.mark.parametrize("observed,logit,cf_logit", [(1, 0.3, -1.0), (0, 0.3, 1.5), (1, -0.5, 0.8), (0, 1.0, -2.0)])
def test_binary_counterfactual_analytic(observed, logit, cf_logit):
    mech = BinaryGumbelMaxMechanism(parents_dim=1, hidden_channels=()).double()
    _linear_logits(mech, [logit], [cf_logit - logit])
    n = 100000
    value = torch.full((n, 1), float(observed), dtype=torch.float64)
    noise = mech.abduct(value, torch.zeros(n, 1, dtype=torch.float64), generator=_gen(observed))
    cf_rate = mech.predict(noise, torch.ones(n, 1, dtype=torch.float64)).mean().item()
    sig = torch.sigmoid
    p, q = sig(torch.tensor(logit)).item(), sig(torch.tensor(cf_logit)).item()
    # value = [logit + eps > 0] with logistic eps truncated to the observed side.
    if observed == 1:
        expected = 1.0 if cf_logit >= logit else q / p
    else:
        expected = 0.0 if cf_logit <= logit else (q - p) / (1 - p)
    tol = 4 * math.sqrt(max(expected * (1 - expected), 1e-6) / n) + 1e-4
    assert abs(cf_rate - expected) < tol


def test_gumbel_log_prob_and_sample():
    mech = GumbelMaxMechanism(3).double()
    with torch.no_grad():
        mech.root_logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    probs = torch.softmax(mech.root_logits.detach(), -1)
    value = F.one_hot(torch.arange(3), 3).double()
    assert torch.allclose(mech.log_prob(value).exp(), probs)
    draws = mech.sample(n=60000, generator=_gen(0)).mean(0)
    assert torch.allclose(draws, probs, atol=0.01)
    binary = BinaryGumbelMaxMechanism(parents_dim=0).double()
    with torch.no_grad():
        binary.root_logits.fill_(0.8)
    lp = binary.log_prob(torch.tensor([[1.0], [0.0]], dtype=torch.float64)).exp()
    p1 = torch.sigmoid(torch.tensor(0.8, dtype=torch.float64))
    assert torch.allclose(lp, torch.stack([p1, 1 - p1]))
    assert abs(binary.sample(n=60000, generator=_gen(1)).mean().item() - p1.item()) < 0.01


def test_mechanism_errors():
    flow = SplineFlowMechanism(parents_dim=2)
    with pytest.raises(ValueError, match="parents of shape"):
        flow.abduct(torch.zeros(4, 1), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="parents of shape"):
        flow.log_prob(torch.zeros(4, 1), None)
    with pytest.raises(ValueError, match="a value of shape"):
        flow.abduct(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="batch size"):
        flow.predict(torch.zeros(4, 1), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="needs n"):
        SplineFlowMechanism().sample()
    with pytest.raises(ValueError, match="root mechanism"):
        SplineFlowMechanism().abduct(torch.zeros(3, 1), torch.zeros(3, 1))
    categorical = GumbelMaxMechanism(3)
    with pytest.raises(ValueError, match="one-hot"):
        categorical.abduct(torch.tensor([[0.5, 0.5, 0.0]]))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        categorical.abduct(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="Gumbel noise"):
        categorical.predict(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="0/1"):
        BinaryGumbelMaxMechanism().abduct(torch.tensor([[0.3]]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        GumbelMaxMechanism(1)


# ---------------------------------------------------------------------- graph level
@pytest.fixture
def mimic():
    torch.manual_seed(0)
    graph = CausalGraph.from_name("mimic_cxr")
    mechanisms = build_mechanisms(graph)
    with torch.no_grad():  # a disease mechanism that clearly depends on age
        linear = mechanisms["disease"].net[-1]
        linear.weight.normal_(0.0, 3.0)
    return graph, mechanisms


def test_build_mechanisms_default_graph(mimic):
    graph, mechanisms = mimic
    assert list(mechanisms) == ["sex", "race", "age", "disease"]
    assert isinstance(mechanisms["age"], SplineFlowMechanism)
    assert isinstance(mechanisms["sex"], BinaryGumbelMaxMechanism)
    assert isinstance(mechanisms["disease"], BinaryGumbelMaxMechanism)
    assert type(mechanisms["race"]) is GumbelMaxMechanism
    widths = {n: (m.value_dim, m.parents_dim, m.noise_dim) for n, m in mechanisms.items()}
    assert widths == {"sex": (1, 0, 2), "race": (3, 0, 3), "age": (1, 0, 1), "disease": (1, 1, 2)}
    custom = build_mechanisms(graph, flow_kwargs={"bins": 4}, discrete_kwargs={"hidden_channels": (4,)})
    assert custom["disease"].net[0].out_features == 4


def test_abduct_predict_all_round_trip(mimic):
    graph, mechanisms = mimic
    encoded = {k: v.detach() for k, v in sample_all(mechanisms, graph, 500, generator=_gen(0)).items()}
    assert {k: tuple(v.shape) for k, v in encoded.items()} == {
        "sex": (500, 1),
        "race": (500, 3),
        "age": (500, 1),
        "disease": (500, 1),
    }
    noise = abduct_all(mechanisms, graph, encoded, generator=_gen(1))
    rebuilt = predict_all(mechanisms, graph, noise)
    for name in ("sex", "race", "disease"):
        assert torch.equal(rebuilt[name], encoded[name])
    assert torch.allclose(rebuilt["age"], encoded["age"], atol=1e-5)
    log_probs = log_prob_all(mechanisms, graph, encoded)
    assert all(v.shape == (500,) and torch.isfinite(v).all() for v in log_probs.values())


def test_predict_all_do_age(mimic):
    graph, mechanisms = mimic
    encoded = {k: v.detach() for k, v in sample_all(mechanisms, graph, 2000, generator=_gen(0)).items()}
    noise = abduct_all(mechanisms, graph, encoded, generator=_gen(1))
    new_age = torch.full((1, 1), 0.9)
    cf = predict_all(mechanisms, graph, noise, do={"age": new_age}, factual=encoded)
    assert torch.equal(cf["sex"], encoded["sex"]) and torch.equal(cf["race"], encoded["race"])
    assert torch.equal(cf["age"], new_age.expand(2000, 1))
    expected = mechanisms["disease"].predict(noise["disease"], new_age.expand(2000, 1))
    assert torch.equal(cf["disease"], expected)
    assert not torch.equal(cf["disease"], encoded["disease"])  # age really moves disease
    # do(age = factual age) changes nothing.
    same = predict_all(mechanisms, graph, noise, do={"age": encoded["age"]}, factual=encoded)
    assert all(torch.equal(same[k], encoded[k]) for k in encoded)
    # The one-call version agrees in distribution and keeps non-descendants.
    cf2 = counterfactual_all(mechanisms, graph, encoded, do={"age": new_age}, generator=_gen(1))
    assert torch.equal(cf2["sex"], encoded["sex"]) and torch.equal(cf2["race"], encoded["race"])
    assert abs(cf2["disease"].mean().item() - cf["disease"].mean().item()) < 0.05
    # do(sex) leaves disease alone (not a descendant), per-sample masks apply interventions row by row.
    mask = torch.arange(2000) % 2 == 0
    cf3 = predict_all(mechanisms, graph, {}, do={"sex": 1 - encoded["sex"]}, factual=encoded, do_mask={"sex": mask})
    assert torch.equal(cf3["sex"][mask], 1 - encoded["sex"][mask])
    assert torch.equal(cf3["sex"][~mask], encoded["sex"][~mask])
    assert torch.equal(cf3["disease"], encoded["disease"])
    cf4 = predict_all(mechanisms, graph, noise, do={"age": new_age}, factual=encoded, do_mask={"age": mask})
    assert torch.equal(cf4["disease"][mask], expected[mask])
    assert torch.equal(cf4["disease"][~mask], encoded["disease"][~mask])
    # Two per-sample interventions, one on a descendant of the other.
    sick = torch.arange(2000) % 3 == 0
    cf5 = counterfactual_all(
        mechanisms,
        graph,
        encoded,
        do={"age": new_age, "disease": torch.ones(1, 1)},
        do_mask={"age": mask, "disease": sick},
        generator=_gen(1),
    )
    assert (cf5["disease"][sick] == 1).all()
    assert torch.equal(cf5["disease"][~mask & ~sick], encoded["disease"][~mask & ~sick])
    assert torch.equal(cf5["age"][mask], new_age.expand(2000, 1)[mask])
    assert torch.equal(cf5["age"][~mask], encoded["age"][~mask])
    moved = mask & ~sick
    assert torch.equal(cf5["disease"][moved], cf2["disease"][moved])  # same generator, same abducted noise


def test_graph_level_errors(mimic):
    graph, mechanisms = mimic
    encoded = {k: v.detach() for k, v in sample_all(mechanisms, graph, 4, generator=_gen(0)).items()}
    bad = dict(encoded, race=encoded["race"][:, :2])
    with pytest.raises(ValueError, match="'race' must have shape"):
        abduct_all(mechanisms, graph, bad)
    with pytest.raises(ValueError, match="Unknown variable 'height'"):
        predict_all(mechanisms, graph, {}, do={"height": torch.zeros(1, 1)}, factual=encoded)
    with pytest.raises(ValueError, match="Intervention value of 'age'"):
        predict_all(mechanisms, graph, {}, do={"age": torch.zeros(4, 2)}, factual=encoded)
    with pytest.raises(ValueError, match="Noise of 'disease'"):
        predict_all(mechanisms, graph, {}, do={"age": torch.zeros(1, 1)}, factual=encoded)
    wrong = build_mechanisms(
        CausalGraph.from_dict({"age": {"kind": "continuous", "range": [0, 1]}, "disease": {"kind": "binary"}})
    )
    wrong["sex"], wrong["race"] = mechanisms["sex"], mechanisms["race"]
    with pytest.raises(ValueError, match="Mechanism of 'disease'"):
        abduct_all(wrong, graph, encoded)
    with pytest.raises(ValueError, match="No mechanism for attribute"):
        abduct_all({"sex": mechanisms["sex"]}, graph, encoded)
