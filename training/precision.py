"""What --dtype means on a device, decided once: the one place that reads the flag's string."""
from contextlib import nullcontext
from dataclasses import dataclass

import torch

AMP_DTYPES = {'half': torch.float16, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
PARAM_DTYPES = {'float': torch.float32, 'float32': torch.float32,
                'double': torch.float64, 'float64': torch.float64}
NAMES = {**AMP_DTYPES, **PARAM_DTYPES}


def memory_format(channels_last):
    """The memory format of images and conv weights under --channels_last."""
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass(frozen=True)
class Precision:
    """--dtype NAME on a device of type `device_type`, handed to whoever needs it.

    params: the dtype of weights and inputs (float32, or float64 for --dtype double); with autocast
        the weights stay float32 (master weights) and `compute` is the dtype the ops run in.
    compute: the autocast dtype (float16, bfloat16), or None for no autocast.
    channels_last: the memory format of images and conv weights.
    """
    name: str = 'float'
    device_type: str = 'cpu'
    channels_last: bool = False

    @property
    def params(self):
        return PARAM_DTYPES.get(self.name, torch.float32)

    @property
    def compute(self):
        return AMP_DTYPES.get(self.name)

    @property
    def scaled(self):
        """A GradScaler scales the loss: fp16 gradients underflow without it."""
        return self.compute == torch.float16

    @property
    def fused_sgd(self):
        """The fused SGD takes the GradScaler's inf check on the GPU, so the host does not wait for it."""
        return self.device_type == 'cuda' and self.scaled

    def autocast(self):
        """Mixed precision: compute in `compute` under autocast, master weights in float32."""
        return torch.autocast(self.device_type, dtype=self.compute) if self.compute else nullcontext()

    def scaler(self, state=None):
        """A GradScaler where the loss needs one, resumed from a checkpoint's `state`; else None."""
        if not self.scaled:
            return None
        scaler = torch.amp.GradScaler(self.device_type)
        if state:
            scaler.load_state_dict(state)
        return scaler

    def emulated(self):
        """True where autocast would run on a CPU with no native kernels for `compute`: without
        AVX-512 bf16/fp16 (an AVX2-only CPU), oneDNN emulates the low-precision convolutions and a
        step runs several times slower than fp32 (docs/speed.md)."""
        if self.device_type != 'cpu' or self.compute is None:
            return False
        native = {torch.bfloat16: '_is_mkldnn_bf16_supported', torch.float16: '_is_mkldnn_fp16_supported'}
        try:
            return not getattr(torch.ops.mkldnn, native[self.compute])()
        except (AttributeError, RuntimeError):  # the check is private to torch: never fail a run on it
            return False
