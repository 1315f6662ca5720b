"""worldflow.data.pixels: the one set of pixel-scale conversions (uint8 / [0, 1] / [-1, 1])."""

import numpy as np
import torch

from worldflow.data.pixels import to_signed, to_uint8, to_uint8_numpy, to_unit


def test_round_trip_and_clamping():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3)
    assert torch.equal(to_uint8(to_unit(u8)), u8)
    assert torch.allclose(to_signed(u8)[0, 0, 0], torch.full((3,), -1.0))
    assert torch.allclose(to_signed(u8)[0, -1, -1], torch.full((3,), 1.0))
    x = torch.tensor([-0.5, 0.0, 0.6 / 255, 1.0, 1.7])
    assert to_uint8(x).tolist() == [0, 0, 1, 255, 255]  # clamped, then rounded


def test_numpy_matches_tensor_and_accepts_strided_arrays():
    f = torch.rand(2, 8, 8, 3)
    want = to_uint8(f).numpy()
    assert np.array_equal(to_uint8_numpy(f), want)
    assert np.array_equal(to_uint8_numpy(f.numpy()), want)
    flipped = f.numpy()[:, ::-1]  # negative strides
    assert np.array_equal(to_uint8_numpy(flipped), want[:, ::-1])
