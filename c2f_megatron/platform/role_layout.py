"""One model role's own tensor/pipeline layout on the ranks of the job (colocated PPO roles).

megatron's ``parallel_state`` holds a single layout: the one ``init_distributed`` sets up (in PPO, the
actor's). A role with a different ``(TP, PP)`` (a critic at PP=2 next to a TP=2 actor, a reference model
at TP=1 using the leftover ranks as data parallel) gets its own process groups, packed in megatron's
``ProcessGroupCollection``; ``GPTModel``, ``DistributedDataParallel``, ``get_megatron_optimizer``,
``finalize_model_grads``, the pipeline schedules and the sharded state dict all accept that collection in
place of the globals. A role whose layout equals the global one uses the globals (``pg_collection`` None),
so that path is exactly megatron's default one.

Ranks follow megatron's default order (``tp`` fastest, then ``dp``, then ``pp``), computed by megatron's
own ``RankGenerator``. Every rank creates every group in the same order, as
``torch.distributed.new_group`` requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class RoleLayout:
    """Where this rank sits in one role's layout, and the groups that role communicates over."""

    name: str
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    pp_ranks: list[int]  # global ranks of this rank's pipeline, first stage first
    pg_collection: Any = None  # None: megatron's global parallel_state is this layout
    vpp: int | None = None  # virtual pipeline stages (global layout only)

    @property
    def is_global(self) -> bool:
        return self.pg_collection is None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def last_stage_rank(self) -> int:
        return self.pp_ranks[-1]

    def describe(self) -> str:
        return f"{self.name}: TP {self.tp} PP {self.pp} DP {self.dp}" + (
            f" VPP {self.vpp}" if self.vpp else ""
        )

    def schedule_kwargs(self, model_config: Any) -> dict[str, Any]:
        """Extra arguments of megatron's ``forward_backward_*`` for this layout (none for the global one)."""
        if self.is_global:
            return {}
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        return {
            "pg_collection": self.pg_collection,
            "p2p_communicator": P2PCommunicator(pp_group=self.pp_group, config=model_config),
        }

    def sharded_state_metadata(self) -> dict[str, Any] | None:
        """``metadata`` for ``sharded_state_dict``: replica ids must come from this role's DP group."""
        return None if self.is_global else {"dp_cp_group": self.dp_group}


def global_layout(name: str = "model") -> RoleLayout:
    """The layout of megatron's ``parallel_state`` (what ``init_distributed`` set up)."""
    from megatron.core import parallel_state as ps

    return RoleLayout(
        name=name,
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        pp_ranks=dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def rank_lists(world: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """The rank lists of every group of a ``(TP, PP)`` layout over ``world`` ranks, in megatron's default
    order (its own ``RankGenerator``, so a role's groups line up with what ``parallel_state`` would build)."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=1, dp=world // (tp * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    pipelines = gen.get_ranks("pp")
    return {
        "tp": gen.get_ranks("tp"),
        "dp": gen.get_ranks("dp"),
        "pp": pipelines,
        "mp": gen.get_ranks("tp-pp"),
        "embd": [[r[0], r[-1]] if len(r) > 1 else [r[0]] for r in pipelines],
        "pos_embd": [[r[0]] for r in pipelines],
        "single": [[r] for r in range(world)],
    }


def _groups(lists: list[list[int]], me: int) -> tuple[Any, list[int]]:
    """Create one group per rank list (all ranks, same order); return the one holding ``me``."""
    mine, mine_ranks = None, []
    for ranks in lists:
        group = dist.new_group(ranks=ranks)
        if me in ranks:
            mine, mine_ranks = group, ranks
    return mine, mine_ranks


def build_role_layout(name: str, tp: int, pp: int) -> RoleLayout:
    """The layout of ``name`` at TP ``tp`` x PP ``pp`` (data parallel: the rest of the world): the global
    one when the sizes match it, else new process groups.

    Collective: every rank must call it, with the same sizes in the same order.
    """
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(
            f"{name}: tensor_model_parallel_size {tp} x pipeline_model_parallel_size {pp} does not divide "
            f"the world size {world}"
        )
    current = global_layout(name)
    if (tp, pp) == (current.tp, current.pp):
        return current
    from megatron.core.process_groups_config import ProcessGroupCollection

    dp = world // (tp * pp)
    me = dist.get_rank()
    lists = rank_lists(world, tp, pp)
    groups = {kind: _groups(ranks, me) for kind, ranks in lists.items()}  # dicts keep this order
    tp_group, tp_ranks = groups["tp"]
    dp_group, dp_ranks = groups["dp"]
    pp_group, pp_ranks = groups["pp"]
    mp_group = groups["mp"][0]
    embd_group, pos_embd_group, single = groups["embd"][0], groups["pos_embd"][0], groups["single"][0]

    pgc = ProcessGroupCollection()
    pgc.tp = tp_group
    pgc.pp = pp_group
    pgc.mp = mp_group
    pgc.embd = embd_group  # None on ranks outside every embedding group, as in parallel_state
    pgc.pos_embd = pos_embd_group
    pgc.cp = single
    pgc.tp_cp = tp_group
    pgc.hcp = None
    pgc.ep = single
    pgc.expt_tp = tp_group
    pgc.tp_ep = tp_group
    pgc.tp_ep_pp = mp_group
    pgc.dp = dp_group
    pgc.dp_cp = dp_group
    pgc.tp_dp_cp = None
    pgc.expt_dp = dp_group
    pgc.intra_dp_cp = dp_group
    pgc.intra_expt_dp = dp_group
    pgc.intra_dist_opt = dp_group
    pgc.inter_dist_opt = None
    return RoleLayout(
        name=name,
        tp=tp,
        pp=pp,
        dp=dp,
        tp_rank=tp_ranks.index(me),
        pp_rank=pp_ranks.index(me),
        dp_rank=dp_ranks.index(me),
        tp_group=tp_group,
        pp_group=pp_group,
        dp_group=dp_group,
        pp_ranks=pp_ranks,
        pg_collection=pgc,
    )
