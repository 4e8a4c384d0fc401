import pytest
import torch
from torch import nn

from fastcnc import MaskedConv2d, MaskedLinear
from fastcnc.models import MODELS, build_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Reference parameter counts of the standard architectures (published / torchvision numbers), which pin down the
# block structure, widths, shortcuts and heads.
@pytest.mark.parametrize(("name", "num_classes", "stem", "expected"), [
    pytest.param("resnet18", 10, "cifar", 11_173_962, id="resnet18-cifar10"),  # kuangliu/pytorch-cifar
    pytest.param("resnet34", 1000, "imagenet", 21_797_672, id="resnet34-imagenet"),  # torchvision resnet34
    pytest.param("resnet50", 1000, "imagenet", 25_557_032, id="resnet50-imagenet"),  # torchvision resnet50
    pytest.param("wrn-28-10", 10, "cifar", 36_479_194, id="wrn28-10-cifar10"),  # Zagoruyko & Komodakis
    # kuangliu/pytorch-cifar VGG16 has 14,728,266 with conv biases; ours has none before batch norm (-4,224)
    pytest.param("vgg16", 10, "cifar", 14_728_266 - 4_224, id="vgg16bn-cifar10"),
])
def test_parameter_counts_match_the_reference_architectures(name, num_classes, stem, expected):
    model = build_model(name, num_classes, 3, stem)
    assert n_params(model) == expected


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("stem", "size"), [("cifar", 8), ("cifar", 13), ("imagenet", 16)])
def test_forward_backward_small_inputs(name, stem, size):
    model = build_model(name, 7, in_channels=1, stem=stem, width=4)
    x = torch.rand(3, 1, size, size)
    out = model(x)
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_conv_and_linear_is_masked(name):
    model = build_model(name, 10, 3, "cifar", width=4)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs and all(isinstance(m, (MaskedConv2d, MaskedLinear)) for m in convs)


def test_masked_weights_do_not_reach_the_output():
    torch.manual_seed(1)
    model = build_model("resnet18", 10, 3, "cifar", width=4).eval()
    x = torch.rand(2, 3, 8, 8)
    conv = model.stages[1][0].conv1
    mask = (torch.rand_like(conv.weight) > 0.5).float()
    conv.set_mask(mask)
    before = model(x)
    with torch.no_grad():
        conv.weight.add_(100.0 * (1 - mask))  # perturb only pruned entries
    torch.testing.assert_close(model(x), before)


def test_width_and_stem_change_the_model():
    small = build_model("resnet18", 10, 3, "cifar", width=8)
    assert small.stem[0].out_channels == 8 and small.fc.in_features == 64
    imagenet = build_model("resnet18", 10, 3, "imagenet", width=8)
    assert imagenet.stem[0].kernel_size == (7, 7) and isinstance(imagenet.stem[-1], nn.MaxPool2d)
    wrn = build_model("wrn-28-10", 10, 3, "cifar", width=2)
    assert wrn.fc.in_features == 2 * 10 * 4


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "resnet19"}, "name must be one of"),
    ({"stem": "tiny"}, "stem must be one of"),
    ({"num_classes": 0}, "num_classes must be >= 1"),
    ({"width": -1}, "width must be >= 0"),
])
def test_build_model_rejects_bad_arguments(kwargs, match):
    args = {"name": "resnet18", "num_classes": 10, "in_channels": 3, "stem": "cifar", "width": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**args)
