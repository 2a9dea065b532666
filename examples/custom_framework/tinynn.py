"""tinynn: a small NumPy neural-network framework, standing in for "your own framework".

It knows nothing about runstate. Like many home-grown frameworks it has its own conventions
for state: a model exposes ``get_weights()``/``set_weights()``, optimizers
``save_state()``/``load_state()``, and every optimizer keeps its moments in dicts keyed by
parameter name. ``resumable.py`` shows the few lines that make it resumable with runstate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Params = dict[str, np.ndarray]


class Linear:
    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator) -> None:
        self.W = rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)
        self.b = np.zeros(n_out)
        self.grads: Params = {}
        self._x = np.empty(0)

    def params(self) -> Params:
        return {"W": self.W, "b": self.b}

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        self._x = x
        return x @ self.W + self.b

    def backward(self, grad: np.ndarray) -> np.ndarray:
        self.grads = {"W": self._x.T @ grad, "b": grad.sum(axis=0)}
        return grad @ self.W.T


class ReLU:
    def params(self) -> Params:
        return {}

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        self._mask = x > 0
        return x * self._mask

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad * self._mask


class Dropout:
    """Inverted dropout drawing from a generator the user owns (and checkpoints)."""

    def __init__(self, p: float, rng: np.random.Generator) -> None:
        self.p, self.rng = p, rng

    def params(self) -> Params:
        return {}

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        if not training:
            self._mask = np.ones_like(x)
        else:
            self._mask = (self.rng.random(x.shape) >= self.p) / (1.0 - self.p)
        return x * self._mask

    def backward(self, grad: np.ndarray) -> np.ndarray:
        return grad * self._mask


class Sequential:
    def __init__(self, *layers: Any) -> None:
        self.layers = list(layers)

    def parameters(self) -> Params:
        """Every parameter by name (``"0.W"``); the arrays themselves, updated in place."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.params().items()}

    def gradients(self) -> Params:
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in getattr(layer, "grads", {}).items()}

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, grad: np.ndarray) -> None:
        for layer in reversed(self.layers):
            grad = layer.backward(grad)

    # The framework's own state convention (not state_dict/load_state_dict).
    def get_weights(self) -> Params:
        return {k: v.copy() for k, v in self.parameters().items()}

    def set_weights(self, weights: Params) -> None:
        params = self.parameters()
        if weights.keys() != params.keys():
            raise ValueError(f"weights for {sorted(weights)}, the model has {sorted(params)}")
        for k, v in weights.items():
            params[k][...] = v  # in place: optimizers hold the same arrays


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss and its gradient with respect to ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = float(-np.log(probs[np.arange(n), labels]).mean())
    probs[np.arange(n), labels] -= 1.0
    return loss, probs / n


class Optimizer:
    """Updates parameters in place; moments live in dicts keyed by parameter name."""

    def __init__(self, params: Params, lr: float) -> None:
        self.params, self.lr, self.t = params, lr, 0

    def step(self, grads: Params) -> None:
        self.t += 1
        for name, p in self.params.items():
            self.update(name, p, grads[name])

    def update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        raise NotImplementedError

    def moments(self) -> dict[str, Params]:
        raise NotImplementedError

    # The framework's own state convention.
    def save_state(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "lr": self.lr,
            "moments": {k: {n: a.copy() for n, a in d.items()} for k, d in self.moments().items()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.t, self.lr = state["t"], state["lr"]
        for kind, buffers in self.moments().items():
            for name, arr in buffers.items():
                arr[...] = state["moments"][kind][name]


class SGD(Optimizer):
    def __init__(self, params: Params, lr: float, momentum: float = 0.9) -> None:
        super().__init__(params, lr)
        self.momentum = momentum
        self.velocity = {n: np.zeros_like(p) for n, p in params.items()}

    def update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        v = self.velocity[name]
        v *= self.momentum
        v += g
        p -= self.lr * v

    def moments(self) -> dict[str, Params]:
        return {"velocity": self.velocity}


class Adam(Optimizer):
    def __init__(self, params: Params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, lr)
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}

    def update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        m, v = self.m[name], self.v[name]
        m[...] = self.b1 * m + (1 - self.b1) * g
        v[...] = self.b2 * v + (1 - self.b2) * g * g
        m_hat = m / (1 - self.b1**self.t)
        v_hat = v / (1 - self.b2**self.t)
        p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def moments(self) -> dict[str, Params]:
        return {"m": self.m, "v": self.v}


class RMSprop(Optimizer):
    def __init__(self, params: Params, lr: float, alpha: float = 0.99, eps: float = 1e-8) -> None:
        super().__init__(params, lr)
        self.alpha, self.eps = alpha, eps
        self.square_avg = {n: np.zeros_like(p) for n, p in params.items()}

    def update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        s = self.square_avg[name]
        s[...] = self.alpha * s + (1 - self.alpha) * g * g
        p -= self.lr * g / (np.sqrt(s) + self.eps)

    def moments(self) -> dict[str, Params]:
        return {"square_avg": self.square_avg}
