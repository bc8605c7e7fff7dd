"""The machinery of a run, below cifar.py and imagenet.py: the command line and its checks (options,
errors), the run folder and its files (rundir, formats), the lr schedule, the loop (engine) and fit,
data and loaders (data, imagenet_data), devices and precision (parallel, precision, compat), RNG state
and signals, teachers, the distiller, TensorBoard (board), provenance, and the CIFAR-100 benchmark's
networks (cifar_nets). docs/code.md maps them. Nothing here imports an entry point, and this file
imports nothing: install.sh runs `python -m training.compat` before torch is installed."""
