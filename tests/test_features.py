"""The feature-capture helper on nnU-Net's U-Nets: bottleneck and last decoder features of the same forward."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_protokd.features import FeatureCapture


def plain_unet(deep_supervision=True):
    return PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 4, (2, 2), conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=deep_supervision)


def residual_unet(deep_supervision=True):
    return ResidualEncoderUNet(2, 3, (8, 16, 32), torch.nn.Conv2d, 3, (1, 2, 2), (1, 2, 2), 3, (1, 1),
                               conv_bias=True, norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU,
                               deep_supervision=deep_supervision)


@pytest.mark.parametrize("build, input_shape", [(plain_unet, (2, 1, 8, 16, 16)), (residual_unet, (2, 2, 16, 16))])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_captures_the_features_of_the_forward_that_gave_the_logits(build, input_shape, deep_supervision):
    network = build(deep_supervision).eval()
    x = torch.randn(input_shape)
    with FeatureCapture(network) as capture:
        with capture.recording() as features:
            output = network(x)
    logits = output[0] if deep_supervision else output
    # the last decoder features are what the 1x1 segmentation head turns into the full-resolution logits
    assert features["decoder"].shape == (2, 8, *input_shape[2:])
    torch.testing.assert_close(network.decoder.seg_layers[-1](features["decoder"]), logits)
    assert features["bottleneck"].shape[:2] == (2, 32)
    assert features["bottleneck"].shape[2:] == tuple(s // 4 for s in input_shape[2:])


def test_records_only_inside_recording_and_hooks_are_removed():
    network = plain_unet()
    capture = FeatureCapture(network)
    network(torch.randn(1, 1, 8, 16, 16))  # outside recording(): nothing is kept
    with capture.recording() as features:
        pass
    assert features == {} and capture._store is None
    capture.remove()
    assert not network.encoder.stages[-1]._forward_hooks and not network.decoder.stages[-1]._forward_hooks
    with capture.recording() as features:
        network(torch.randn(1, 1, 8, 16, 16))
    assert features == {}


def test_student_gradients_flow_through_captured_features():
    network = plain_unet()
    capture = FeatureCapture(network)
    with capture.recording() as features:
        network(torch.randn(1, 1, 8, 16, 16))
    features["decoder"].square().mean().backward()
    assert network.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0


def test_other_networks_get_a_clear_error():
    with pytest.raises(TypeError, match="expected a dynamic_network_architectures U-Net"):
        FeatureCapture(torch.nn.Conv3d(1, 1, 1))
