"""The machinery of a run, below cifar.py and imagenet.py, a module a job: the options and their
schedule (options), the loop and fit (loop), the step's loss (distill), the run folder and its files
(rundir), the device, processes and precision (device), data (data, imagenet_data), teachers, TensorBoard
(board), and how a script stops (errors). docs/code.md maps them. The paper's math (utils.py) and the
networks (resnet.py, cifar_nets.py) import nothing from here."""
