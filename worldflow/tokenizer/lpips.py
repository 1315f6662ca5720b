"""LPIPS perceptual distance (Zhang et al. 2018), loaded only from a local file: nothing ever downloads.

:func:`load_lpips` accepts two kinds of file:

1. A complete LPIPS module, any backbone (VGG, AlexNet, ...), whose ``forward(x, y)`` takes two
   (N, 3, H, W) images in [-1, 1] and returns distances of shape (N,) or (N, 1, 1, 1): either a
   TorchScript archive (``torch.jit.save(torch.jit.script(m), path)``; deprecated by torch but still
   loadable) or a ``torch.export`` archive with suffix ``.pt2`` (``torch.export.save``; export it with
   dynamic batch/size dims, or with exactly the (N, 3, H, W) your training batches have).
2. A state dict (``.safetensors`` or a ``torch.save`` file) in the key layout of the reference ``lpips``
   package with the VGG16 backbone: ``net.slice{1..5}.<i>.{weight,bias}`` (torchvision VGG16 feature
   indices) and ``lin{0..4}.model.{0|1}.weight`` (or ``lins.{0..4}...``). Such a file is produced once,
   on a machine that has the weights, with::

       import lpips, safetensors.torch as st
       st.save_file(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.safetensors")

   It is run by :class:`LPIPSVGG` below, a re-implementation of ``lpips.LPIPS(net="vgg", version="0.1")``
   (scaling layer, VGG16 relu1_2 .. relu5_3, channel-unit-normalised squared feature differences, 1x1
   linear heads, spatial mean, sum over layers).

The returned module is in eval mode with gradients off for its own weights (inputs still get gradients).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from worldflow.errors import InputError

# torchvision VGG16 ``features``: numbers are conv widths, "M" a 2x2 max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # ends after relu1_2, 2_2, 3_3, 4_3, 5_3
_CHANNELS = [64, 128, 256, 512, 512]


def _vgg16_layers() -> list[nn.Module]:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU()]
            c_in = int(v)
    return layers


class LPIPSVGG(nn.Module):
    """LPIPS v0.1 with a VGG16 trunk. forward(x, y): (N, 3, H, W) in [-1, 1] -> (N,) distances."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        layers = _vgg16_layers()
        self.net = nn.Module()
        for k, (a, b) in enumerate(_SLICES):
            sl = nn.Sequential()
            for i in range(a, b):
                sl.add_module(str(i), layers[i])  # keep torchvision indices so state-dict keys match
            self.net.add_module(f"slice{k + 1}", sl)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)

    def features(self, x: Tensor) -> list[Tensor]:
        h = (x - self.shift) / self.scale
        out = []
        for k in range(len(_SLICES)):
            h = getattr(self.net, f"slice{k + 1}")(h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx, fy = self.features(x), self.features(y)
        return sum(lin((a - b).pow(2)).mean((1, 2, 3)) for lin, a, b in zip(self.lins, fx, fy))

    def load_lpips_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load a state dict in the reference ``lpips`` package layout (see module docstring)."""
        mapped: dict[str, Tensor] = {}
        for key, val in sd.items():
            parts = key.split(".")
            if key.startswith("net.slice"):
                mapped[key] = val
            elif parts[0].startswith("lin") and parts[0] != "lins" and key.endswith(".weight"):
                mapped[f"lins.{parts[0][3:]}.weight"] = val  # lin{k}.model.{0|1}.weight
            elif parts[0] == "lins" and key.endswith(".weight"):
                mapped[f"lins.{parts[1]}.weight"] = val
            elif parts[-1] in ("shift", "scale"):
                mapped[parts[-1]] = val.reshape(1, 3, 1, 1)
        missing = [k for k in self.state_dict() if k not in mapped and k not in ("shift", "scale")]
        if missing:
            raise InputError(f"LPIPS weights file lacks {len(missing)} tensors, e.g. {missing[:3]}")
        self.load_state_dict(mapped, strict=False)


def load_lpips(path: str | Path) -> nn.Module:
    """Load a frozen LPIPS module from a local file (TorchScript or lpips-layout state dict).

    Raises FileNotFoundError if the file does not exist (an empty path means "LPIPS off" and must be
    handled by the caller, not passed here).
    """
    p = Path(path).expanduser()
    if not str(path):
        raise InputError("empty LPIPS path: leave lpips_path empty to disable the LPIPS term instead")
    if not p.is_file():
        raise FileNotFoundError(
            f"LPIPS weights not found at '{p}' (tokenizer.lpips_path). Nothing is downloaded at run time: "
            "put a local TorchScript LPIPS module or an lpips-layout VGG state dict there, or set "
            "tokenizer.lpips_path='' to train without the LPIPS term. See worldflow/tokenizer/lpips.py."
        )
    module: nn.Module
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        module = LPIPSVGG()
        module.load_lpips_state_dict(load_file(str(p)))
    elif p.suffix == ".pt2":  # torch.export archive (TorchScript's successor)
        module = torch.export.load(str(p)).module()
    else:
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except RuntimeError:  # not TorchScript: a plain torch.save'd state dict
            module = LPIPSVGG()
            module.load_lpips_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    try:
        module.eval()
    except (NotImplementedError, RuntimeError):  # exported programs refuse mode switches; no dropout/BN
        pass
    for prm in module.parameters():  # (ScriptModule has no requires_grad_)
        prm.requires_grad_(False)
    return module
