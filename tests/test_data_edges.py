"""The edges of a dataset: class folders matched by name, images of any one size, mixed sizes refused."""
import sys

import numpy as np
import pytest
from PIL import Image

import cifar
import imagenet
from conftest import ROOT
from synthetic import write_teacher_run
from test_bad_input import run_inprocess, sandbox  # noqa: F401 (a fixture)

sys.path.insert(0, str(ROOT / 'scripts'))
import benchmark  # noqa: E402
import visualize  # noqa: E402


def make_folders(root, classes, size=(32, 32), per_class=4, test_classes=None, test_size=None, split='test'):
    """Class folders of random images; size and test_size are (height, width), or a list of them (mixed)."""
    rng = np.random.default_rng(0)
    for name, names, shape in (('train', classes, size), (split, test_classes or classes, test_size or size)):
        for c in names:
            (root / name / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = shape[i % len(shape)] if isinstance(shape, list) else shape
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name / c / f'{i}.png')
    return root


def cifar_opt(data, *extra):
    return cifar.parse_args(['--dataroot', str(data), '--depth', '10', '--batch_size', '4', '--nthread', '0',
                             '--device', 'cpu', *extra])


@pytest.mark.parametrize('loader', ['fast', 'torchvision'])
def test_train_and_test_classes_must_agree_by_name(tmp_path, sandbox, capfd, loader):  # noqa: F811
    data = make_folders(tmp_path / 'd', ['a', 'b', 'c'], test_classes=['a', 'b', 'd'])
    code, err = run_inprocess(cifar.main, ['--dataroot', str(data), '--loader', loader, '--save', 'logs/x'],
                              'cifar.py', capfd)
    assert code == 1 and err == [f"cifar.py: error: --dataroot {data}: class 2 is 'c' in train/ but 'd' in test/; "
                                 f"both need the same class folders"]
    fewer = make_folders(tmp_path / 'f', ['a', 'b', 'c'], test_classes=['a', 'b'])
    code, err = run_inprocess(cifar.main, ['--dataroot', str(fewer), '--save', 'logs/x'], 'cifar.py', capfd)
    assert code == 1 and err == [f"cifar.py: error: --dataroot {fewer}: train/ has a class 'c' that test/ lacks; "
                                 f"both need the same class folders"]


def test_imagenet_train_and_val_classes_must_agree(tmp_path, sandbox, capfd):  # noqa: F811
    data = make_folders(tmp_path / 'd', list('abcde'), test_classes=list('abcdf'), per_class=1, split='val')
    code, err = run_inprocess(imagenet.main, ['--imagenetpath', str(data), '--width', '0.25', '--save', 'logs/x',
                                              '--nthread', '0'], 'imagenet.py', capfd)
    assert code == 1 and err == [f"imagenet.py: error: --imagenetpath {data}: class 4 is 'e' in train/ but 'f' in "
                                 f"val/; both need the same class folders"]


def test_visualize_and_benchmark_check_the_classes_too(tmp_path, sandbox, capfd):  # noqa: F811
    data = make_folders(tmp_path / 'd', ['a', 'b', 'c'], test_classes=['a', 'c', 'd'])
    write_teacher_run(str(tmp_path / 'run'), 'wrn', 10, 1, 3)
    expected = f"--dataroot {data}: class 1 is 'b' in train/ but 'c' in test/; both need the same class folders"
    code, err = run_inprocess(lambda: visualize.main([str(tmp_path / 'run'), '--dataroot', str(data)]), [],
                              'visualize.py', capfd)
    assert code == 1 and err == [f'visualize.py: error: {expected}']
    code, err = run_inprocess(lambda: benchmark.main(['--dataroot', str(data), '--steps', '1', '--warmup', '0',
                                                      '--repeats', '1', '--nthread', '0', '--teacher', '']),
                              [], 'benchmark.py', capfd)
    assert code == 1 and err == [f'benchmark.py: error: {expected}']


@pytest.mark.parametrize('size', [(32, 48), (64, 64)])
@pytest.mark.parametrize('loader', ['fast', 'torchvision'])
def test_any_one_image_size_trains_and_tests_at_that_size(tmp_path, size, loader):
    data = make_folders(tmp_path / 'd', ['a', 'b'], size=size)
    train, test, classes, found = cifar.create_loaders(cifar_opt(data, '--loader', loader), cifar.select_device('cpu', '0', 1))
    assert found == size and len(classes) == 2
    assert tuple(next(iter(train))[0].shape[-2:]) == size and tuple(next(iter(test))[0].shape[-2:]) == size


def test_f_actt_probes_at_the_images_size(tmp_path, sandbox, capfd):  # noqa: F811
    """The adapters are found by running both networks once: at 32x48, not at an assumed 32x32."""
    data = make_folders(tmp_path / 'd', ['a', 'b'], size=(32, 48))
    write_teacher_run(str(tmp_path / 't'), 'wrn', 10, 2, 2)
    code, err = run_inprocess(cifar.main, ['--dataroot', str(data), '--depth', '10', '--teacher_id', str(tmp_path / 't'),
                                           '--factt_beta', '1', '--epochs', '1', '--batch_size', '4', '--nthread', '0',
                                           '--save', 'logs/f', '--no_progress'], 'cifar.py', capfd)
    assert code == 0, err


@pytest.mark.parametrize('loader', ['fast', 'torchvision'])
def test_mixed_or_unequal_sizes_are_one_line(tmp_path, loader):
    mixed = make_folders(tmp_path / 'm', ['a', 'b'], size=[(32, 32), (32, 48)])
    with pytest.raises(cifar.UserError, match=r'images of several sizes \(32x32, 32x48, height x width\)'):
        cifar.create_loaders(cifar_opt(mixed, '--loader', loader), cifar.select_device('cpu', '0', 1))
    unequal = make_folders(tmp_path / 'u', ['a', 'b'], size=(32, 32), test_size=(64, 64))
    with pytest.raises(cifar.UserError, match=r'train images are 32x32 and test images 64x64'):
        cifar.create_loaders(cifar_opt(unequal, '--loader', loader), cifar.select_device('cpu', '0', 1))


def test_visualize_opens_the_runs_own_dataset(tmp_path, sandbox, capfd):  # noqa: F811
    """A CIFAR-100 run is shown on CIFAR-100: offline and with no copy, the one line names CIFAR100."""
    write_teacher_run(str(tmp_path / 'run'), 'wrn', 10, 1, 100)
    log = tmp_path / 'run' / 'log.txt'
    log.write_text(log.read_text().replace('"depth"', '"dataset": "CIFAR100", "depth"'))
    code, err = run_inprocess(lambda: visualize.main([str(tmp_path / 'run'), '--dataroot', str(tmp_path / 'none')]),
                              [], 'visualize.py', capfd)
    assert code == 1 and len(err) == 1 and 'CIFAR100 is not in --dataroot' in err[0]
