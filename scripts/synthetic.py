"""Made-up data for the tests, the device check and the benchmarks, where no real data set is at hand:
class folders of generated images, and randomly initialised teacher run folders."""
import os

import numpy as np


def smooth_image(rng, size, channel=None, level=255):
    """A (height, width, 3) uint8 image of a smooth random colour field with noise: photograph-like to
    a JPEG decoder, unlike white noise. `channel` bright at `level` makes a class learnable."""
    from PIL import Image
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    if channel is not None:
        small[..., channel] = level
    img = np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR)).astype(np.int16)
    return (img + rng.integers(0, 24, img.shape)).clip(0, 255).astype(np.uint8)


def write_class_folders(root, counts, classes, class_name, file_name, image):
    """root/<split>/<class_name(c)>/<file_name(i)> for each (split, images per class) of `counts`,
    the images drawn by image(c) as (height, width, 3) uint8 arrays, saved as JPEG."""
    from PIL import Image
    for split, n in counts:
        for c in range(classes):
            d = os.path.join(root, split, class_name(c))
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                Image.fromarray(image(c)).save(os.path.join(d, file_name(i)), quality=90)
    return root


def make_image_folder(root, classes, train, val, size=(500, 375), seed=0):
    """An ImageNet-like ImageFolder (train/ and val/, classes named n00000000, ...) of JPEGs of
    `size` = (width, height); class c is bright in channel c % 3."""
    rng = np.random.default_rng(seed)
    return write_class_folders(root, (('train', train), ('val', val)), classes, lambda c: f'n{c:08d}',
                               lambda i: f'{i}.JPEG', lambda c: smooth_image(rng, size, c % 3, 255 - 20 * (c // 3)))


def make_tiny_cifar(root, classes=10, train=16, test=8, seed=0):
    """A learnable class-folder CIFAR of 32x32 JPEGs: class c is bright in channel c % 3 and striped
    every (c // 3 + 2) rows."""
    rng = np.random.default_rng(seed)

    def image(c):
        img = rng.integers(0, 110, (32, 32, 3), dtype=np.uint8)
        img[..., c % 3] += 110
        img[::c // 3 + 2] += 30
        return img
    return write_class_folders(root, (('train', train), ('test', test)), classes, lambda c: f'class{c}',
                               lambda i: f'{i:04d}.jpg', image)


def write_teacher_run(folder, model, depth, width, num_classes, seed=None):
    """A randomly initialised CIFAR run folder (model.pt7 and the first log.txt line a teacher is read
    from): speed, and the plumbing of AT, do not depend on the weights."""
    import torch
    from training.rundir import append_log
    from resnet import cifar_model_params
    if seed is not None:
        torch.manual_seed(seed)
    os.makedirs(folder)
    torch.save({'params': cifar_model_params(model, depth, width, num_classes), 'optimizer': {}, 'epoch': 0},
               os.path.join(folder, 'model.pt7'))
    append_log(os.path.join(folder, 'log.txt'), {'model': model, 'depth': depth, 'width': width})
    return folder
