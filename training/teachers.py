"""Teachers from disk: a finished CIFAR run folder (2017 runs too), or an ImageNet ResNet export
(.pth, .hkl, or torchvision's weights folded on the fly)."""
import contextlib
import io
import os

import torch

from resnet import (CIFAR_MODELS, cifar_model_head, cifar_model_name, cifar_model_params, expected_export_shapes,
                    fold_torchvision, folded_resnet, wrn_depth_to_blocks)
from training.rundir import finished, load_checkpoint, read_json_stats, safe_load, student_params
from training.errors import UserError, as_user_error
from utils import check_params


def resolve_run_folder(run_id):
    for folder in (os.path.join('logs', run_id), run_id):
        if os.path.isdir(folder):
            return folder
    raise UserError(f'--teacher_id {run_id!r}: no run folder logs/{run_id} or {run_id}')


def load_teacher_run(run_id, num_classes=None):
    """A CIFAR run folder (a name under logs/, or a path) as (f, params, info). The model, depth and
    width come from its first log line, as in 2017; a distilled run gives its student.
    num_classes None takes the run's own class count."""
    folder = resolve_run_folder(run_id)
    for name in ('log.txt', 'model.pt7'):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f'teacher run folder {folder} has no {name}')
    stats = read_json_stats(os.path.join(folder, 'log.txt'))
    if not stats:
        raise UserError(f'teacher {folder}/log.txt has no json_stats line')
    info = stats[0]
    model = info.get('model', 'wrn')  # 2017 logs name no model: WRN
    try:
        depth, width = int(info.get('depth', 16)), float(info['width'])
        if model == 'wrn':
            wrn_depth_to_blocks(depth)
        elif model not in CIFAR_MODELS:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise UserError(f'teacher {folder}/log.txt does not give a valid model, depth and width') from None
    params = student_params(load_checkpoint(os.path.join(folder, 'model.pt7'))['params'])
    head = cifar_model_head(model)
    if head not in params:
        raise UserError(f'teacher {folder}/model.pt7: missing tensor {head!r}')
    run_classes = params[head].shape[0]
    if num_classes is not None and run_classes != num_classes:
        raise UserError(f'teacher {folder} was trained on {run_classes} classes, this dataset has {num_classes}: '
                        f'KD (--alpha) and --grad_beta compare class scores; AT alone (--beta) would do')
    with torch.device('meta'):
        expected = cifar_model_params(model, depth, width, run_classes)
    with as_user_error(ValueError):
        check_params(params, expected, f'teacher {folder}/model.pt7')
    return CIFAR_MODELS[model], {k: params[k].float() for k in expected}, dict(
        name=cifar_model_name(model, depth, width), folder=folder, num_classes=run_classes, model=model,
        dataset=info.get('dataset', 'CIFAR10'), **data_settings(info),
        # how far the teacher trained, and whether that was its whole schedule (rundir.finished)
        epoch=stats[-1].get('epoch'), epochs=stats[-1].get('epochs'), finished=finished(folder) is not None)


def teacher_record(info):
    """The teacher's trained and planned epochs, as the student's log.txt and run.json keep them."""
    return dict(teacher_epoch=info['epoch'], teacher_epochs=info['epochs'])


def data_settings(record):
    """What a run's inputs were, from its log record: normalisation (2017 logs name none: theirs),
    image size and the digest of its class names (where the record gives them)."""
    return dict(normalize=record.get('normalize', '2017'), image_size=record.get('image_size'),
                class_digest=record.get('class_digest'))


def check_teacher_data(info, student, compare_classes):
    """A teacher must see inputs made as its own were: the same normalisation and image size, and,
    where class scores are compared (KD, gradient AT), the same class names in the same order.
    `student`: data_settings of the student's run."""
    what = f'teacher {info["folder"]}'
    if info['normalize'] != student['normalize']:
        raise UserError(f'{what} was trained on --normalize {info["normalize"]} inputs, the student\'s are '
                        f'--normalize {student["normalize"]}: the teacher would see inputs it never saw')
    if info['image_size'] and list(info['image_size']) != list(student['image_size']):
        raise UserError(f'{what} was trained on {"x".join(map(str, info["image_size"]))} images, the student\'s '
                        f'are {"x".join(map(str, student["image_size"]))} (height x width)')
    if compare_classes and info['class_digest'] and info['class_digest'] != student['class_digest']:
        raise UserError(f'{what} was trained on other class folders (names or order) than the student\'s: '
                        f'KD (--alpha) and --grad_beta compare class scores')


def load_teacher_export(path):
    """A ResNet teacher export as (f, params), f(inputs, params) -> (logits, [g0, g1, g2, g3]).

    path: a .pth/.pt file (torch, loaded with weights_only=True), a .hkl file
    (hickle), or torchvision:NAME[:WEIGHTS] to fold torchvision's weights (the
    pretrained download, or a local state_dict file).
    """
    if path.startswith('torchvision:'):
        params = fold_torchvision(torchvision_state_dict(path))
    elif path.endswith('.hkl'):
        params = read_hkl(path)
    else:
        params = read_pth(path)
    params = {k: torch.as_tensor(v).float() for k, v in params.items()}
    try:
        expected = expected_export_shapes(params)
    except ValueError as e:
        raise UserError(f'teacher {path}: {e}') from None
    with as_user_error(ValueError):
        check_params(params, expected, f'teacher {path}')
    return folded_resnet, params


def read_pth(path):
    data = safe_load(path, 'teacher file')
    if isinstance(data, dict) and isinstance(data.get('params'), dict):
        data = data['params']  # a model.pt7-style file
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise UserError(f'teacher {path} is not a flat dict of tensors')
    return data


def read_hkl(path):
    import hickle
    if not os.path.isfile(path):
        raise UserError(f'no such teacher file: {path}')
    try:
        data = hickle.load(path)
    except Exception as e:
        raise UserError(f'cannot read teacher file {path} as hickle ({type(e).__name__})') from None
    if not isinstance(data, dict):
        raise UserError(f'teacher {path} is not a dict of arrays')
    return data


def torchvision_state_dict(spec):
    """torchvision:NAME (pretrained download) or torchvision:NAME:FILE (a local state_dict)."""
    import torchvision
    _, name, *file = spec.split(':', 2)
    if name not in ('resnet18', 'resnet34'):
        raise UserError(f'{spec}: NAME must be resnet18 or resnet34 (basic-block ResNets)')
    if file:
        return read_pth(file[0])
    print(f'downloading torchvision {name} weights', flush=True)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's own lines, noise if it fails
            model = torchvision.models.get_model(name, weights='DEFAULT')
    except Exception as e:
        raise UserError(f'{spec}: cannot download torchvision weights ({type(e).__name__}); offline, '
                        f'pass torchvision:{name}:/path/to/{name}-weights.pth') from None
    return model.state_dict()
