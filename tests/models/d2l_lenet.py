"""LeNet-5 from Dive into Deep Learning (d2l.ai), PyTorch version.

Source: https://d2l.ai/chapter_convolutional-neural-networks/lenet.html
        (section 7.6 "Convolutional Neural Networks (LeNet)")
Repo path: d2l-ai/d2l-en  chapter_convolutional-neural-networks/lenet.md
Checked against the snapshot at repo HEAD 23d7a5aecceee57d1292c56e90cce307f183bb0a;
the file was last changed in commit 1ca368db8523672f52c4e997b1e330aee013f1ce.

Changes from the source:
  * The book's PyTorch code uses nn.LazyConv2d / nn.LazyLinear. Here the Lazy modules
    were replaced by their materialised equivalents for a 1x28x28 input:
    Conv2d(1, 6, ...), Conv2d(6, 16, ...), Linear(16*5*5, 120), Linear(120, 84),
    Linear(84, num_classes). The layer order, kernel sizes, padding, Sigmoid
    activations and AvgPool2d layers are the book's.
  * The book's class subclasses d2l.Classifier and calls self.save_hyperparameters();
    the d2l package is not a dependency here, so this one subclasses nn.Module and
    stores lr / num_classes as attributes. d2l.Module.forward is `return self.net(X)`,
    which is reproduced below.
  * init_cnn (Xavier-uniform weights) is copied from the book. The book applies it in
    its training cell (model.apply_init(..., init_cnn)), not in the constructor, so
    build() does not apply it either; call model.net.apply(init_cnn) if wanted.
  * The older version of this chapter (classic.d2l.ai) wrote the same network as a
    plain nn.Sequential with explicit Conv2d/Linear sizes and a Reshape() layer in front.

Output: logits over 10 classes (the book trains with cross-entropy).

Build with:  LeNet()   (or build())
"""
import torch
from torch import nn


def init_cnn(module):
    """Initialize weights for CNNs."""
    if type(module) == nn.Linear or type(module) == nn.Conv2d:
        nn.init.xavier_uniform_(module.weight)


class LeNet(nn.Module):
    """The LeNet-5 model."""
    def __init__(self, lr=0.1, num_classes=10):
        super().__init__()
        self.lr = lr
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
            nn.Linear(120, 84), nn.Sigmoid(),
            nn.Linear(84, num_classes))

    def forward(self, X):
        return self.net(X)


def build():
    return LeNet()
