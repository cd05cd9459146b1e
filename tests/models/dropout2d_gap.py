"""A small CNN with channel dropout (nn.Dropout2d) and global average pooling.

Source: none. No public model with this exact layout was found in the searched
corpora, so it was written for this project from the brief's specification. It is
not any particular author's code.

Nearest public examples found (for reference; not what this file contains):
  * pytorch/examples mnist/main.py at an old commit
    (f15fac72e01158bcb704dded7c7e511f7a712a5f): `self.conv2_drop = nn.Dropout2d()`
    after conv2, but flattens into Linear(320, 50) and has no global pooling.
  * monimoyd/ml_training_ci_cd_mnist  src/model.py
    (commit 19a2e9595a29c77e05791761410382f038a35580): ends in
    nn.AdaptiveAvgPool2d(1) over 10 channels, but uses nn.Dropout, not Dropout2d.

Shapes: 28 -> conv(pad 1) 28 -> conv(pad 1) 28 -> pool 14 -> conv(pad 1) 14
        -> global average pool 1x1 -> 128 features -> Linear(128, 10).
Dropout2d zeroes whole channels in training mode; in eval mode it is the identity.
Output: logits (use nn.CrossEntropyLoss).

Build with:  Net()   (or build())
"""
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super(Net, self).__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Dropout2d(0.25),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = self.gap(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def build():
    return Net()
