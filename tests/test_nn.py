"""Conditioner networks: the convolutional ones run in channels-last layout without changing a value."""

import pytest
import torch
from torch import nn

from pushforward.nn import ConvNet, ResNet


def _nchw_reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same network evaluated layer by layer on contiguous NCHW tensors."""
    if isinstance(net, ConvNet):
        h = net.conv2(torch.relu(net.conv1(x.contiguous()).contiguous()).contiguous())
        return net.conv3(torch.relu(h).contiguous())
    h = net.stem(x.contiguous())
    for block in net.blocks:
        h = h + block.net(h.contiguous())
    return net.head(torch.relu(h).contiguous())


@pytest.mark.parametrize("make", [lambda: ConvNet(2, 4, hidden_channels=16),
                                  lambda: ResNet(2, 4, hidden_channels=16, blocks=2)],
                         ids=["convnet", "resnet"])
def test_conv_conditioners_run_channels_last_with_the_same_values(make):
    torch.manual_seed(0)
    net = make().double()
    for p in net.parameters():  # the last layer starts at zero: give it values so the check sees them
        nn.init.normal_(p, std=0.3)
    seen = []
    first = net.conv1 if isinstance(net, ConvNet) else net.stem
    first.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)[:, :2]  # a channel split: a non-contiguous view
    out = net(x)
    assert seen == [True]
    torch.testing.assert_close(out, _nchw_reference(net, x), rtol=1e-12, atol=1e-12)
    # an unbatched image (C, H, W) has no channels-last layout and is passed through unchanged
    torch.testing.assert_close(net(x[0]), out[0], rtol=1e-12, atol=1e-12)
