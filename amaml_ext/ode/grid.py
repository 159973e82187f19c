"""The fixed grid every solve stores its states on: ``t_j = j h``, ``j = 0..N``, ``N = T / h``."""

import torch

from .._checks import positive_real


def grid_size(T: float, h: float) -> int:
    """N = T / h, checked to be a whole number of steps (relative tolerance 1e-9): the one place
    where a horizon and a grid step become a number of steps.

    Args:
        T: the horizon, a positive float (or a 0-dim tensor).
        h: the grid spacing, positive and at most ``T``.

    Returns:
        int: the number of grid intervals N.

    Raises:
        ValueError: naming ``T`` and ``h``, when ``T / h`` is not whole, ``h > T``, or either is
            not a positive finite number.

    Example:
        >>> grid_size(1.0, 0.25)
        4
        >>> grid_size(1.0, 0.3)
        Traceback (most recent call last):
        ...
        ValueError: argument 'T' must be a whole multiple of h=0.3, ...
    """
    T = positive_real("T", T)
    h = positive_real("h", h)
    if h > T * (1 + 1e-12):
        raise ValueError(f"argument 'h' must be <= T (the grid needs at least one step), got h={h}, T={T}")
    n = round(T / h)
    if n < 1 or abs(n * h - T) > 1e-9 * T:
        raise ValueError(
            f"argument 'T' must be a whole multiple of h={h:g}, got T={T:g}: T / h must be a whole number of "
            f"steps, got T={T}, h={h} (T/h={T / h:.6g}); e.g. h={T / max(1, n):.6g} gives N={max(1, n)}"
        )
    return int(n)


def grid_times(T: float, n: int) -> torch.Tensor:
    """The grid's times: ``[n+1]`` float64 ``j * (T / n)``, the last one T exactly.

    Args:
        T: the horizon.
        n: the number of intervals (:func:`grid_size`).

    Returns:
        torch.Tensor: ``[n + 1]`` float64 on the CPU.

    Example:
        >>> grid_times(1.0, 4)
        tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000], dtype=torch.float64)
    """
    times = torch.arange(n + 1, dtype=torch.float64) * (T / n)
    times[-1] = T
    return times
