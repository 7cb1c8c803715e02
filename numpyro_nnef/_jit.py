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
# for programs that run long loops (the NUTS/ChEES/SMC samplers of sampling.py): LLVM O0 runs
# the vmapped NUTS program 4-6x slower, O1 about as fast as the default while compiling 3-4x
# faster (LaplaceProduct 1-d, 50 eta x 4 chains x (500 + 1000): default 6.1-9.6 s compile +
# 1.6-2.4 s run; these options 1.9-2.6 s + 1.6-2.0 s; O0 0.7 s + 7.2-8.1 s; load about 4)
CPU_LOOP_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False,
                             "xla_backend_optimization_level": 1}


def quick_jit(fn: Callable, *, cpu_options: dict[str, Any] | None = None,
              **jit_kwargs: Any) -> Callable:
    """``jax.jit(fn, **jit_kwargs)``, with ``cpu_options`` (default ``CPU_COMPILER_OPTIONS``)
    when the default backend is the CPU."""
    if jax.default_backend() == "cpu":
        jit_kwargs.setdefault("compiler_options", cpu_options or CPU_COMPILER_OPTIONS)
    return jax.jit(fn, **jit_kwargs)
