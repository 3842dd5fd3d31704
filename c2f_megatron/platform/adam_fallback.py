"""Make megatron-core 0.16.1's DistributedOptimizer checkpoints resume exactly on the torch-Adam fallback.

``megatron/core/optimizer/distrib_optimizer.py`` imports Transformer Engine's or apex's ``FusedAdam`` and,
when neither is installed (every CPU machine, and any GPU machine without TE/apex), falls back to
``torch.optim.Adam``/``AdamW`` with ``HAVE_APEX_OR_TE = False``. FusedAdam keeps one ``step`` per param
group; torch Adam keeps a 0-dim ``step`` tensor in every parameter's state and creates that state lazily at
the first ``optimizer.step()``. megatron's checkpoint code for this fallback gets both facts wrong (items
11-13 of ``shared/docs/megatron-core-0.16.1-on-cpu.md``). Three asserted source rewrites (see
``patching.rewrite_function``: a megatron upgrade fails loudly instead of running unfixed code) fix it,
and one wrapper makes the 'dp_reshardable' load work with fp32 parameters:

``empty_state`` (item 11) - ``DistributedOptimizer.state_dict``:
    ``steps = {s["step"] for s in inner_state.values()}; assert len(steps) == 1``. A freshly built
    optimizer, the one a resume loads into, has no torch-Adam state yet, so ``steps`` is empty and the
    assert fires inside ``sharded_state_dict(is_loading=True)`` (it calls ``self.state_dict()`` to build
    the template it loads into). Fix: an empty state means step 0 (no update taken yet); the TE and
    hybrid-optimizer branches of the same method tolerate an empty state too (with ``None``, which this
    branch cannot use: ``load_state_dict`` makes a tensor of it). Only the load template sees this value;
    the checkpoint's step replaces it.

``per_param_step`` (item 12, first half) - ``DistributedOptimizer.load_state_dict``:
    the checkpoint's step (stored in ``param_groups``) is restored with ``s["step"] = step`` for every
    parameter state, i.e. ONE tensor shared by all parameters (torch's ``Optimizer.load_state_dict`` keeps
    ``step`` tensors as they are). torch Adam increments ``state["step"]`` in place once per parameter, so
    after resuming, the P parameters of a rank see steps k+1, k+2, ..., k+P (single-tensor path) or all
    k+P (foreach path) instead of k+1: wrong bias correction, the loss silently diverges. Fix: give each
    parameter its own copy (``step.clone()``).

``keep_loaded_step`` (item 12, second half, and item 13) -
    ``DistributedOptimizer._set_main_param_and_optimizer_states`` (called by every
    ``load_parameter_state_from_*``) copies every key of the parameter's live torch state,
    ``step`` included, from the loaded per-parameter tensors. But ``step`` is never saved per parameter
    (every ``sharded_param_state_*`` skips it: it is restored from ``param_groups`` by ``load_state_dict``
    just before). So with 'dp_reshardable' the ``step`` copied in is the pre-load template's (a
    ``LocalNonpersistentObject`` that loads as the template's own tensor, value 0): the step restored a
    moment earlier is reset to 0, the load "succeeds" and training diverges (item 12); with
    'fully_reshardable' (and, reading the code, the deprecated dp_zero formats) the loaded tensors have
    no ``step`` and the copy raises ``KeyError: 'step'`` (item 13). Fix: skip ``step`` there, leaving the
    value ``load_state_dict`` restored from ``param_groups``.

``load_no_grad`` (found while testing; fp32 parameters, not specific to torch Adam) -
``DistributedOptimizer.load_parameter_state_from_dp_reshardable``:
    with fp32 parameters the distributed optimizer's main parameter is a view of the model parameter
    (``model_param.view(-1)[start:end]``, ``_build_model_and_main_param_groups``), i.e. a view of a leaf
    that requires grad, and this loader copies into it in place with autograd on: "RuntimeError: a view
    of a leaf Variable that requires grad is being used in an in-place operation". Its siblings
    ``load_parameter_state_from_fully_reshardable`` and ``..._fs_model_space`` are ``@torch.no_grad()``;
    this one is not (bf16/fp16 models are unaffected: their main parameters are detached fp32 copies).
    Fix: run it under ``torch.no_grad()`` like its siblings.

The precision-aware-optimizer branch of ``_set_main_param_and_optimizer_states`` and the FusedAdam /
``HybridDeviceOptimizer`` branches are untouched. When TE or apex FusedAdam is in use, ``apply()`` changes
nothing and returns False. The 'fully_sharded_model_space' format (megatron's default) still fails for an
unrelated reason ("ShardedTensor.flattened_range is not supported"); use 'dp_reshardable' or
'fully_reshardable'. ``tests/test_adam_fallback.py`` shows each fix is needed: without any one of them a
resumed DP=2 run either raises or no longer reproduces the uninterrupted run's losses.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from c2f_megatron.platform.patching import check_megatron_version, rewrite_function

logger = logging.getLogger(__name__)

_APPLIED: set[str] = set()


def _fix_empty_state() -> None:
    """Item 11: ``state_dict`` of an optimizer with no torch-Adam state yet reports step 0."""
    from megatron.core.optimizer import distrib_optimizer

    rewrite_function(
        distrib_optimizer.DistributedOptimizer,
        "state_dict",
        {
            "        assert len(steps) == 1\n        step = steps[0]\n    elif": (
                "        assert len(steps) <= 1, f'steps: {steps}'\n"
                "        step = steps[0] if steps else 0\n    elif"
            )
        },
    )


def _fix_per_param_step() -> None:
    """Item 12a: every parameter's state gets its own ``step`` tensor on load."""
    from megatron.core.optimizer import distrib_optimizer

    rewrite_function(
        distrib_optimizer.DistributedOptimizer,
        "load_state_dict",
        {'            s["step"] = step\n': '            s["step"] = step.clone()\n'},
    )


def _fix_keep_loaded_step() -> None:
    """Items 12b, 13: loading per-parameter tensors leaves ``step`` (restored from param_groups) alone."""
    from megatron.core.optimizer import distrib_optimizer

    rewrite_function(
        distrib_optimizer.DistributedOptimizer,
        "_set_main_param_and_optimizer_states",
        {
            "        for key in dst_tensors:\n            dst_tensors[key].copy_(tensors[key])\n": (
                "        for key in dst_tensors:\n"
                "            if key == 'step':\n"
                "                continue\n"
                "            dst_tensors[key].copy_(tensors[key])\n"
            )
        },
    )


def _fix_load_no_grad() -> None:
    """fp32 + 'dp_reshardable': the in-place load into main params (views of model params) needs no_grad."""
    from megatron.core.optimizer import distrib_optimizer

    owner = distrib_optimizer.DistributedOptimizer
    original = owner.load_parameter_state_from_dp_reshardable

    @functools.wraps(original)
    def load_parameter_state_from_dp_reshardable(self, state_dict):
        with torch.no_grad():
            return original(self, state_dict)

    load_parameter_state_from_dp_reshardable.__c2f_replaced__ = True
    owner.load_parameter_state_from_dp_reshardable = load_parameter_state_from_dp_reshardable


FIXES: dict[str, Callable[[], None]] = {
    "empty_state": _fix_empty_state,
    "per_param_step": _fix_per_param_step,
    "keep_loaded_step": _fix_keep_loaded_step,
    "load_no_grad": _fix_load_no_grad,
}

# The DistributedOptimizer methods the fixes replace (tests restore them to compare with and without).
PATCHED_METHODS = (
    "state_dict",
    "load_state_dict",
    "_set_main_param_and_optimizer_states",
    "load_parameter_state_from_dp_reshardable",
)


def needed() -> bool:
    """True when megatron's DistributedOptimizer runs on torch Adam (no Transformer Engine, no apex)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def is_applied() -> bool:
    """True when a distributed-optimizer checkpoint resumes exactly in this process: every fix is installed,
    or none is needed (TE / apex FusedAdam)."""
    return not needed() or set(FIXES) <= _APPLIED


def apply(only: tuple[str, ...] | None = None) -> bool:
    """Install the fixes in this process (idempotent); False, changing nothing, when TE/apex Adam is used.

    ``only`` restricts to some of ``FIXES`` (tests use it to show that each fix is needed).
    """
    check_megatron_version()
    if not needed():
        return False
    unknown = sorted(set(only or ()) - set(FIXES))
    if unknown:
        raise ValueError(f"unknown adam_fallback fix(es) {unknown}; known: {sorted(FIXES)}")
    applied = []
    for name, fix in FIXES.items():
        if (only is None or name in only) and name not in _APPLIED:
            fix()
            _APPLIED.add(name)
            applied.append(name)
    if applied:
        logger.debug("megatron torch-Adam fallback checkpoint fixes applied: %s", ", ".join(applied))
    return True
