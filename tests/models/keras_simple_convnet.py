"""Keras "Simple MNIST convnet" (fchollet), written in PyTorch.

Source: https://keras.io/examples/vision/mnist_convnet/
Repo path: keras-team/keras-io  examples/vision/mnist_convnet.py
Checked against the stored version at commit 02cfe8063b505adc073986c91729f22039f77ad0
(the tf.keras version, "Last modified: 2020/04/21"); the current Keras 3 page has the
same model with `import keras`.

The Keras model is:
    keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax"),
    ])
compiled with loss="categorical_crossentropy" and optimizer="adam".

PyTorch translation (valid padding; shapes 28 -> 26 -> 13 -> 11 -> 5, pooling floors):
Conv2d(1,32,3) ReLU MaxPool2d(2) Conv2d(32,64,3) ReLU MaxPool2d(2) Flatten
Dropout(0.5) Linear(64*5*5 = 1600, 10).

Differences from the Keras source:
  * The final softmax is left out: the model returns logits, and
    nn.CrossEntropyLoss applies log-softmax itself (equivalent to Keras' softmax +
    categorical cross-entropy). Apply torch.softmax(logits, 1) to get probabilities.
  * Layout is NCHW (1x28x28), not Keras' NHWC (28x28x1). So Flatten orders features
    as (C, H, W), where Keras orders them as (H, W, C); Dense weights imported from a
    Keras model must be permuted accordingly. Conv kernels must be transposed from
    Keras' (kh, kw, in, out) to PyTorch's (out, in, kh, kw), and Dense kernels from
    (in, out) to (out, in).
  * Initialisation is PyTorch's default, not Keras' glorot_uniform with zero biases.

Build with:  build()
"""
import torch
import torch.nn as nn

num_classes = 10


def build():
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2),
        nn.Conv2d(32, 64, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2),
        nn.Flatten(),
        nn.Dropout(0.5),
        # Keras: Dense(num_classes, activation="softmax"). Here: logits;
        # nn.CrossEntropyLoss applies the softmax.
        nn.Linear(64 * 5 * 5, num_classes),
    )
