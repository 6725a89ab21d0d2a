import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from headclip.model.smoothing import gaussian_blur, gaussian_kernel1d


@pytest.mark.parametrize("shape,sigma", [((2, 64, 64), 4.0), ((1, 37, 51), 4.0), ((3, 10, 13), 4.0), ((1, 20, 20), 1.5)])
def test_separable_gaussian_equals_2d_reference(shape, sigma):
    rng = np.random.default_rng(0)
    maps = rng.random(shape).astype(np.float64)
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    for i in range(shape[0]):
        reference = gaussian_filter(maps[i], sigma=sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(ours[i], reference, rtol=0, atol=1e-12)


def test_float32_and_zero_sigma():
    maps = torch.rand(2, 30, 30)
    reference = gaussian_filter(maps[0].double().numpy(), sigma=4, mode="reflect")
    np.testing.assert_allclose(gaussian_blur(maps, 4.0)[0].numpy(), reference, atol=1e-6)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


def test_kernel_is_normalised_with_scipy_radius():
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 2 * 16 + 1
    assert abs(float(kernel.sum()) - 1.0) < 1e-6
