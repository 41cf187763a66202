"""Mixed precision: the knapsack solver against brute force, the byte budget against the packed model,
and the scores against a model with a known sensitive layer."""
import itertools
import random

import pytest
import torch

import qcompile
from qcompile import MixedPrecision, QuantConfig, QuantSpec
from qcompile.errors import ConfigError
from qcompile.passes.allocate import solve_knapsack
from tests.conftest import MODELS


def brute_force(costs, losses, budget):
    best = None
    for picks in itertools.product(*(range(len(row)) for row in costs)):
        if sum(costs[i][p] for i, p in enumerate(picks)) <= budget:
            loss = sum(losses[i][p] for i, p in enumerate(picks))
            best = loss if best is None else min(best, loss)
    return best


def random_case(seed):
    rng = random.Random(seed)
    items = rng.randint(1, 6)
    costs = [[rng.choice([0, 7, 12, 30, 45, 64, 100]) * rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
             for _ in range(items)]
    losses = [[rng.random() * 10 for _ in row] for row in costs]
    lowest, highest = sum(min(r) for r in costs), sum(max(r) for r in costs)
    return costs, losses, rng.randint(lowest, highest)


@pytest.mark.parametrize("seed", range(60))
def test_knapsack_matches_brute_force(seed):
    costs, losses, budget = random_case(seed)
    solution = solve_knapsack(costs, losses, budget)
    assert solution.exact
    assert sum(costs[i][p] for i, p in enumerate(solution.choices)) <= budget
    assert sum(losses[i][p] for i, p in enumerate(solution.choices)) == pytest.approx(brute_force(costs, losses, budget))


@pytest.mark.parametrize("seed", range(20))
def test_coarse_knapsack_is_feasible_and_optimal_for_the_tighter_budget(seed):
    costs, losses, budget = random_case(seed)
    solution = solve_knapsack(costs, losses, budget, max_work=8)
    cost = sum(costs[i][p] for i, p in enumerate(solution.choices))
    loss = sum(losses[i][p] for i, p in enumerate(solution.choices))
    assert cost <= budget
    tighter = brute_force(costs, losses, budget - solution.slack)
    if tighter is not None:
        assert loss <= tighter + 1e-9


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(ValueError):
        solve_knapsack([[10, 20], [5]], [[1.0, 0.0], [0.0]], 14)


def sensitive_net():
    """Two identical-looking linears; the first reads its input ten times larger, so its rounding error
    costs 100x more at the output."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loud, self.quiet = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

        def forward(self, x):
            return torch.cat([self.loud(10 * x), self.quiet(x)], dim=-1)
    torch.manual_seed(0)
    return Net().eval(), [torch.randn(32, 64) for _ in range(4)]


@pytest.mark.parametrize("score", ["fisher", "hessian", "output_error"])
def test_sensitive_layer_gets_more_bits(score):
    model, calib = sensitive_net()
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    config = QuantConfig(weight=spec, mixed_precision=MixedPrecision(target_bits=6.25, candidates=(2, 3, 4, 8),
                                                                     score=score))
    qm = qcompile.compile(model, calib, config, progress=False)
    bits = {row.path: row.bits for row in qm.report().layers}
    assert bits["loud"] > bits["quiet"]
    mixed = qm.report().mixed_precision
    scores = {row["path"]: row["candidates"] for row in mixed["layers"]}
    assert scores["loud"][2]["score"] > 10 * scores["quiet"][2]["score"]


@pytest.mark.parametrize("model_name,score", [("llama", "fisher"), ("user_net", "hessian"), ("gpt2", "output_error")])
@pytest.mark.parametrize("target_bits", [3.5, 4.5])
def test_budget_is_met_as_the_packed_bytes_count(model_name, score, target_bits):
    factory, calib = MODELS[model_name]
    overrides = {"stem": QuantSpec(bits=8)} if model_name == "user_net" else {}
    config = QuantConfig(weight=QuantSpec(bits=4, group_size=64 if model_name != "user_net" else -1, symmetric=False),
                         overrides=overrides, method="gptq",
                         mixed_precision=MixedPrecision(target_bits=target_bits, candidates=(2, 3, 4, 8), score=score))
    qm = qcompile.compile(factory(), calib(), config, progress=False)
    params = qm.quant_params()
    used = sum(p.nbytes() for p in params.values())
    elements = sum(p.weight_codes.numel() for p in params.values())
    mixed = qm.report().mixed_precision
    assert used == mixed["used_bytes"] <= mixed["budget_bytes"] == int(target_bits * elements // 8)
    assert mixed["achieved_bits"] == pytest.approx(used * 8 / elements) and mixed["achieved_bits"] <= target_bits
    assert mixed["exact"]
    chosen = {row["weight"]: row["bits"] for row in mixed["layers"]}
    assert {target: p.bits for target, p in params.items()} == chosen
    assert len(set(chosen.values())) > 1
    if overrides:
        assert chosen["stem.weight"] == 8 and next(r for r in mixed["layers"] if r["path"] == "stem")["candidates"] is None
    # the solver's choice is never worse, by its own estimate, than any uniform width that fits
    for row_bits in config.mixed_precision.candidates:
        rows = [r for r in mixed["layers"] if r["candidates"] is not None]
        uniform_bytes = sum(r["candidates"][row_bits]["bytes"] for r in rows) + sum(
            r["nbytes"] for r in mixed["layers"] if r["candidates"] is None)
        if uniform_bytes <= mixed["budget_bytes"]:
            assert sum(r["candidates"][r["bits"]]["score"] for r in rows) <= sum(
                r["candidates"][row_bits]["score"] for r in rows) * (1 + 1e-9)


def test_a_budget_below_the_narrowest_candidate_says_so():
    model, calib = sensitive_net()
    config = QuantConfig(weight=QuantSpec(bits=4, group_size=32, symmetric=False),
                         mixed_precision=MixedPrecision(target_bits=2.5, candidates=(2, 4)))
    with pytest.raises(ConfigError, match=r"below the smallest size.*3\.250 bits per weight"):
        qcompile.compile(model, calib, config, progress=False)
