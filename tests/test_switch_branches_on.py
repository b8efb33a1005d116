"""``spark_sparse.testing.switch_branches_on``: what the equivalence tests and benchmarks draw, and only that."""
import torch

import spark_sparse as ss
from spark_sparse.testing import SWITCHED_OFF_BELOW, switch_branches_on


def test_only_parameters_that_switch_a_branch_off_are_drawn_and_the_rest_is_untouched():
    encoder = ss.create_encoder("resnet18")
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    drawn = switch_branches_on(encoder)
    expected = [name for name, p in before.items() if float(p.abs().max()) < SWITCHED_OFF_BELOW]
    assert drawn == expected and any(name.endswith("bn2.weight") for name in drawn)   # zero_init_last
    for name, p in encoder.state_dict(keep_vars=False).items():
        if name not in before:          # BatchNorm buffers
            continue
        if name in drawn:
            assert 0.5 <= float(p.min()) and float(p.max()) <= 1.5, name
        else:
            assert torch.equal(p, before[name]), name


def test_the_same_seed_draws_the_same_weights():
    first, second = ss.create_encoder("resnet18"), ss.create_encoder("resnet18")
    second.load_state_dict(first.state_dict())
    switch_branches_on(first, seed=3)
    switch_branches_on(second, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
