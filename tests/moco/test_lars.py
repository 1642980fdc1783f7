"""LARS against a hand computation, and the param groups that exempt biases and norm params."""

import numpy as np
import torch
from torch import nn

from moco.lars import LARS, lars_param_groups

LR, WD, MOM, ETA = 0.5, 0.1, 0.9, 0.001


def test_two_steps_for_a_weight_and_a_bias_match_the_hand_computation() -> None:
    w0 = np.array([[1.0, -2.0], [0.5, 3.0]])
    b0 = np.array([0.2, -0.4])
    grads = [
        (np.array([[0.3, 0.1], [-0.2, 0.4]]), np.array([1.0, -2.0])),
        (np.array([[-0.1, 0.2], [0.0, 0.5]]), np.array([0.5, 0.5])),
    ]
    w = nn.Parameter(torch.tensor(w0))
    b = nn.Parameter(torch.tensor(b0))
    opt = LARS(lars_param_groups([w, b]), lr=LR, weight_decay=WD, momentum=MOM)

    mu_w, mu_b, w_ref, b_ref = np.zeros(2 * 2).reshape(2, 2), np.zeros(2), w0.copy(), b0.copy()
    for gw, gb in grads:
        w.grad, b.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
        # weight: decay, then scale by eta * |w| / |d| (Frobenius norms)
        d = gw + WD * w_ref
        d = d * (ETA * np.sqrt((w_ref**2).sum()) / np.sqrt((d**2).sum()))
        mu_w = MOM * mu_w + d
        w_ref = w_ref - LR * mu_w
        # bias: plain SGD with momentum, no decay, no scaling
        mu_b = MOM * mu_b + gb
        b_ref = b_ref - LR * mu_b
        np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=1e-12)
        np.testing.assert_allclose(b.detach().numpy(), b_ref, rtol=1e-12)


def test_a_zero_weight_takes_an_unscaled_step() -> None:
    w = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = LARS([w], lr=LR, weight_decay=WD, momentum=MOM)
    w.grad = torch.ones(2, 3, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 3), -LR, dtype=torch.float64))


def test_param_groups_exempt_biases_and_norm_parameters() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4))
    adapted, exempt = lars_param_groups(net.parameters())
    assert [p.shape for p in adapted["params"]] == [(4, 3, 3, 3)]
    assert len(exempt["params"]) == 5  # conv bias, BN weight/bias, LN weight/bias
    assert exempt["weight_decay"] == 0.0 and exempt["lars"] is False
    assert "weight_decay" not in adapted  # takes the optimiser's
