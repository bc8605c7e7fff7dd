"""Gradient-based attention transfer (paper section 3.2): double backprop, checked by finite differences."""
import math

import pytest
import torch

import utils
from conftest import read_log, run_cifar
from resnet import wrn, wrn_params



def tiny_wrn(seed, width=0.25, classes=3):
    torch.manual_seed(seed)
    return {k: v.double() for k, v in wrn_params(10, width, classes).items()}


def test_input_grad_is_the_gradient_of_the_loss():
    params = tiny_wrn(0)
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2])
    j, _, _ = utils.input_grad(wrn, params, x, t, False, create_graph=False)
    i = (1, 2, 3, 4)
    e = torch.zeros_like(x)
    e[i] = 1e-6
    ce = lambda z: torch.nn.functional.cross_entropy(wrn(z, params, False)[0], t).item()  # noqa: E731
    assert j[i].item() == pytest.approx((ce(x + e) - ce(x - e)) / 2e-6, rel=1e-5, abs=1e-9)


def test_grad_at_loss_gradient_matches_finite_differences():
    """d grad_at_loss / d student params, through the double backprop, against central differences."""
    student, teacher = tiny_wrn(1), tiny_wrn(2)
    x, t = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    j_t = utils.input_grad(wrn, teacher, x, t, False, create_graph=False)[0]

    def loss(params):  # train mode: batch statistics, as the student trains
        j_s = utils.input_grad(wrn, params, x, t, True, create_graph=True)[0]
        return utils.grad_at_loss(j_s, j_t)

    w = student['group1.block0.conv0'].requires_grad_()
    (g,) = torch.autograd.grad(loss(student), w)
    assert g.abs().max() > 0
    for idx in [(0, 0, 0, 0), (3, 2, 1, 1), (7, 3, 2, 0)]:
        with torch.no_grad():
            w[idx] += 1e-6
            up = loss(student).item()
            w[idx] -= 2e-6
            down = loss(student).item()
            w[idx] += 1e-6
        assert g[idx].item() == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-10)


def mirror_symmetric(params):
    """Every kernel averaged with its mirror image: a flip-equivariant WRN."""
    return {k: (v + v.flip(-1)) / 2 if v.dim() == 4 else v for k, v in params.items()}


def test_sym_loss_is_zero_for_a_flip_equivariant_network():
    # odd sizes (33 -> 17 -> 9) keep stride-2 sampling symmetric under a mirror
    params = mirror_symmetric(tiny_wrn(3))
    x, t = torch.randn(2, 3, 33, 33, dtype=torch.float64), torch.tensor([1, 0])
    assert utils.sym_loss(wrn, params, x, t, False).item() < 1e-20
    # and clearly not zero for an ordinary one
    assert utils.sym_loss(wrn, tiny_wrn(3), x, t, False).item() > 1e-5  # the element mean is at most 4/3267


def test_grad_at_loss_formula():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    na = a.flatten(1) / a.flatten(1).norm(dim=1, keepdim=True)
    nb = b.flatten(1) / b.flatten(1).norm(dim=1, keepdim=True)
    assert utils.grad_at_loss(a, b).item() == pytest.approx(((na - nb) ** 2).mean().item(), rel=1e-6)
    assert utils.grad_at_loss(a, 5 * a).item() == pytest.approx(0, abs=1e-12)


def test_cifar_with_grad_at_and_symmetry(tiny_data, tmp_path):
    small = ['--depth', 10, '--batch_size', 16, '--nthread', 0, '--dataroot', tiny_data]
    run_cifar([*small, '--epochs', 1, '--save', 'logs/t'], tmp_path)
    run_cifar([*small, '--epochs', 1, '--save', 'logs/g', '--teacher_id', 't', '--beta', 1e3, '--alpha', 0.5,
               '--grad_beta', 10, '--sym_beta', 1], tmp_path)
    r = read_log(tmp_path / 'logs/g')[0]
    assert r['grad_beta'] == 10 and math.isfinite(r['train_loss'])
    assert r['grad_at_loss'][0] > 0 and r['sym_loss'][0] > 0 and len(r['at_losses']) == 3
    p = run_cifar([*small, '--epochs', 1, '--save', 'logs/x', '--grad_beta', 1], tmp_path, check=False)
    assert p.returncode != 0 and 'pass --teacher_id' in p.stderr
    p = run_cifar([*small, '--epochs', 1, '--save', 'logs/x', '--sym_beta', 1, '--dtype', 'bfloat16'], tmp_path,
                  check=False)
    assert p.returncode != 0 and 'full precision' in p.stderr


@pytest.mark.parametrize('grad_beta', [0, 10])
def test_the_mirrored_pass_leaves_the_running_statistics_alone(grad_beta):
    """One --sym_beta step moves the batch-norm running statistics exactly as a step without it: the
    mirrored pass is a second look at the same batch, not a second batch."""
    from training.distill import Distiller
    from training.distill import FunctionalNet
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    stats = {}
    for sym in (0, 1):
        params = tiny_wrn(0)
        utils.set_requires_grad_except_bn_(params)
        student = FunctionalNet(wrn, params)
        teacher = FunctionalNet(wrn, tiny_wrn(1)) if grad_beta else None
        Distiller(student, teacher, grad_beta=grad_beta, sym_beta=sym)(x, t, True)[1]['loss'].backward()
        stats[sym] = {k: v.clone() for k, v in student.params.items() if k.endswith(('running_mean', 'running_var'))}
    assert stats[0] and all(not torch.equal(v, torch.zeros_like(v)) for k, v in stats[0].items() if 'mean' in k)
    assert all(torch.equal(stats[0][k], stats[1][k]) for k in stats[0])
