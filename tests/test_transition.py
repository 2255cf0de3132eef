"""State Transition model: set equivariance, padding masks, energy distance, config, a tiny fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vcell.errors import VcellError
from vcell.nn.layers import energy_distance, mlp
from vcell.nn.transition import StateTransition, STConfig


def tiny_config(**overrides) -> STConfig:
    values = dict(input_dim=6, pert_dim=3, output_dim=5, width=16, n_layers=2, n_heads=4, dropout=0.0)
    return STConfig.from_dict({**values, **overrides})


def tiny_model(**overrides) -> StateTransition:
    torch.manual_seed(0)
    return StateTransition(tiny_config(**overrides)).eval()


def numpy_energy(x: np.ndarray, y: np.ndarray) -> float:
    """2 E|x-y| - E|x-x'| - E|y-y'| over all pairs (self-pairs included), by direct differences."""

    def mean_dist(a, b):
        return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1).mean()

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


# --- the model on sets --------------------------------------------------------------------------


def test_permutation_equivariance():
    model = tiny_model(relu_output=False)
    basal, pert = torch.randn(2, 7, 6), torch.randn(2, 7, 3)
    perm = torch.randperm(7)
    out = model(basal, pert)
    out_perm = model(basal[:, perm], pert[:, perm])
    torch.testing.assert_close(out_perm, out[:, perm], atol=1e-5, rtol=0)
    # Not trivially equivariant: cells really interact (a cell's output depends on the others).
    other = basal.clone()
    other[:, 1:] += 1.0
    assert not torch.allclose(model(other, pert)[:, 0], out[:, 0], atol=1e-4)


def test_permutation_equivariance_with_mask():
    model = tiny_model(relu_output=False)
    basal, pert = torch.randn(2, 8, 6), torch.randn(2, 3)
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    perm = torch.randperm(8)
    out = model(basal, pert, mask=mask)
    out_perm = model(basal[:, perm], pert, mask=mask[:, perm])
    real = mask[:, perm]
    torch.testing.assert_close(out_perm[real], out[:, perm][real], atol=1e-5, rtol=0)


def test_mask_excludes_padded_cells():
    model = tiny_model(relu_output=False)
    basal, pert = torch.randn(2, 8, 6), torch.randn(2, 8, 3)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 5:] = False
    out = model(basal, pert, mask=mask)
    changed_basal, changed_pert = basal.clone(), pert.clone()
    changed_basal[:, 5:] = 100 * torch.randn(2, 3, 6)
    changed_pert[:, 5:] = 100 * torch.randn(2, 3, 3)
    out2 = model(changed_basal, changed_pert, mask=mask)
    torch.testing.assert_close(out2[:, :5], out[:, :5], atol=1e-5, rtol=0)
    # A padded set equals the same set without the padding.
    torch.testing.assert_close(model(basal[:, :5], pert[:, :5]), out[:, :5], atol=1e-5, rtol=0)
    # Without the mask the changed cells do leak into the real ones.
    assert not torch.allclose(model(changed_basal, changed_pert)[:, :5], model(basal, pert)[:, :5], atol=1e-3)


def test_forward_shapes_relu_and_batch_embedding():
    model = tiny_model(n_batches=3)
    basal = torch.randn(2, 7, 6)
    out = model(basal, torch.randn(2, 3), batch=torch.tensor([0, 2]))
    assert out.shape == (2, 7, 5)
    assert (out >= 0).all() and (out == 0).any()  # ReLU applied, and it actually clips something
    per_cell = model(basal, torch.randn(2, 7, 3), batch=torch.randint(0, 3, (2, 7)))
    assert per_cell.shape == (2, 7, 5)
    # The batch embedding changes the prediction.
    pert = torch.randn(2, 3)
    a = model(basal, pert, batch=torch.tensor([0, 0]))
    b = model(basal, pert, batch=torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    assert (tiny_model(relu_output=False)(basal, pert) < 0).any()
    with pytest.raises(VcellError, match="n_batches"):
        tiny_model()(basal, pert, batch=torch.tensor([0, 1]))
    # Without batches (prediction) a cell gets the mean batch vector, not none: every training cell had one.
    with torch.no_grad():
        unbatched = model(basal, pert)
        model.batch_embedding.weight.copy_(model.batch_embedding.weight.mean(dim=0).expand(3, -1))
        torch.testing.assert_close(model(basal, pert, batch=torch.tensor([1, 2])), unbatched)
        model.batch_embedding.weight.zero_()
        assert not torch.allclose(model(basal, pert), unbatched)


def test_output_has_residual_on_encoded_basal():
    model = tiny_model(relu_output=False)
    basal, pert = torch.randn(2, 4, 6), torch.randn(2, 3)
    with torch.no_grad():
        model.norm.weight.zero_()  # silence the transformer branch: only the residual remains
        torch.testing.assert_close(model(basal, pert), model.decoder(model.basal_encoder(basal)))


def test_pert_broadcast_equals_per_cell():
    model = tiny_model()
    basal, pert = torch.randn(2, 4, 6), torch.randn(2, 3)
    torch.testing.assert_close(model(basal, pert), model(basal, pert[:, None].expand(-1, 4, -1)))


def test_mlp_structure():
    net = mlp(5, 8, 3, n_layers=4, dropout=0.1)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 8), (8, 8), (8, 8), (8, 3)]
    assert isinstance(net[-1], torch.nn.Linear)
    assert sum(isinstance(m, torch.nn.GELU) for m in net) == 3
    assert sum(isinstance(m, torch.nn.Dropout) for m in net) == 3


# --- energy distance ----------------------------------------------------------------------------


def test_energy_distance_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 6, 4)), rng.normal(loc=0.5, size=(3, 9, 4))
    got = energy_distance(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    want = [numpy_energy(x[b], y[b]) for b in range(3)]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert (got > 0.05).all()


def test_energy_distance_masked_matches_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 7, 4)), rng.normal(size=(2, 5, 4)) + 1.0
    x[:, 5:] = 1e3  # padding must be ignored, however far away it is
    y[1, 3:] = -1e3
    x_mask = np.array([[True] * 5 + [False] * 2] * 2)
    y_mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    got = energy_distance(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x_mask), torch.from_numpy(y_mask)
    ).numpy()
    want = [numpy_energy(x[b][x_mask[b]], y[b][y_mask[b]]) for b in range(2)]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_energy_distance_zero_for_identical_and_symmetric():
    torch.manual_seed(0)
    x, y = torch.randn(2, 8, 5, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(energy_distance(x, x), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    # The same set in another order is the same set.
    torch.testing.assert_close(energy_distance(x, x[:, torch.randperm(8)]), torch.zeros(2, dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(energy_distance(x, y), energy_distance(y, x), atol=1e-12, rtol=0)
    assert (energy_distance(x, y) > 0).all()
    # float32 far from the origin stays accurate (centring before the |a|^2 + |b|^2 - 2ab expansion).
    far = energy_distance((x + 1000).float(), (y + 1000).float())
    torch.testing.assert_close(far.double(), energy_distance(x, y), atol=1e-3, rtol=0)


def test_energy_distance_gradient_finite_with_coinciding_points():
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], dim=1).requires_grad_(True)  # cells 0 and 4 coincide
    y = torch.cat([x.detach()[:, :2], torch.randn(1, 3, 3, dtype=torch.float64)], dim=1).requires_grad_(True)
    energy_distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert x.grad.abs().sum() > 0
    # Identical sets: the minimum, gradient finite (zero).
    z = torch.randn(1, 4, 3, requires_grad=True)
    energy_distance(z, z.detach().clone()).sum().backward()
    assert torch.isfinite(z.grad).all()


# --- config, presets, features ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, width, n_layers, n_heads", [("small", 672, 4, 8), ("default", 768, 8, 12), ("large", 1488, 6, 12)]
)
def test_presets(name, width, n_layers, n_heads):
    config = STConfig.preset(name, input_dim=10, pert_dim=4)
    assert (config.width, config.n_layers, config.n_heads, config.ffn_mult) == (width, n_layers, n_heads, 4)
    assert config.output_dim == 10 and config.dropout == 0.1 and config.relu_output
    assert STConfig.preset(name, input_dim=10, pert_dim=4, n_layers=2).n_layers == 2


def test_preset_errors():
    with pytest.raises(VcellError, match="unknown ST preset 'huge'"):
        STConfig.preset("huge", input_dim=10, pert_dim=4)
    with pytest.raises(VcellError, match="missing required field"):
        STConfig.preset("small")
    with pytest.raises(VcellError, match="not divisible"):
        STConfig.preset("small", input_dim=10, pert_dim=4, n_heads=5)
    with pytest.raises(VcellError, match="unknown field"):
        STConfig.from_dict({"input_dim": 3, "pert_dim": 2, "widht": 8})


def test_config_round_trip():
    config = tiny_config(n_batches=4, relu_output=False)
    again = STConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    model, restored = tiny_model(n_batches=4), StateTransition(again)
    restored.load_state_dict(model.state_dict())  # same architecture, same parameter shapes


# --- a tiny fit ---------------------------------------------------------------------------------


def test_training_reduces_energy_loss():
    """Each perturbation shifts the set by its own constant vector; a few Adam steps learn it."""
    torch.manual_seed(0)
    n_perts, genes, set_size = 3, 6, 16
    shifts = 2.0 * torch.randn(n_perts, genes)
    model = StateTransition(tiny_config(input_dim=genes, output_dim=genes, pert_dim=n_perts, width=32, relu_output=False))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def sample(n_sets: int):
        labels = torch.randint(0, n_perts, (n_sets,))
        basal = torch.randn(n_sets, set_size, genes)
        target = torch.randn(n_sets, set_size, genes) + shifts[labels][:, None, :]
        return basal, torch.nn.functional.one_hot(labels, n_perts).float(), target

    held_out = sample(12)
    with torch.no_grad():
        before = model.loss(model(*held_out[:2]), held_out[2]).item()
    model.train()
    for _ in range(40):
        basal, pert, target = sample(8)
        loss = model.loss(model(basal, pert), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        after = model.loss(model(*held_out[:2]), held_out[2]).item()
    assert after < 0.3 * before, (before, after)


def test_residual_prediction_starts_at_the_basal_cells():
    model = tiny_model(output_dim=6)  # same input and output space: residual on by default
    assert model.residual
    basal, pert = torch.rand(2, 5, 6), torch.randn(2, 3)
    torch.testing.assert_close(model(basal, pert), basal)  # zero-initialised decoder: the controls themselves
    torch.nn.init.normal_(model.decoder.weight, std=0.1)
    out = model(basal, pert)
    assert not torch.allclose(out, basal, atol=1e-3)
    direct = torch.relu(model.decoder(model.norm(_backbone(model, basal, pert)) + model.basal_encoder(basal)) + basal)
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=0)
    off = tiny_model(output_dim=6, predict_residual=False)
    assert not off.residual and not torch.allclose(off(basal, pert), basal, atol=1e-3)


def _backbone(model: StateTransition, basal: torch.Tensor, pert: torch.Tensor) -> torch.Tensor:
    h = model.basal_encoder(basal) + model.pert_encoder(pert)[:, None, :]
    for block in model.blocks:
        h = block(h, None)
    return h


def test_weights_that_do_not_fit_their_config_are_one_line_naming_the_parameter(tmp_path):
    """A config.json edited (or copied from another model) beside its weights: one line naming the
    first parameter that differs and both shapes, not torch's multi-line size-mismatch report."""
    from vcell.nn.checkpoint import check_weights

    expected = {"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(4)}
    check_weights(expected, {k: v.clone() for k, v in expected.items()}, tmp_path)
    cases = [
        ({"a.weight": torch.zeros(8, 3), "b.bias": torch.zeros(4)},
         r"parameter 'a.weight' has shape \[8, 3\] in the weights but \[4, 3\] in the model config.json describes;"),
        ({"a.weight": torch.zeros(4, 3)}, r"parameter 'b.bias' \[4\] of the config's model is missing from the weights;"),
        ({**expected, "c.extra": torch.zeros(2)}, r"the weights hold 'c.extra' \[2\], which the config's model has not;"),
        ({"a.weight": torch.zeros(8, 3)}, r"\(and 1 more difference\(s\)\)"),
    ]
    for weights, message in cases:
        with pytest.raises(VcellError, match=message) as info:
            check_weights(expected, weights, tmp_path)
        assert "\n" not in str(info.value) and str(tmp_path / "weights.safetensors") in str(info.value)
