"""The loss of a training step: a student alone, or taught by a teacher through AT, KD, F-ActT and
gradient AT. A Distiller is a small torch.nn.Module returning (logits, dict of losses), so that
DistributedDataParallel can carry the student with any trained adapters; each network in it is a
FunctionalNet, the 2017 function and dict of tensors as a torch.nn.Module."""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.errors import UserError, as_user_error
from utils import AT_PREFIX, at_loss, conv_params, factt_loss, grad_at_loss, input_grad, kd_loss, sym_loss


class Distiller(nn.Module):
    """loss = kd_loss + beta * sum of at_loss over `at_groups` (all by default), the 2017 form of the
    paper's Eq. 2 (at_mode 'code'), or beta/2 * that sum with at_mode 'paper' (Eq. 2 as written);
    at_pool says where maps of different sizes meet (utils.AT_POOLS). With no teacher, cross-entropy
    alone. Where asked, plus factt_beta * sum over groups of factt_loss (the student's group through
    its 1x1 adapter where channels differ), and in training grad_beta/2 * grad_at_loss and
    sym_beta/2 * sym_loss (double backprop).

    student, teacher: modules called as net(inputs, mode) -> (logits, group outputs). `beta` may be
    changed between epochs by a schedule. forward -> (student logits, {'loss': total, and the named
    terms: 'at_loss.G' for each group G of at_groups, 'factt_loss', 'grad_at_loss', 'sym_loss' where
    used}).
    """

    def __init__(self, student, teacher=None, *, beta=0., alpha=0., temperature=4., at_groups=None,
                 at_pool='attention', at_mode='code', factt_beta=0., adapters=None, grad_beta=0., sym_beta=0.):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.beta, self.alpha, self.temperature, self.at_groups = beta, alpha, temperature, at_groups
        self.at_pool, self.at_mode = at_pool, at_mode
        self.factt_beta, self.grad_beta, self.sym_beta = factt_beta, grad_beta, sym_beta
        self.adapters = nn.ParameterDict()
        for k, v in (adapters or {}).items():  # trained with the student: the same tensor objects
            adapters[k] = self.adapters[k] = nn.Parameter(v)

    def forward(self, inputs, targets, mode):
        if mode and (self.grad_beta or self.sym_beta):
            return self.with_input_grads(inputs, targets)
        y_s, g_s = self.student(inputs, mode)
        if self.teacher is None:
            return y_s, {'loss': F.cross_entropy(y_s, targets)}
        with torch.inference_mode():  # once per batch, no graph kept
            y_t, g_t = self.teacher(inputs, False)
        return y_s, self.distill(y_s, g_s, y_t, g_t, targets)

    def distill(self, y_s, g_s, y_t, g_t, targets):
        groups = range(len(g_s)) if self.at_groups is None else self.at_groups
        at_losses = {f'{AT_PREFIX}{i}': at_loss(g_s[i], g_t[i], self.at_pool, self.at_mode) for i in groups}
        # alpha 0 is cross-entropy, also where the teacher has other classes (AT needs none of them)
        kd = kd_loss(y_s, y_t, targets, self.temperature, self.alpha) if self.alpha else F.cross_entropy(y_s, targets)
        weight = self.beta / 2 if self.at_mode == 'paper' else self.beta  # Eq. 2's beta/2
        losses = {'loss': kd + weight * sum(at_losses.values()), **at_losses}
        if self.factt_beta:
            losses['factt_loss'] = sum(
                factt_loss(F.conv2d(s, self.adapters[f'group{i}']) if f'group{i}' in self.adapters else s, t)
                for i, (s, t) in enumerate(zip(g_s, g_t)))
            losses['loss'] = losses['loss'] + self.factt_beta * losses['factt_loss']
        return losses

    def with_input_grads(self, inputs, targets):
        student = lambda x, _, mode: self.student(x, mode)  # noqa: E731 (input_grad's f(x, params, mode))
        j_s, y_s, g_s = input_grad(student, None, inputs, targets, True, create_graph=True)
        losses = {'loss': F.cross_entropy(y_s, targets)}
        if self.teacher is not None:
            if self.grad_beta:  # the teacher's J needs autograd, but no graph beyond it
                teacher = lambda x, _, mode: self.teacher(x, mode)  # noqa: E731
                j_t, y_t, g_t = input_grad(teacher, None, inputs, targets, False, create_graph=False)
                y_t, g_t = y_t.detach(), [g.detach() for g in g_t]
            else:
                with torch.inference_mode():
                    y_t, g_t = self.teacher(inputs, False)
            losses = self.distill(y_s, g_s, y_t, g_t, targets)
            if self.grad_beta:
                losses['grad_at_loss'] = grad_at_loss(j_s, j_t)
                losses['loss'] = losses['loss'] + self.grad_beta / 2 * losses['grad_at_loss']
        if self.sym_beta:
            with spare_running_stats(self.student):
                losses['sym_loss'] = sym_loss(student, None, inputs, targets, True, j=j_s)
            losses['loss'] = losses['loss'] + self.sym_beta / 2 * losses['sym_loss']
        return y_s, losses


@contextmanager
def spare_running_stats(module):
    """Runs a training-mode pass whose batch-norm updates go to throwaway copies. The mirrored pass of
    --sym_beta normalises with batch statistics like any training pass, but it is a second look at the
    same batch: it must not move the running statistics a second time. (The originals are swapped
    out, not restored in place: the double-backprop graph holds them and checks their versions.)"""
    buffers = list(module.named_buffers())
    for name, b in buffers:
        owner, _, leaf = name.rpartition('.')
        setattr(module.get_submodule(owner), leaf, b.clone())
    try:
        yield
    finally:
        for name, b in buffers:
            owner, _, leaf = name.rpartition('.')
            setattr(module.get_submodule(owner), leaf, b)


def group_outputs(f_s, params_s, f_t, params_t, shape):
    """The student's and the teacher's group outputs for a batch of zeros of `shape`."""
    with torch.no_grad():
        return f_s(torch.zeros(shape), params_s, False)[1], f_t(torch.zeros(shape), params_t, False)[1]


def check_at(f_s, params_s, f_t, params_t, shape, pool, groups=None):
    """Where the groups' attention maps cannot meet (utils.at_loss raises ValueError), one line before
    training, not a traceback at its first step."""
    g_s, g_t = group_outputs(f_s, params_s, f_t, params_t, shape)
    with as_user_error(ValueError):
        for i in range(len(g_s)) if groups is None else groups:
            at_loss(g_s[i], g_t[i], pool)


def factt_adapters(f_s, params_s, f_t, params_t, shape):
    """1x1 convs taking each student group to its teacher group's channels, where they differ."""
    g_s, g_t = group_outputs(f_s, params_s, f_t, params_t, shape)
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        if s.shape[-2:] != t.shape[-2:]:
            raise UserError(f'F-ActT: group {i} is {tuple(s.shape[-2:])} in the student and '
                            f'{tuple(t.shape[-2:])} in the teacher; it needs equal spatial sizes')
    return {f'group{i}': conv_params(s.shape[1], t.shape[1], 1)
            for i, (s, t) in enumerate(zip(g_s, g_t)) if s.shape[1] != t.shape[1]}


class FunctionalNet(nn.Module):
    """A functional network f(input, params, mode) and its flat dict of tensors as a torch.nn.Module.

    Trained tensors become Parameters and the others (batch-norm statistics, a frozen teacher)
    buffers. The dict passed in is updated to hold those same tensor objects, so the optimizer,
    checkpoints (with the 2017 names) and the module all see one set of weights.
    """

    def __init__(self, f, params, amp_dtype=None):
        super().__init__()
        self.f, self.names, self.amp_dtype = f, list(params), amp_dtype
        for k in self.names:
            if params[k].requires_grad:
                params[k] = nn.Parameter(params[k])
                self.register_parameter(self.attr(k), params[k])
            else:
                self.register_buffer(self.attr(k), params[k])

    @staticmethod
    def attr(name):
        return name.replace('.', '__')  # module attributes cannot hold dots

    @property
    def params(self):
        """The 2017 dict; in a DataParallel replica, the replica's own copies."""
        return {k: getattr(self, self.attr(k)) for k in self.names}

    def forward(self, x, mode):
        # autocast state is per thread, and DataParallel's replica threads re-enter it without the
        # dtype: each replica enters it here, with the dtype the run asked for
        amp = torch.autocast(x.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with amp:
            return self.f(x, self.params, mode)
