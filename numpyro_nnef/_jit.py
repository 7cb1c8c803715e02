"""``quick_jit``: ``jax.jit`` with XLA options that favour compile time on CPU.

CAVI's sweep is hundreds of small operations run a few hundred times, so on CPU its first call
is mostly XLA compilation. The legacy elemental emitters (``xla_cpu_use_fusion_emitters=False``)
and LLVM optimisation level 0 compile it 2.5-2.7x faster with the same or better run time
(probabilistic PCA's sweep: 0.64 s -> 0.25 s to compile, 200 sweeps 0.038 s -> 0.027 s). Other
backends get plain ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False,
                        "xla_backend_optimization_level": 0}


def quick_jit(fn: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fn, **jit_kwargs)``, with ``CPU_COMPILER_OPTIONS`` when the default backend is
    the CPU."""
    if jax.default_backend() == "cpu":
        jit_kwargs.setdefault("compiler_options", CPU_COMPILER_OPTIONS)
    return jax.jit(fn, **jit_kwargs)
