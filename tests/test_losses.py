"""Part I of common.py (advantages, losses, the KL term, aggregation) on tiny tensors.

Every expected value is worked out by hand in the test with `math`, never by calling the code
under test a second time.
"""

import math

import pytest
import torch

import common
from common import (
    ce_loss, distill_token_advantages, group_advantages, kl_penalty, log_ratio, mse_loss,
    ppo_clip_loss, sapo_loss)

D = torch.float64


def t(*values):
    return torch.tensor(values, dtype=D)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def leaf(*values):
    return torch.tensor(values, dtype=D, requires_grad=True)


# ------------------------------------------------------------------------------------------------
# group_advantages
# ------------------------------------------------------------------------------------------------

REWARDS = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]


def test_group_advantages_mean_variant():
    adv = group_advantages(torch.tensor(REWARDS, dtype=D))
    # row 0: mean 0.5; row 1: all equal -> 0; row 2: mean 0.25
    expected = [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-0.25, -0.25, -0.25, 0.75]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=D), rtol=0, atol=1e-15)


def test_group_advantages_std_variant():
    adv = group_advantages(torch.tensor(REWARDS, dtype=D), normalize_std=True)
    # population std (divide by G): row 0: sqrt(4 * 0.25 / 4) = 0.5
    s0 = math.sqrt((0.25 + 0.25 + 0.25 + 0.25) / 4)
    # row 2: deviations -0.25 x3, 0.75 -> sqrt((3 * 0.0625 + 0.5625) / 4) = sqrt(0.1875)
    s2 = math.sqrt((3 * 0.0625 + 0.5625) / 4)
    assert s0 == 0.5 and abs(s2 - 0.4330127018922193) < 1e-15
    expected = [[0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6)],
                [0.0, 0.0, 0.0, 0.0],
                [-0.25 / (s2 + 1e-6), -0.25 / (s2 + 1e-6), -0.25 / (s2 + 1e-6), 0.75 / (s2 + 1e-6)]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=D), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize_std", [False, True])
def test_group_advantages_all_equal_binary_groups_are_exactly_zero(normalize_std):
    rewards = torch.tensor([[0.0] * 16, [1.0] * 16, [1.0] * 8 + [0.0] * 8], dtype=torch.float32)
    adv = group_advantages(rewards, normalize_std)
    assert torch.equal(adv[:2], torch.zeros(2, 16))
    assert (adv[2, :8] > 0).all() and (adv[2, 8:] < 0).all()


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7])
def test_group_advantages_all_equal_float_rewards_give_zero_with_std(value):
    """The docstring: "A group whose rewards are all equal gets A = 0: it carries no signal".

    float32 rounding makes mean(r) differ from r by ~1e-8; dividing that by std (~1e-8) + 1e-6
    must not turn it into an advantage of order 1e-2.
    """
    rewards = torch.full((2, 16), value, dtype=torch.float32)
    assert group_advantages(rewards).abs().max().item() < 1e-6          # mean variant: ulp noise only
    adv = group_advantages(rewards, normalize_std=True)
    assert adv.abs().max().item() < 1e-6, f"noise amplified to {adv.abs().max().item():.3g}"


# ------------------------------------------------------------------------------------------------
# log_ratio
# ------------------------------------------------------------------------------------------------

def test_log_ratio_value_and_clamp():
    logp = leaf(0.5, 30.0, -30.0, 1000.0)
    old = t(0.2, 0.0, 0.0, 0.0)
    out = log_ratio(logp, old)
    torch.testing.assert_close(out, t(0.3, 20.0, -20.0, 20.0), rtol=0, atol=1e-15)
    assert common.LOG_RATIO_CLAMP == 20.0
    out.sum().backward()
    # inside the clamp d/dlogp = 1, outside it 0
    assert logp.grad.tolist() == [1.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# ppo_clip_loss (eps_low = 0.2, eps_high = 0.3: clip range [0.8, 1.3])
# ------------------------------------------------------------------------------------------------

EPS_LOW, EPS_HIGH = 0.2, 0.3


def _ppo(lr, adv):
    logp = leaf(lr)
    loss, clipped = ppo_clip_loss(logp, t(0.0), t(adv), EPS_LOW, EPS_HIGH)
    loss.sum().backward()
    return loss.item(), bool(clipped.item()), logp.grad.item()


def test_ppo_unclipped():
    rho, a = math.exp(0.1), 0.5                      # rho = e^0.1 = 1.105 in [0.8, 1.3]
    loss, clipped, grad = _ppo(0.1, a)
    assert loss == pytest.approx(-min(rho * a, min(max(rho, 0.8), 1.3) * a), abs=1e-15)
    assert loss == pytest.approx(-rho * a, abs=1e-15)
    assert not clipped
    assert grad == pytest.approx(-a * rho, abs=1e-15)  # d(-rho A)/dlogp = -rho A


def test_ppo_clipped_high_positive_advantage():
    rho, a = math.exp(0.5), 1.0                      # 1.6487 > 1.3
    loss, clipped, grad = _ppo(0.5, a)
    assert loss == pytest.approx(-min(rho * a, 1.3 * a), abs=1e-15)
    assert loss == pytest.approx(-1.3, abs=1e-15)
    assert clipped
    assert grad == 0.0


def test_ppo_low_ratio_positive_advantage_is_not_clipped():
    rho, a = math.exp(-0.5), 1.0                     # 0.6065 < 0.8, but min picks rho * A
    loss, clipped, grad = _ppo(-0.5, a)
    assert loss == pytest.approx(-min(rho * a, 0.8 * a), abs=1e-15)
    assert loss == pytest.approx(-rho, abs=1e-15)
    assert not clipped
    assert grad == pytest.approx(-rho, abs=1e-15)


def test_ppo_clipped_low_negative_advantage():
    rho, a = math.exp(-0.5), -1.0                    # rho A = -0.6065, clip(rho) A = -0.8
    loss, clipped, grad = _ppo(-0.5, a)
    assert loss == pytest.approx(-min(rho * a, 0.8 * a), abs=1e-15)
    assert loss == pytest.approx(0.8, abs=1e-15)
    assert clipped
    assert grad == 0.0


def test_ppo_high_ratio_negative_advantage_is_not_clipped():
    rho, a = math.exp(0.5), -1.0                     # rho A = -1.6487 < clip A = -1.3
    loss, clipped, grad = _ppo(0.5, a)
    assert loss == pytest.approx(-min(rho * a, 1.3 * a), abs=1e-15)
    assert loss == pytest.approx(rho, abs=1e-15)
    assert not clipped
    assert grad == pytest.approx(rho, abs=1e-15)     # -A rho


def test_ppo_batched_mask_and_broadcast_advantage():
    # [2, 3] tokens, advantage [2, 1] broadcast over tokens
    lrs = [[0.1, 0.5, -0.5], [0.1, 0.5, -0.5]]
    logp = torch.tensor(lrs, dtype=D)
    adv = t(1.0, -1.0)[:, None]
    loss, clipped = ppo_clip_loss(logp, torch.zeros(2, 3, dtype=D), adv, EPS_LOW, EPS_HIGH)
    assert loss.shape == (2, 3) and clipped.shape == (2, 3) and clipped.dtype == torch.bool
    # row 0 (A = 1): clipped only where rho > 1.3;  row 1 (A = -1): clipped only where rho < 0.8
    assert clipped.tolist() == [[False, True, False], [False, False, True]]
    e = math.exp
    expected = [[-e(0.1), -1.3, -e(-0.5)], [e(0.1), e(0.5), 0.8]]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D), rtol=0, atol=1e-15)


def test_ppo_zero_log_ratio_gives_policy_gradient():
    logp = leaf(-1.2, -0.3)
    loss, clipped = ppo_clip_loss(logp, logp.detach(), t(0.7, -0.4), EPS_LOW, EPS_HIGH)
    loss.sum().backward()
    assert not clipped.any()
    torch.testing.assert_close(logp.grad, t(-0.7, 0.4), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# sapo_loss
# ------------------------------------------------------------------------------------------------

def test_sapo_value_default_taus():
    rho = math.exp(0.1)
    logp = t(0.1, 0.1)
    loss = sapo_loss(logp, t(0.0, 0.0), t(0.5, -0.5))
    exp_pos = -(4 / 1.0) * sigmoid(1.0 * (rho - 1)) * 0.5          # tau_pos = 1.0 for A > 0
    exp_neg = -(4 / 1.05) * sigmoid(1.05 * (rho - 1)) * (-0.5)     # tau_neg = 1.05 for A < 0
    torch.testing.assert_close(loss, t(exp_pos, exp_neg), rtol=0, atol=1e-14)


def test_sapo_tau_pos_vs_tau_neg_are_chosen_by_sign_of_advantage():
    rho = math.exp(0.3)
    loss = sapo_loss(t(0.3, 0.3), t(0.0, 0.0), t(2.0, -2.0), tau_pos=2.0, tau_neg=3.0)
    exp_pos = -(4 / 2.0) * sigmoid(2.0 * (rho - 1)) * 2.0
    exp_neg = -(4 / 3.0) * sigmoid(3.0 * (rho - 1)) * (-2.0)
    torch.testing.assert_close(loss, t(exp_pos, exp_neg), rtol=0, atol=1e-14)
    # swapping the taus changes the result (so the selection is really tested)
    swapped = sapo_loss(t(0.3, 0.3), t(0.0, 0.0), t(2.0, -2.0), tau_pos=3.0, tau_neg=2.0)
    assert (swapped - loss).abs().min() > 1e-3


@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (2.0, 0.5)])
def test_sapo_gradient_at_ratio_one_is_policy_gradient(tau_pos, tau_neg):
    logp = leaf(-0.7, -2.0, -0.1)
    adv = t(0.8, -1.3, 0.25)
    loss = sapo_loss(logp, logp.detach(), adv, tau_pos, tau_neg)
    loss.sum().backward()
    # d/dlogp [-(4/tau) sigmoid(tau (rho - 1)) A] at rho = 1 = -(4/tau) * (1/4) * tau * A = -A
    torch.testing.assert_close(logp.grad, -adv, rtol=0, atol=1e-14)


def test_sapo_gate_decays_far_from_ratio_one():
    # at rho = e^3 the gate's slope is far below its value at rho = 1
    logp = leaf(3.0)
    sapo_loss(logp, t(0.0), t(1.0)).sum().backward()
    rho = math.exp(3.0)
    s = sigmoid(rho - 1)
    expected = -4 * s * (1 - s) * rho  # -(4/tau) * tau * s(1-s) * rho * A, tau = A = 1
    assert logp.grad.item() == pytest.approx(expected, rel=1e-10)
    assert abs(logp.grad.item()) < 0.01


# ------------------------------------------------------------------------------------------------
# ce_loss, mse_loss
# ------------------------------------------------------------------------------------------------

def test_ce_loss_value_and_gradient():
    logp = leaf(-0.5, -2.0, -0.1)
    adv = t(1.0, -0.5, 0.0)
    loss = ce_loss(logp, adv)
    torch.testing.assert_close(loss, t(-1.0 * -0.5, 0.5 * -2.0, 0.0), rtol=0, atol=1e-15)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, t(-1.0, 0.5, 0.0), rtol=0, atol=1e-15)


def test_mse_loss_ignores_padded_positions():
    logp = torch.tensor([[-1.0, -2.0, 7.0, 9.0],
                         [-0.5, -0.5, -0.5, -0.5]], dtype=D, requires_grad=True)
    old = torch.tensor([[-1.5, -2.5, -40.0, 3.0],
                        [-1.0, -1.0, -1.0, -1.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=D)
    seq_adv = t(0.3, -0.2)
    loss = mse_loss(logp, old, mask, seq_adv, beta=0.1)
    # row 0: sum of the real log-ratios 0.5 + 0.5 = 1.0 -> (0.1 * 1.0 - 0.3)^2 = 0.04
    # row 1: 4 * 0.5 = 2.0                              -> (0.1 * 2.0 + 0.2)^2 = 0.16
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, t((0.1 * 1.0 - 0.3) ** 2, (0.1 * 2.0 + 0.2) ** 2), rtol=0, atol=1e-14)
    loss.sum().backward()
    # d/dlogp_t = 2 (beta S - A) beta * mask_t
    g0, g1 = 2 * (0.1 - 0.3) * 0.1, 2 * (0.2 + 0.2) * 0.1
    expected = torch.tensor([[g0, g0, 0.0, 0.0], [g1, g1, g1, g1]], dtype=D)
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-14)


def test_mse_loss_clamps_each_log_ratio():
    logp = torch.tensor([[50.0, 0.1]], dtype=D)
    old = torch.zeros(1, 2, dtype=D)
    loss = mse_loss(logp, old, torch.ones(1, 2, dtype=D), t(0.0), beta=0.1)
    # log-ratio 50 is clamped to 20: (0.1 * (20 + 0.1))^2
    assert loss.item() == pytest.approx((0.1 * 20.1) ** 2, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# distill_token_advantages
# ------------------------------------------------------------------------------------------------

def test_distill_token_advantages_clip():
    delta = torch.tensor([[-3.0, -1.0, 0.5, 2.5], [10.0, -10.0, 2.0, -2.0]], dtype=D)
    adv = distill_token_advantages(delta, clip_c=2.0)
    expected = torch.tensor([[-2.0, -1.0, 0.5, 2.0], [2.0, -2.0, 2.0, -2.0]], dtype=D)
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)
    adv1 = distill_token_advantages(delta, clip_c=1.0)
    assert adv1.abs().max().item() == 1.0


def test_distill_token_advantages_plus_alpha_seq_adv():
    delta = torch.tensor([[-3.0, -1.0, 0.5, 2.5], [10.0, -10.0, 2.0, -2.0]], dtype=D)
    seq_adv = t(1.0, -0.4)
    adv = distill_token_advantages(delta, clip_c=2.0, alpha=0.5, seq_adv=seq_adv)
    # clip first, then add alpha * A_seq per row: row 0 +0.5, row 1 -0.2
    expected = torch.tensor([[-2.0 + 0.5, -1.0 + 0.5, 0.5 + 0.5, 2.0 + 0.5],
                             [2.0 - 0.2, -2.0 - 0.2, 2.0 - 0.2, -2.0 - 0.2]], dtype=D)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-15)
    # alpha = 0 ignores seq_adv
    no_alpha = distill_token_advantages(delta, clip_c=2.0, alpha=0.0, seq_adv=seq_adv)
    assert no_alpha.abs().max().item() == 2.0


# ------------------------------------------------------------------------------------------------
# kl_penalty: tokens come from D, sampled by pi_0, not from the policy
# ------------------------------------------------------------------------------------------------

def expected_gradient(term, theta, base_logits):
    """sum_y pi_0(y) grad_theta term(log pi_theta(y), log pi_0(y)): the exact expectation of a per-token
    term's gradient over tokens drawn from pi_0, in float64."""
    theta = theta.detach().clone().requires_grad_(True)
    logp, base_logp = torch.log_softmax(theta, -1), torch.log_softmax(base_logits, -1)
    (base_logp.exp() * term(logp, base_logp)).sum().backward()
    return theta.grad


def exact_kl_gradient(theta, base_logits):
    theta = theta.detach().clone().requires_grad_(True)
    logp, base_logp = torch.log_softmax(theta, -1), torch.log_softmax(base_logits, -1)
    (logp.exp() * (logp - base_logp)).sum().backward()
    return theta.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_penalty_expected_gradient_over_base_tokens_is_the_kl_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    base_logits = torch.randn(5, generator=g, dtype=D)
    theta = base_logits + torch.randn(5, generator=g, dtype=D) * 0.8  # the policy has drifted
    exact = exact_kl_gradient(theta, base_logits)
    ours = expected_gradient(kl_penalty, theta, base_logits)
    torch.testing.assert_close(ours, exact, rtol=0, atol=1e-12)
    # the k2 term (log rho)^2 / 2 is unbiased only for tokens drawn from the policy: on pi_0's tokens it
    # follows another divergence (cosine ~0.6 with the true gradient in the issue that found this)
    k2 = expected_gradient(lambda lp, bp: 0.5 * (lp - bp) ** 2, theta, base_logits)
    assert (k2 - exact).abs().max() > 1e-2


def test_kl_penalty_value_is_an_unbiased_nonnegative_estimate():
    g = torch.Generator().manual_seed(3)
    base_logp = torch.log_softmax(torch.randn(7, generator=g, dtype=D), -1)
    logp = torch.log_softmax(torch.randn(7, generator=g, dtype=D), -1)
    values = kl_penalty(logp, base_logp)
    assert (values >= 0).all()
    kl = (logp.exp() * (logp - base_logp)).sum()
    assert (base_logp.exp() * values).sum().item() == pytest.approx(kl.item(), abs=1e-12)  # E_pi0[value] = KL
    # by hand for one token: rho log rho - rho + 1
    rho = math.exp(0.3)
    torch.testing.assert_close(kl_penalty(t(-1.0), t(-1.3)), t(rho * 0.3 - rho + 1), rtol=0, atol=1e-15)
    assert kl_penalty(t(-0.7), t(-0.7)).item() == 0.0


def test_kl_penalty_large_log_ratio_is_finite():
    logp = leaf(1000.0, -1000.0)
    pen = kl_penalty(logp, t(0.0, 0.0))
    pen.sum().backward()
    assert torch.isfinite(pen).all() and torch.isfinite(logp.grad).all()
    assert pen[0].item() == pytest.approx(math.exp(20) * 19 + 1, rel=1e-12)  # log rho clamped to 20
