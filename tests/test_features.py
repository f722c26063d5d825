"""The feature-capture helper on nnU-Net's U-Nets: bottleneck and last decoder features of the same forward."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_protokd.training.features import FeatureCapture


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


def test_hooks_fire_inside_a_compiled_3d_network_on_every_step():
    """torch.compile (forced on CPU) keeps the forward hooks: on every training step the captured bottleneck and
    decoder features, a loss of them and the gradients equal those of an eager twin; one graph, no re-tracing."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = plain_unet(deep_supervision=True)
    compiled_network = plain_unet(deep_supervision=True)
    compiled_network.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_network)
    eager_capture, compiled_capture = FeatureCapture(eager), FeatureCapture(compiled)
    for step in range(3):
        x = torch.randn(2, 1, 8, 16, 16)
        results = []
        for network, capture in ((eager, eager_capture), (compiled, compiled_capture)):
            network.zero_grad()
            with capture.recording() as features:
                output = network(x)
            loss = output[0].square().mean() + features["decoder"].mean() + features["bottleneck"].square().mean()
            loss.backward()
            results.append((features, loss, parameter_gradients(network)))
        (eager_features, eager_loss, eager_grads), (features, loss, grads) = results
        assert set(features) == {"bottleneck", "decoder"}, step
        for name in features:
            torch.testing.assert_close(features[name], eager_features[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-6)
        for g, reference in zip(grads, eager_grads):
            torch.testing.assert_close(g, reference, rtol=1e-3, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def parameter_gradients(network):
    # the lower-resolution deep-supervision heads get no gradient from this loss
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in network.parameters()]


def test_keeps_only_the_features_it_is_asked_for():
    """A teacher keeps what its student's losses read and nothing more: under no_grad a kept feature map
    outlives the forward that would have freed it."""
    network = plain_unet().eval()
    with FeatureCapture(network, ("bottleneck",)) as capture, capture.recording() as features, torch.no_grad():
        network(torch.randn(1, 1, 8, 16, 16))
    assert set(features) == {"bottleneck"} and not network.decoder.stages[-1]._forward_hooks
    with pytest.raises(ValueError, match="not \\['logits'\\]"):
        FeatureCapture(network, ("bottleneck", "logits"))
