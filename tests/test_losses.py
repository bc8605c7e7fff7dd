"""Losses against the paper's formulas in the 2017 code's form, written out by hand in numpy."""
import math

import numpy as np
import pytest
import torch

import utils
from training.loop import Trainer
from training.options import Schedule


def hand_at(x):
    x = x.numpy().astype(np.float64)
    n, c, h, w = x.shape
    out = np.zeros((n, h * w))
    for i in range(n):
        m = np.zeros(h * w)
        for j in range(h * w):
            m[j] = sum(x[i, k].reshape(-1)[j] ** 2 for k in range(c)) / c
        out[i] = m / max(math.sqrt((m ** 2).sum()), 1e-12)
    return out


def hand_kd(y, t, labels, T, alpha):
    y, t = y.numpy().astype(np.float64), t.numpy().astype(np.float64)
    n, k = y.shape
    kl, ce = 0.0, 0.0
    for i in range(n):
        ys, ts = y[i] / T, t[i] / T
        log_p = ys - math.log(sum(math.exp(v) for v in ys))
        q = [math.exp(v) / sum(math.exp(u) for u in ts) for v in ts]
        kl += sum(q[j] * (math.log(q[j]) - log_p[j]) for j in range(k))
        ce += -(y[i][labels[i]] - math.log(sum(math.exp(v) for v in y[i])))
    return alpha * T * T * kl / n + (1 - alpha) * ce / n


def test_at_is_normalised_channel_mean_of_squares():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6)
    a = utils.at(x)
    assert a.shape == (3, 24)
    np.testing.assert_allclose(a.numpy(), hand_at(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.norm(dim=1).numpy(), 1, rtol=1e-6)


def test_at_loss_is_mean_squared_map_difference():
    torch.manual_seed(1)
    s, t = torch.randn(4, 8, 5, 5), torch.randn(4, 16, 5, 5)  # channel counts may differ
    expected = ((hand_at(s) - hand_at(t)) ** 2).mean()
    assert utils.at_loss(s, t).item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert utils.at_loss(s, s).item() == 0
    # the map ignores channel scale and sign, so a rescaled copy matches exactly
    assert utils.at_loss(s, -3 * s).item() == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize('alpha,T', [(0.9, 4.0), (0.0, 4.0), (1.0, 2.0), (0.5, 1.0)])
def test_kd_loss_matches_formula(alpha, T):
    torch.manual_seed(2)
    y, t = torch.randn(6, 10) * 3, torch.randn(6, 10) * 3
    labels = torch.randint(0, 10, (6,))
    got = utils.kd_loss(y, t, labels, T, alpha).item()
    assert got == pytest.approx(hand_kd(y, t, labels, T, alpha), rel=1e-6, abs=1e-6)


def test_kd_divides_kl_by_batch_not_batch_times_classes():
    # the 2018 fix: equal logits give 0; known KL for a 2-class case
    y = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4), p = (1/2, 1/2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert utils.kd_loss(y, t, torch.tensor([0]), 1.0, 1.0).item() == pytest.approx(kl, rel=1e-6)
    y2, t2 = y.repeat(5, 1), t.repeat(5, 1)
    assert utils.kd_loss(y2, t2, torch.zeros(5, dtype=torch.long), 1.0, 1.0).item() == pytest.approx(kl, rel=1e-6)


def test_alpha_zero_is_cross_entropy():
    y, t = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 1])
    ce = torch.nn.functional.cross_entropy(y, labels)
    assert utils.kd_loss(y, t, labels, 4, 0).item() == pytest.approx(ce.item(), rel=1e-7)


def test_at_loss_pools_whole_multiples_and_refuses_the_rest():
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 16, 16)
    # by hand: the teacher's mean-of-squares map, 2x2 average-pooled, then normalised
    m = t.pow(2).mean(1).reshape(2, 8, 2, 8, 2).mean((2, 4)).flatten(1)
    expected = ((hand_at(s) - (m / m.norm(dim=1, keepdim=True)).numpy()) ** 2).mean()
    assert utils.at_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert utils.at_loss(t, s).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="whole multiples"):
        utils.at_loss(s, torch.randn(2, 4, 12, 12))


def hand_factt(s, t):
    a, b = (x.numpy().reshape(len(x), -1).astype(np.float64) for x in (s, t))
    a /= np.sqrt((a ** 2).sum(1, keepdims=True))
    b /= np.sqrt((b ** 2).sum(1, keepdims=True))
    return ((a - b) ** 2).mean()


def test_factt_loss_is_mean_squared_difference_of_normalised_tensors():
    torch.manual_seed(4)
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert utils.factt_loss(s, t).item() == pytest.approx(hand_factt(s, t), rel=1e-6)


def test_grad_at_loss_compares_input_gradients_in_direction_not_scale():
    """Gradient AT on J = dCE/dx of a linear net, J written out by hand: softmax(y) - onehot, times W."""
    torch.manual_seed(5)
    w_s, w_t = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    x, targets = torch.randn(3, 3, 2, 2, dtype=torch.float64), torch.tensor([0, 3, 1])

    def net(w):
        return lambda x, params, mode: (x.flatten(1) @ w.T, [])

    def hand_j(w):
        y = x.flatten(1) @ w.T
        p = torch.softmax(y, 1) - torch.nn.functional.one_hot(targets, 4)
        return (p @ w / len(x)).reshape(x.shape)
    j_s, j_t = (utils.input_grad(net(w), None, x, targets, True, False)[0] for w in (w_s, w_t))
    assert utils.grad_at_loss(j_s, j_t).item() == pytest.approx(hand_factt(hand_j(w_s), hand_j(w_t)), rel=1e-9)
    assert utils.grad_at_loss(j_s, 7 * j_t).item() == pytest.approx(utils.grad_at_loss(j_s, j_t).item(), rel=1e-9)


def schedule(**o):
    return Schedule(dict(dict(lr=0.1, lr_decay_ratio=0.2, epochs=200, epoch_step='[60,120,160]', beta=1000), **o))


def test_beta_schedules():
    s = schedule(beta_decay='step')
    assert [s.beta(e) for e in (1, 59, 60, 119, 120, 160, 200)] == pytest.approx([1000, 1000, 200, 200, 40, 8, 8])
    linear = schedule(beta_decay='linear', epochs=4, epoch_step='[]')
    assert [linear.beta(e) for e in (1, 2, 3, 4)] == [1000, 750, 500, 250]
    assert schedule(beta_decay='none').beta(150) == 1000


def test_step_beta_drops_exactly_when_the_lr_drops():
    """The loop's optimizer, read at every epoch, against the β the run sets: a repeated --epoch_step
    entry (2 listed twice) drops both once."""
    w = torch.zeros(3, 2, requires_grad=True)
    s = schedule(epochs=6, epoch_step='[2,2,4]', beta_decay='step', lr_decay_ratio=0.2)
    betas, lrs = [], []

    def model(inputs, targets, mode):
        y = inputs @ w
        return y, {'loss': torch.nn.functional.cross_entropy(y, targets)}
    make = lambda lr: torch.optim.SGD([w], lr, momentum=0.9)  # noqa: E731
    Trainer(model, make, torch.device('cpu'), epochs=6, schedule=s, progress=False,
            on_epoch_start=lambda e: betas.append(s.beta(e)),
            on_epoch_end=lambda stats, opt: lrs.append(opt.param_groups[0]['lr'])
            ).train([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], None, make(0.1))
    # multiplied step by step, as an optimizer's lr is (0.1 * 0.2 * 0.2 is not 0.004 in floats)
    expected = [0.1, 0.1 * 0.2, 0.1 * 0.2, 0.1 * 0.2 * 0.2, 0.1 * 0.2 * 0.2, 0.1 * 0.2 * 0.2]
    assert lrs == expected and [s.lr(e) for e in range(1, 7)] == expected
    assert betas == pytest.approx([1000, 200, 200, 40, 40, 40])


def hand_adaptive_pool(x, out_h, out_w):
    """Adaptive average pooling written out: output cell i of n over a side of N averages the inputs
    floor(i*N/n) .. ceil((i+1)*N/n) - 1 (cells overlap where n does not divide N)."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, out_h, out_w))
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean((2, 3))
    return out


@pytest.mark.parametrize('s_size,t_size', [((7, 7), (4, 4)), ((4, 4), (7, 7)), ((16, 16), (8, 8)), ((5, 9), (3, 4))])
def test_at_loss_features_pools_the_larger_feature_map_then_takes_its_map(s_size, t_size):
    """--at_pool features (RepDistiller's AT.py): the larger feature map is average-pooled to the smaller
    size, channel by channel, and only then squared, averaged over channels and normalised; any sizes."""
    torch.manual_seed(5)
    s, t = torch.randn(3, 4, *s_size, dtype=torch.float64), torch.randn(3, 6, *t_size, dtype=torch.float64)
    size = tuple(min(a, b) for a, b in zip(s_size, t_size))
    pooled = [torch.from_numpy(hand_adaptive_pool(x.numpy(), *size)) for x in (s, t)]
    expected = ((hand_at(pooled[0]) - hand_at(pooled[1])) ** 2).mean()
    assert utils.at_loss(s, t, 'features').item() == pytest.approx(expected, rel=1e-10)
    if all(max(a, b) % min(a, b) == 0 for a, b in zip(s_size, t_size)):  # 2017's rule pools the map instead
        assert utils.at_loss(s, t).item() != pytest.approx(expected, rel=1e-3)
    else:
        with pytest.raises(ValueError, match="whole multiples"):
            utils.at_loss(s, t)


def test_hand_adaptive_pool_bins():
    # 7 -> 4: rows 0-1, 1-3, 3-5, 5-6
    x = np.arange(7, dtype=np.float64).reshape(1, 1, 7, 1)
    assert hand_adaptive_pool(x, 4, 1).ravel().tolist() == [0.5, 2.0, 4.0, 5.5]


def test_at_loss_paper_is_the_batch_mean_of_the_2_norm_of_summed_maps():
    """Eq. 2 as written: per sample, || Q_s/||Q_s|| - Q_t/||Q_t|| ||_2 with Q = vec(sum_c x_c^2), not
    squared, then the batch mean; the code's form is the mean of the squares over batch and positions."""
    torch.manual_seed(6)
    s, t = torch.randn(4, 3, 5, 6, dtype=torch.float64), torch.randn(4, 8, 5, 6, dtype=torch.float64)
    a, b = (x.numpy() for x in (s, t))
    per_sample = []
    for i in range(4):
        q_s = sum(a[i, k] ** 2 for k in range(3)).ravel()
        q_t = sum(b[i, k] ** 2 for k in range(8)).ravel()
        d = q_s / math.sqrt((q_s ** 2).sum()) - q_t / math.sqrt((q_t ** 2).sum())
        per_sample.append(math.sqrt((d ** 2).sum()))
    assert utils.at_loss(s, t, mode='paper').item() == pytest.approx(sum(per_sample) / 4, rel=1e-10)
    assert utils.at_loss(s, t).item() == pytest.approx(sum(p ** 2 for p in per_sample) / (4 * 30), rel=1e-10)
    # maps of different sizes meet as in code mode: 2017's pooled attention map, or pooled features
    big = torch.randn(4, 2, 10, 12, dtype=torch.float64)
    m = big.pow(2).sum(1).reshape(4, 5, 2, 6, 2).mean((2, 4)).flatten(1)
    q = s.pow(2).sum(1).flatten(1)
    expected = (q / q.norm(dim=1, keepdim=True) - m / m.norm(dim=1, keepdim=True)).norm(dim=1).mean()
    assert utils.at_loss(s, big, mode='paper').item() == pytest.approx(expected.item(), rel=1e-10)


class Fixed(torch.nn.Module):
    """A network stand-in returning given logits and group outputs."""

    def __init__(self, y, groups):
        super().__init__()
        self.y, self.groups = y, groups

    def forward(self, x, mode):
        return self.y, self.groups


@pytest.mark.parametrize('mode,weight', [('code', 1.0), ('paper', 0.5)])
def test_distiller_weighs_paper_mode_terms_by_half_beta(mode, weight):
    from training.distill import Distiller
    torch.manual_seed(7)
    g_s = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]
    g_t = [torch.randn(2, 5, 8, 8), torch.randn(2, 5, 2, 2)]
    y_s, y_t, labels = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([1, 3])
    d = Distiller(Fixed(y_s, g_s), Fixed(y_t, g_t), beta=1000., at_pool='features', at_mode=mode)
    _, losses = d(torch.zeros(2), labels, True)
    # by hand: group 1's 4x4 student maps pooled to the teacher's 2x2 (features), then each mode's form
    pairs = [(g_s[0], g_t[0]), (torch.from_numpy(hand_adaptive_pool(g_s[1].numpy(), 2, 2)).float(), g_t[1])]
    diffs = [hand_at(s) - hand_at(t) for s, t in pairs]
    terms = [(d ** 2).mean() if mode == 'code' else np.sqrt((d ** 2).sum(1)).mean() for d in diffs]
    assert [losses['at_loss.0'].item(), losses['at_loss.1'].item()] == pytest.approx(terms, rel=1e-5)
    expected = hand_kd(y_s, y_t, labels, 4, 0) + weight * 1000 * sum(terms)
    assert losses['loss'].item() == pytest.approx(expected, rel=1e-5)
