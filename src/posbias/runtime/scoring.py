"""Bias-corrected visual-token scores, in torch only.

The fitted curves are re-implemented here from their ``to_dict()`` payloads so that the runtime never
imports the numpy/scipy fitters:

- ``fastv``:        score = attn
- ``pore``:         score = attn / P(x),   P(x) = a·exp(b·x) [+ c]            (PoRe)
- ``posprune-pbc``: score = attn - ΔA(x),  ΔA(x) = Σ_k coef_k t^k, t = (x - shift) / scale   (PosPrune)

with x the raster index 0..V-1 (``domain="index"``) or i / V (``domain="normalized"``).
"""

from __future__ import annotations

from typing import Any

import torch

from posbias.artifacts.calibration import Calibration
from posbias.errors import PosbiasError

__all__ = [
    "METHODS",
    "predict_polynomial",
    "predict_exponential",
    "predict_bias",
    "token_positions",
    "method_layer",
    "score_tokens",
]

#: scoring methods the runtime knows
METHODS: tuple[str, ...] = ("fastv", "pore", "posprune-pbc")


def predict_polynomial(fit: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """``PolynomialBiasFitter.predict`` from its ``to_dict()`` payload.

    Parameters
    ----------
    fit : dict
        ``{"class": "PolynomialBiasFitter", "params": ..., "learned": {"coef_", "x_shift_", "x_scale_", ...}}``.
    x : torch.Tensor
        (...) positions in the fit's domain.

    Returns
    -------
    torch.Tensor
        (...) float64 ΔA(x).
    """
    learned = fit["learned"]
    xd = x.to(torch.float64)
    t = (xd - float(learned["x_shift_"])) / float(learned["x_scale_"])  # (...) float64
    out = torch.zeros_like(t)
    for c in reversed(learned["coef_"]):  # Horner over <= 6 coefficients (not over tokens)
        out = out * t + float(c)
    return out


def predict_exponential(fit: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """``ExponentialBiasFitter.predict`` from its ``to_dict()`` payload: ``a·exp(b·x) + c``.

    Parameters
    ----------
    fit : dict
        ``{"class": "ExponentialBiasFitter", "params": ..., "learned": {"a_", "b_", "c_", ...}}``.
    x : torch.Tensor
        (...) positions in the fit's domain.

    Returns
    -------
    torch.Tensor
        (...) float64 P(x) (> 0 for a valid payload).
    """
    learned = fit["learned"]
    xd = x.to(torch.float64)
    return float(learned["a_"]) * torch.exp(float(learned["b_"]) * xd) + float(learned["c_"])


def predict_bias(fit: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """Dispatch on ``fit["class"]`` to :func:`predict_polynomial` or :func:`predict_exponential`."""
    cls = fit.get("class") if isinstance(fit, dict) else None
    if cls == "PolynomialBiasFitter":
        return predict_polynomial(fit, x)
    if cls == "ExponentialBiasFitter":
        return predict_exponential(fit, x)
    raise PosbiasError(f"unknown fit class {cls!r}; expected PolynomialBiasFitter or ExponentialBiasFitter")


def token_positions(
    n_tokens: int,
    domain: str,
    *,
    n_visual: int | None = None,
    positions: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Positions x of the scored tokens in a fit's domain.

    Parameters
    ----------
    n_tokens : int
        V, the number of scored tokens.
    domain : {"index", "normalized"}
    n_visual : int, optional
        Length of the full visual sequence that ``"normalized"`` divides by (default V).
    positions : torch.Tensor, optional
        (V,) or (B, V) raster indices of the scored tokens when they are a subset (default 0..V-1).
    device : torch.device, optional

    Returns
    -------
    torch.Tensor
        (V,) or (B, V) float64 positions.
    """
    if positions is None:
        idx = torch.arange(n_tokens, dtype=torch.float64, device=device)  # (V,) float64
    else:
        idx = positions.to(device=device, dtype=torch.float64)  # (V,) or (B, V) float64
    if domain == "index":
        return idx
    if domain == "normalized":
        return idx / float(n_visual if n_visual is not None else n_tokens)
    raise PosbiasError(f"unknown position domain {domain!r}; expected 'index' or 'normalized'")


def method_layer(method: str, calibration: Calibration) -> int:
    """Decoder layer whose last-token attention ``method`` scores (``layer``, or ``shallow_layer`` for PBC)."""
    entry = _method_entry(method, calibration)
    return int(entry["shallow_layer"] if method == "posprune-pbc" else entry["layer"])


def _method_entry(method: str, calibration: Calibration | None) -> dict[str, Any]:
    if method not in METHODS:
        raise PosbiasError(f"unknown pruning method {method!r}; use one of {list(METHODS)}")
    if calibration is None:
        if method == "fastv":
            return {}
        raise PosbiasError(f"method {method!r} needs a calibration; load one with Calibration.from_pretrained(...)")
    if not isinstance(calibration, Calibration):
        raise PosbiasError(f"calibration must be a posbias Calibration, got {type(calibration).__name__}; use Calibration.load(path)")
    return calibration.method(method)


def _check_attn(attn: Any) -> None:
    if not isinstance(attn, torch.Tensor):
        raise PosbiasError(f"attn must be a torch.Tensor of shape (V,) or (B, V), got {type(attn).__name__}")
    if attn.ndim not in (1, 2) or attn.shape[-1] == 0:
        raise PosbiasError(f"attn has shape {tuple(attn.shape)}; pass (V,) or (B, V) last-token attention over visual tokens")
    if not (attn.is_floating_point()):
        raise PosbiasError(f"attn has dtype {attn.dtype}; pass floating-point attention weights")


def _prepare(
    method: str,
    attn: Any,
    calibration: Calibration | None,
    n_visual: int | None,
    positions: torch.Tensor | None,
) -> dict[str, Any]:
    """All validation that can happen before any compute; returns the method entry."""
    entry = _method_entry(method, calibration)
    _check_attn(attn)
    v = int(attn.shape[-1])
    if n_visual is not None and (isinstance(n_visual, bool) or not isinstance(n_visual, int) or n_visual < v):
        raise PosbiasError(f"n_visual={n_visual!r} must be an int >= the {v} scored tokens (the full visual sequence length)")
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.shape[-1] != v or positions.ndim > attn.ndim:
            raise PosbiasError(f"positions must be a tensor of shape (V,) or (B, V) matching attn {tuple(attn.shape)}")
    if method != "fastv" and entry.get("domain") == "index" and calibration is not None:
        grid = calibration.model["grid"]
        full = n_visual if n_visual is not None else v
        if grid is not None and positions is None and full != grid[0] * grid[1]:
            raise PosbiasError(
                f"calibration {calibration.source} was fitted on a {grid[0]}x{grid[1]} grid ({grid[0] * grid[1]} tokens) "
                f"but attn has {full}; pass all visual tokens in raster order, or positions=..."
            )
    return entry


def score_tokens(
    method: str,
    attn: torch.Tensor,
    calibration: Calibration | None,
    *,
    n_visual: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bias-corrected importance score of each visual token.

    Parameters
    ----------
    method : {"fastv", "pore", "posprune-pbc"}
    attn : torch.Tensor
        (V,) or (B, V) attention the last prompt token pays to each visual token at the method's layer
        (:func:`method_layer`), in visual-token (raster) order.
    calibration : Calibration or None
        Needed for ``pore`` and ``posprune-pbc``; when given, it must contain ``method``.
    n_visual : int, optional
        Full visual sequence length for the ``"normalized"`` domain (default V).
    positions : torch.Tensor, optional
        (V,) or (B, V) raster indices when ``attn`` covers a subset of the visual tokens.

    Returns
    -------
    torch.Tensor
        Same shape as ``attn``; dtype ``attn.dtype`` promoted to at least float32.
    """
    entry = _prepare(method, attn, calibration, n_visual, positions)
    out_dtype = torch.promote_types(attn.dtype, torch.float32)
    if not bool(torch.isfinite(attn).all()):
        raise PosbiasError("attn contains NaN or inf; check the captured attention (eager attention at that layer)")
    if method == "fastv":
        return attn.to(out_dtype)
    x = token_positions(int(attn.shape[-1]), entry["domain"], n_visual=n_visual, positions=positions, device=attn.device)
    bias = predict_bias(entry["fit"], x)  # (V,) or (B, V) float64
    a = attn.to(torch.float64)  # (V,) or (B, V) float64
    scores = a / bias if method == "pore" else a - bias  # broadcast over B
    return scores.to(out_dtype)
