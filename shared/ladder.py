"""The lab's first implementation, timed: its convolution looped in Python over images, filters
and pixels (about 30 minutes an epoch in the lab), the rest as the lab had it, matrix products
over the batch in (features, N) layout. It is here to be timed beside the vectorised NumPy, JAX
and PyTorch epochs (`scripts/benchmark.py`), never to train with: one step on a few hundred
images, extrapolated to the 50,000-image epoch.
"""

from __future__ import annotations

import time

import numpy as np

from shared.spec import Params, get_arch, init_params


def conv_forward_loops(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x (C, H, W, N), w (O, C, k, k), b (O,) -> out (O, H, W, N), stride 1, padding k // 2:
    one window product per image, filter and output pixel."""
    _, h, width, n = x.shape
    o, _, k, _ = w.shape
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros((o, h, width, n), dtype=x.dtype)
    for image in range(n):
        for f in range(o):
            for i in range(h):
                for j in range(width):
                    out[f, i, j, image] = np.sum(w[f] * xp[:, i : i + k, j : j + k, image]) + b[f]
    return out


def conv_backward_loops(
    dout: np.ndarray, x: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """dout (O, H, W, N) -> dw (O, C, k, k), db (O,), by the same loops (the images need no
    gradient, so none is computed)."""
    o, h, width, n = dout.shape
    k = w.shape[2]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dw = np.zeros_like(w)
    for image in range(n):
        for f in range(o):
            for i in range(h):
                for j in range(width):
                    dw[f] += dout[f, i, j, image] * xp[:, i : i + k, j : j + k, image]
    return dw, dout.sum(axis=(1, 2, 3))


def lab_step(params: Params, x: np.ndarray, y: np.ndarray, lr: float) -> float:
    """One plain SGD step of the lab network on images x (N, 1, 28, 28) and labels y (N,),
    in the lab's layout; updates `params` in place and returns the mean loss."""
    n = len(x)
    xt = x.transpose(1, 2, 3, 0)  # (C, H, W, N)
    conv = conv_forward_loops(xt, params["conv.weight"], params["conv.bias"])
    a1 = np.maximum(conv, 0)
    flat = a1.reshape(-1, n)  # (6272, N) in C, H, W order
    z2 = params["fc1.weight"] @ flat + params["fc1.bias"][:, None]
    a2 = np.maximum(z2, 0)
    logits = params["fc2.weight"] @ a2 + params["fc2.bias"][:, None]  # (10, N)
    shifted = logits - logits.max(axis=0)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=0)
    loss = -np.log(p[y, np.arange(n)]).mean()
    dlogits = p
    dlogits[y, np.arange(n)] -= 1
    dlogits /= n
    grads = {"fc2.weight": dlogits @ a2.T, "fc2.bias": dlogits.sum(axis=1)}
    dz2 = (params["fc2.weight"].T @ dlogits) * (z2 > 0)
    grads |= {"fc1.weight": dz2 @ flat.T, "fc1.bias": dz2.sum(axis=1)}
    dconv = (params["fc1.weight"].T @ dz2).reshape(conv.shape) * (conv > 0)
    grads["conv.weight"], grads["conv.bias"] = conv_backward_loops(dconv, xt, params["conv.weight"])
    for name, g in grads.items():
        params[name] -= lr * g
    return float(loss)


def loop_epoch_seconds(images: int, epoch_images: int = 50_000) -> dict:
    """Time one lab_step on `images` real training images (float32) and extrapolate to an
    epoch of `epoch_images`."""
    from shared.data import load_dataset

    data = load_dataset()
    params = init_params(get_arch("lab"), "he", 0, np.dtype(np.float32))
    x, y = data.train.x[:images], data.train.y[:images]
    start = time.perf_counter()
    lab_step(params, x, y, 0.01)
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "seconds": seconds,
        "epoch_seconds": seconds * epoch_images / images,
    }
