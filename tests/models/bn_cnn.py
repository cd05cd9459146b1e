"""A BatchNorm CNN for 1x28x28 inputs (MNIST / Fashion-MNIST), 10 classes.

Source: none. No public Fashion-MNIST example with exactly this pattern
(bias-free 3x3 convs -> BatchNorm2d -> ReLU -> MaxPool2d, twice, then
Linear(64*7*7, 128)) was found in the searched corpora, so this model was written for
this project from the brief's specification. It is a generic, commonly used layout,
not any particular author's code.

Nearest public examples found (for reference; not what this file contains):
  * git-disl/DataPoisoning_FL  federated_learning/nets/fashion_mnist_cnn.py
    (commit 008280f35d5ecce00a67d3fe7856718bf5470876), class FashionMNISTCNN:
    Conv2d(1,16,5,padding=2) -> BatchNorm2d -> ReLU -> MaxPool2d(2), then
    Conv2d(16,32,5,padding=2) -> BatchNorm2d -> ReLU -> MaxPool2d(2), then
    Linear(7*7*32, 10). Its convs have biases.
  * A "FashionCNN" found in the code index (repository not identified) uses
    Conv2d(1,32,3,padding=1,bias=False) and Conv2d(32,64,3,padding=1,bias=False)
    with BatchNorm2d, but applies BN *after* ReLU and max-pool and puts a ReLU on
    its output logits.

Shapes: 28 -> conv(pad 1) 28 -> pool 14 -> conv(pad 1) 14 -> pool 7; 64*7*7 = 3136.
Output: logits (use nn.CrossEntropyLoss).

Build with:  Net()   (or build())
"""
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super(Net, self).__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.classifier(x)
        return x


def build():
    return Net()
