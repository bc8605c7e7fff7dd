"""The options are one typed object (training/options.py): each script's dataclass builds its command
line, is what log.txt and model.pt7 hold, and is read back, typed, where a resume compares it."""
import re
from dataclasses import FrozenInstanceError, fields

import pytest
import torch

import cifar
import imagenet
from conftest import ROOT
from training import board, imagenet_data, options
from training.errors import UserError

SCRIPTS = [(cifar, cifar.CifarOptions, ['--dataroot', 'x']),
           (imagenet, imagenet.ImagenetOptions, ['--imagenetpath', 'x'])]
GIVEN = ['--lr', '1', '--width', '2', '--batch_size', '3', '--seed', '5', '--temperature', '7', '--epoch_step', '[1]',
         '--compile', '--tensorboard', '0']


@pytest.mark.parametrize('module,cls,base', SCRIPTS, ids=['cifar', 'imagenet'])
def test_parsed_options_are_the_scripts_typed_object(module, cls, base):
    opt = module.parse_args(base + GIVEN)
    assert type(opt) is cls
    assert (type(opt.lr), type(opt.width), type(opt.batch_size), type(opt.seed), type(opt.temperature)) == \
        (float, float, int, int, float)
    assert (opt.lr, opt.width, opt.batch_size, opt.seed, opt.epoch_step, opt.compile) == (1.0, 2.0, 3, 5, '[1]', True)


@pytest.mark.parametrize('module,cls,base', SCRIPTS, ids=['cifar', 'imagenet'])
def test_a_record_reads_back_as_the_same_options(module, cls, base):
    opt = module.parse_args(base + GIVEN)
    assert cls.from_record(opt.record(), 'here') == opt
    assert cls.from_record({}, 'here') == cls()  # an older record: every option at its default


@pytest.mark.parametrize('name,value,kind', [('batch_size', '16', 'int'), ('batch_size', 1.5, 'int'),
                                             ('lr', 'abc', 'float'), ('lr', None, 'float'),
                                             ('compile', 1, 'bool'), ('seed', True, 'int')])
def test_a_record_value_of_the_wrong_type_is_one_line(name, value, kind):
    with pytest.raises(UserError) as e:
        cifar.CifarOptions.from_record({'depth': 10, name: value}, '--resume x/model.pt7')
    assert str(e.value) == f'--resume x/model.pt7: its option {name} is {value!r}, not of type {kind}'


def test_an_int_where_a_float_is_declared_and_none_where_optional_are_read():
    opt = cifar.CifarOptions.from_record({'lr': 1, 'width': 2, 'init': None, 'at_sum_replicas': None}, 'here')
    assert (opt.lr, opt.width, opt.init, opt.at_sum_replicas) == (1, 2, None, None)


def test_a_flag_both_scripts_take_alike_is_declared_once():
    """A flag with the same type, default, choices and help in both parsers is one entry of
    SHARED_FLAGS, not two declarations that can drift apart."""
    parsers = [{a.dest: a for a in m.build_parser()._actions} for m in (cifar, imagenet)]
    alike = {name for name in parsers[0].keys() & parsers[1].keys() if name != 'help' and all(
        getattr(parsers[0][name], k) == getattr(parsers[1][name], k) for k in ('type', 'default', 'choices', 'help'))}
    assert alike - set(options.SHARED_FLAGS) == set()


def test_reliability_page_lists_the_options_that_may_change():
    text = ' '.join(open(ROOT / 'docs/reliability.md').read().split())
    listed = text[text.index('Options that may change'):text.index('Every other flag')]
    documented = set(re.findall(r'`--(\w+)`', listed))
    assert documented == cifar.CifarOptions.may_change() | imagenet.ImagenetOptions.may_change()


@pytest.mark.parametrize('module,cls,base', SCRIPTS, ids=['cifar', 'imagenet'])
def test_after_parsing_only_settle_decides_options(module, cls, base, tmp_path, monkeypatch):
    """Parsed options are frozen; settle alone decides the flags left open (None, auto) and the derived
    fields, which log.txt records as decided."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'model.pt7').touch()
    opt = module.parse_args(base + ['--resume', 'auto', '--save', 'run'])
    with pytest.raises(FrozenInstanceError):
        opt.lr = 1.0
    settled = cifar.settle(opt, torch.device('cpu'), 'x') if module is cifar else imagenet.settle(opt, 'x')
    changed = {f.name: getattr(settled, f.name) for f in fields(cls) if getattr(opt, f.name) != getattr(settled, f.name)}
    tensorboard = int(board.writer_class() is not None)
    assert changed == (dict(init='2017', channels_last=1, tensorboard=tensorboard, resume='run/model.pt7', at_weight=0)
                       if module is cifar else
                       dict(nthread=imagenet_data.default_workers(), tensorboard=tensorboard, resume='run/model.pt7',
                            at_group_list=[0, 1, 2, 3], at_weight=0))


def test_dtype_help_names_every_dtype_it_takes():
    from training.device import NAMES
    words = set(re.findall(r'\w+', options.SHARED_FLAGS['dtype']['help']))
    assert set(NAMES) <= words, set(NAMES) - words
