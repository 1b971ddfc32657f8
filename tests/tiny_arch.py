"""A user-defined architecture, loaded through `--arch tests.tiny_arch:tiny_cnn`."""

from torch import nn


def tiny_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    model.feature_info = [{"module": "1", "num_chs": width, "reduction": 1},
                          {"module": "3", "num_chs": width, "reduction": 2}]
    return model


tiny_cnn.default_img_size = 32  # the input size a builder may declare (else timm's cfg, else 224)
