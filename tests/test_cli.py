"""Flags as in 2017 (bad input: test_bad_input.py)."""
import cifar

FLAGS_2017_DEFAULTS = {  # the 2017 cifar.py's flags and defaults
    'depth': 16, 'width': 1, 'dataset': 'CIFAR10', 'dataroot': '.', 'dtype': 'float', 'nthread': 4,
    'teacher_id': '', 'batch_size': 128, 'lr': 0.1, 'epochs': 200, 'weight_decay': 0.0005,
    'epoch_step': '[60,120,160]', 'lr_decay_ratio': 0.2, 'resume': '', 'randomcrop_pad': 4,
    'temperature': 4, 'alpha': 0, 'beta': 0, 'cuda': False, 'save': '', 'ngpu': 1, 'gpu_id': '0',
}
FLAGS_2017_TYPES = {'depth': int, 'width': float, 'nthread': int, 'batch_size': int, 'lr': float,
                   'epochs': int, 'weight_decay': float, 'lr_decay_ratio': float, 'randomcrop_pad': float,
                   'temperature': float, 'alpha': float, 'beta': float, 'ngpu': int}


def test_defaults_match_2017():
    opt = vars(cifar.parse_args([]))
    for k, v in FLAGS_2017_DEFAULTS.items():
        assert opt[k] == v and type(opt[k]) is type(v), k
    assert opt['seed'] == 0 and opt['device'] == ''


def test_types_match_2017():
    actions = {a.dest: a for a in cifar.build_parser()._actions}
    for k, t in FLAGS_2017_TYPES.items():
        assert actions[k].type is t, k
    assert cifar.parse_args(['--width', '2']).width == 2.0
