import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deat.models import ARCHITECTURES, Normalized, build_model

# Narrow widths keep the file fast; wrn34_10's width is its widen factor k.
SMALL_WIDTH = {"preact_resnet18": 8, "senet18": 16, "vgg19": 8, "wrn34_10": 1, "small_cnn": 8}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # These tensors are tiny: with two threads on two shared cores, oneDNN's thread synchronisation made
    # single forward/backward passes 10-50x slower and erratic; one thread runs the file in ~10 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


def classifier(model: Normalized) -> nn.Linear:
    return [module for module in model.net.modules() if isinstance(module, nn.Linear)][-1]


def test_architectures_lists_every_name():
    assert ARCHITECTURES == ("preact_resnet18", "senet18", "vgg19", "wrn34_10", "small_cnn")


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_have_one_column_per_class(name, num_classes):
    model = build_model(name, num_classes, mean=CIFAR_MEAN, std=CIFAR_STD, width=SMALL_WIDTH[name])
    logits = model(images(2, 3, 32, 32))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_any_number_of_input_channels(name):
    model = build_model(name, 10, in_channels=1, width=SMALL_WIDTH[name])
    assert model(images(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("batch", [1, 5])
def test_small_cnn_takes_28x28_digits(batch):
    model = build_model("small_cnn", 10, in_channels=1, mean=(0.1307,), std=(0.3081,)).eval()
    assert model(images(batch, 1, 28, 28)).shape == (batch, 10)


def test_preact_resnet18_parameter_count():
    # Counted by hand for width w = 64, 3 input channels, 10 classes (convs have no bias, BatchNorm has 2 per channel):
    #   stem conv 3·64·9                                                   =      1,728
    #   stage 1, 2 blocks × (BN 128 + conv 36,864 + BN 128 + conv 36,864)    =    147,968
    #   stage 2, block 1: BN 128 + conv 73,728 + BN 256 + conv 147,456 + 1×1 shortcut 8,192 = 229,760
    #            block 2: BN 256 + conv 147,456 + BN 256 + conv 147,456    =    295,424
    #   stage 3, block 1: BN 256 + 294,912 + BN 512 + 589,824 + 32,768     =    918,272
    #            block 2: BN 512 + 589,824 + BN 512 + 589,824              =  1,180,672
    #   stage 4, block 1: BN 512 + 1,179,648 + BN 1,024 + 2,359,296 + 131,072 = 3,671,552
    #            block 2: BN 1,024 + 2,359,296 + BN 1,024 + 2,359,296      =  4,720,640
    #   final BN 1,024 + linear 512·10 + 10                                =      6,154
    #   total                                                              = 11,172,170
    model = build_model("preact_resnet18", 10)
    assert sum(parameter.numel() for parameter in model.parameters()) == 11_172_170


def test_default_widths():
    # Final feature widths: 8w for the ResNets and VGG (w = 64), 64k for WRN-34-10 (k = 10), 8w hidden units (w = 16).
    expected_features = {"preact_resnet18": 512, "senet18": 512, "vgg19": 512, "wrn34_10": 640, "small_cnn": 128}
    for name, features in expected_features.items():
        assert classifier(build_model(name, 10)).in_features == features, name


def test_width_means_widen_factor_for_wide_resnet():
    assert classifier(build_model("wrn34_10", 10, width=2)).in_features == 64 * 2
    assert classifier(build_model("preact_resnet18", 10, width=16)).in_features == 8 * 16


def test_normalized_applies_per_channel_standardisation():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    x = images(2, 3, 4, 4)
    expected = torch.empty_like(x)
    for channel in range(3):
        expected[:, channel] = (x[:, channel] - mean[channel]) / std[channel]
    torch.testing.assert_close(Normalized(nn.Identity(), mean, std)(x), expected, rtol=0, atol=0)


def test_build_model_feeds_normalised_pixels_to_the_network():
    model = build_model("small_cnn", 10, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    x = images(2, 3, 32, 32)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.net((x - mean) / std), rtol=0, atol=0)


def test_no_statistics_means_identity_normalisation():
    model = build_model("small_cnn", 10, in_channels=1).eval()
    assert model.mean.flatten().tolist() == [0.0] and model.std.flatten().tolist() == [1.0]
    x = images(2, 1, 28, 28)
    torch.testing.assert_close(model(x), model.net(x), rtol=0, atol=0)


def test_normalisation_buffers_travel_with_the_state_dict():
    trained = build_model("small_cnn", 10, mean=CIFAR_MEAN, std=CIFAR_STD)
    state = trained.state_dict()
    assert "mean" in state and "std" in state
    assert {"mean", "std"}.isdisjoint(name for name, _ in trained.named_parameters())  # never trained

    fresh = build_model("small_cnn", 10)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.mean.flatten(), torch.tensor(CIFAR_MEAN))
    torch.testing.assert_close(fresh.std.flatten(), torch.tensor(CIFAR_STD))
    assert fresh.to(torch.float64).mean.dtype == torch.float64


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_gradients_reach_the_input(name):
    model = build_model(name, 10, mean=CIFAR_MEAN, std=CIFAR_STD, width=SMALL_WIDTH[name]).eval()
    x = images(2, 3, 32, 32).requires_grad_(True)
    F.cross_entropy(model(x), torch.tensor([3, 7])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_traces_into_a_single_graph(name):
    # fullgraph=True raises on any graph break (e.g. .item() or a branch on a tensor value);
    # the "eager" backend traces with Dynamo without the slow Inductor compilation.
    model = build_model(name, 10, mean=CIFAR_MEAN, std=CIFAR_STD, width=SMALL_WIDTH[name]).eval()
    x = images(2, 3, 32, 32)
    torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), model(x))


def test_unknown_name_lists_valid_names():
    valid = "preact_resnet18, senet18, vgg19, wrn34_10, small_cnn"
    with pytest.raises(ValueError, match=f"unknown architecture 'resnet50'; valid names: {valid}"):
        build_model("resnet50", 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": (0.5,)}, r"mean needs one value per input channel \(in_channels=3\)"),
        ({"std": (0.2, 0.2, 0.0)}, "std must be positive"),
        ({"width": 0}, "width must be a positive integer"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**{"name": "small_cnn", "num_classes": 10, **kwargs})
