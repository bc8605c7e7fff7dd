"""On PYTHONPATH in scripts/gpu_check.py's processes (and their children: benchmark.py starts some)
once it has decoded CIFAR-10 into GPU_CHECK_DECODED. torchvision checks CIFAR-10's files against the
originals' md5 sums; the decoded files hold other bytes (the JPEGs were lossy), so files inside that
folder are trusted by where they are instead."""
import importlib.machinery
import importlib.util
import os
import sys

root = os.environ.get('GPU_CHECK_DECODED')
if root:
    try:
        import torchvision.datasets.cifar as cifar_files
    except ImportError:  # not a torch process
        cifar_files = None
    if cifar_files:
        original, inside = cifar_files.check_integrity, os.path.abspath(root) + os.sep
        cifar_files.check_integrity = lambda fpath, md5=None: (
            os.path.exists(fpath) if os.path.abspath(fpath).startswith(inside) else original(fpath, md5))

# Python imports one sitecustomize: run the one this one hides, if there is one
here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.machinery.PathFinder.find_spec(
    'sitecustomize', [p for p in sys.path if os.path.abspath(p or '.') != here])
if spec:
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
