"""The training-loop interface (see shared/backend.py) for the PyTorch implementation."""

from __future__ import annotations

import numpy as np
import torch

from impl_torch import layers, model, optim
from impl_torch.augment import augment
from shared.backend import BackendBase
from shared.data import Batch
from shared.spec import Arch, Params

_TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class State:
    """The module and its optimizer; `train_step` updates both in place."""

    def __init__(self, net: model.Net, optimizer: torch.optim.SGD):
        self.net, self.optimizer = net, optimizer


class Backend(BackendBase):
    name = "torch"

    def __init__(self, arch: Arch, **hyperparameters):
        super().__init__(arch, **hyperparameters)
        self.torch_dtype = _TORCH_DTYPE[self.dtype]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=self.dtype))

    def _tensors(self, arrays: Params) -> dict[str, torch.Tensor]:
        return {k: self._tensor(v) for k, v in arrays.items()}

    def init_state(self, params: Params, velocity: Params | None = None) -> State:
        net = model.Net(self.arch).to(self.torch_dtype)
        net.load_state_dict(self._tensors(params))
        optimizer = optim.make_optimizer(
            net.parameters(), self.momentum, self.weight_decay, self.nesterov
        )
        if velocity is not None:
            optim.with_velocity(optimizer, net.named_parameters(), self._tensors(velocity))
        return State(net, optimizer)

    def put_data(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tensor(x), torch.from_numpy(y)

    def train_step(self, state: State, data, batch: Batch, lr: float):
        idx = torch.from_numpy(batch.idx)
        x, y = data[0][idx], data[1][idx]
        if batch.rows is not None:
            rows, cols = torch.from_numpy(batch.rows), torch.from_numpy(batch.cols)
            x = augment(x, rows, cols, batch.pad, batch.fill)
        state.optimizer.zero_grad(set_to_none=True)
        logits = state.net(x)
        loss = layers.cross_entropy(logits, y, self.label_smoothing)
        loss.backward()
        optim.sgd_step(state.optimizer, lr)
        return state, loss.item(), int((logits.argmax(dim=1) == y).sum())

    def predict(self, state: State, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return state.net(self._tensor(x)).numpy()

    def params(self, state: State) -> Params:
        return {k: v.detach().numpy().copy() for k, v in state.net.state_dict().items()}

    def velocity(self, state: State) -> Params:
        buffers = optim.velocity(state.optimizer, state.net.named_parameters())
        return {k: v.numpy().copy() for k, v in buffers.items()}

    def activations(self, params: Params, x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            acts = model.activations(self._tensors(params), self._tensor(x), self.arch)
        return {k: v.numpy() for k, v in acts.items()}

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        value, grads = model.loss_and_grads(
            self._tensors(params),
            self._tensor(x),
            torch.from_numpy(y),
            self.arch,
            self.label_smoothing,
        )
        return value.item(), {k: v.numpy() for k, v in grads.items()}

    def input_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return model.input_grad(
            self._tensors(params),
            self._tensor(x),
            torch.from_numpy(y),
            self.arch,
            self.label_smoothing,
        ).numpy()
