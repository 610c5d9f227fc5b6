"""Per-sample gradients of the SAC convs (Opacus grad samplers) against a brute-force loop in
float64, for every adaptation: per-slice 2D, summed depth taps, ordinary 3D, transposed."""

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

import core.model.sac_grad_sample  # noqa: F401  (registers the grad samplers)
from core.model.sac import SACConv3d, SACConvTranspose3d, SpatialState

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


class Chain(nn.Module):
    """conv(s) applied in sequence from a fixed input state (the state is not a tensor)."""

    def __init__(self, layers: list[nn.Module], state: SpatialState) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        for layer in self.layers:
            x, state = layer(x, state)
        return x


CASES = {
    # name: (layers, state, input (D, H, W))
    "3x3x3-pending": (lambda: [SACConv3d(2, 3, 3, padding=1)], SpatialState(2), (3, 6, 5)),
    "3x3x3-isotropic": (lambda: [SACConv3d(2, 3, 3, padding=1)], SpatialState(0), (3, 6, 5)),
    "3x3x3-stride2-pending": (
        lambda: [SACConv3d(2, 3, 3, stride=2, padding=1)],
        SpatialState(1),
        (2, 8, 6),
    ),
    "3x3x3-stride2-isotropic": (
        lambda: [SACConv3d(2, 3, 3, stride=2, padding=1)],
        SpatialState(0),
        (4, 8, 6),
    ),
    "patch4-summed-taps": (lambda: [SACConv3d(2, 3, 4, stride=4)], SpatialState(1), (2, 8, 8)),
    "patch4-2d": (lambda: [SACConv3d(2, 3, 4, stride=4)], SpatialState(5), (1, 8, 8)),
    "transposed-summed-taps": (
        lambda: [SACConvTranspose3d(2, 3, 2)],
        SpatialState(1, 1),  # remained 0: depth is not upsampled, the two taps are summed
        (3, 4, 5),
    ),
    "transposed-3d": (lambda: [SACConvTranspose3d(2, 3, 2)], SpatialState(0, 2), (3, 4, 5)),
    "transposed-2d": (lambda: [SACConvTranspose3d(2, 3, 2)], SpatialState(5, 4), (1, 4, 5)),
    "down-then-up": (
        lambda: [SACConv3d(2, 3, 3, stride=2, padding=1), SACConvTranspose3d(3, 2, 2)],
        SpatialState(1),
        (2, 8, 6),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_sample_gradients_match_a_brute_force_loop(case):
    torch.manual_seed(0)
    make, state, spatial = CASES[case]
    model = Chain(make(), state).double()
    x = torch.randn(3, 2, *spatial, dtype=torch.float64)
    target = torch.randn_like(model(x))
    params = dict(model.named_parameters())

    expected = {name: [] for name in params}
    for i in range(x.shape[0]):
        model.zero_grad()
        ((model(x[i : i + 1]) - target[i : i + 1]) ** 2).sum().backward()
        for name, p in params.items():
            expected[name].append(p.grad.detach().clone())

    model.zero_grad()
    private = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    ((private(x) - target) ** 2).sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(
            p.grad_sample, torch.stack(expected[name]), rtol=1e-10, atol=1e-10, msg=name
        )
    private._close()
