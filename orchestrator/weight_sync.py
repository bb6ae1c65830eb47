"""Weight sync: the trainers' new weights into every rollout worker and every scoring worker that holds a copy.

Object store (any setup): trainer rank 0's state dict is put into the object store once and every receiver
reads it zero-copy (`actors.weights.unpack_state_dict`). NCCL (`rollout.vllm.weight_sync: nccl`): trainer
rank 0 broadcasts into the vLLM rollout workers over a group formed at the first sync. Under ZeRO-3 every
rank takes part in each gather. Receivers report the version they now serve. Under LoRA (`model.lora`) the payload
is the adapters (and a critic's value head) only; `bytes` says how large each sync's payloads are.

Asynchronous mode (`loop.max_staleness` > 0) does not wait for the policy loads (`sync(..., wait=False)`): each
worker runs them after the rounds submitted before (Ray runs one caller's calls to an actor in order), so the
trainer goes on with the next step while the workers finish generating. `settle` collects them later.
"""

from __future__ import annotations

import sys

import ray

from orchestrator.failures import WORKER_LOST


class WeightSync:
    """Moves weights between the pools of a `Pools`; `fallbacks` counts NCCL groups given up for the object store;
    `bytes` holds the payload sizes of the last sync (`sync/bytes`: the policy's, `sync/critic_bytes`)."""

    def __init__(self, pools, method: str, zero3: bool):
        """`method`: "object_store" or "nccl"; `zero3`: the trainers shard their parameters (ZeRO stage 3)."""
        self.pools, self.method, self.zero3 = pools, method, zero3
        self.fallbacks = 0
        self._nccl_ready = False  # the NCCL group is formed at the first sync
        self._sizes: dict[str, int] = {}  # payload bytes per role, asked once: the shapes never change
        self.bytes: dict[str, float] = {}
        self.pending: list[tuple[int, list[ray.ObjectRef]]] = []  # (version, loads) submitted, not yet collected

    def sync(self, version: int, policy: bool = True, tries: int = 3, wait: bool = True) -> list[int]:
        """Policy weights to every rollout worker and policy-holding scoring worker (unless `policy` is False:
        critic warm-up), the critic's to every scoring worker's critic copy; the versions now served (all `version`).
        A receiver that dies on the way is replaced and brought up to the new weights (`Pools.replace_dead`); then
        every receiver is asked again which version it serves (`tries` rounds in all). `wait` False (object-store
        syncs only): the policy loads are submitted and left for `settle`; the versions returned are then only the
        scoring workers' critic-only answers (none)."""
        p = self.pools
        self.settle(block=False)
        for attempt in range(tries):
            try:
                versions = self._push(version, policy, wait) if attempt == 0 else [v for v, _ in p.served_versions()]
                break
            except WORKER_LOST as e:
                if not p.replaceable(e) or attempt == tries - 1:  # a trainer or critic rank: the run stops
                    raise
                if policy:
                    p.version = version  # the weights every replacement must now be brought to
                p.replace_dead()
        assert set(versions) <= {version}, f"workers serve versions {versions} after syncing version {version}"
        return versions

    def settle(self, block: bool = True) -> None:
        """Collect the deferred loads (`sync(wait=False)`): all of them (`block`), or those already done. A receiver
        that died is replaced and brought to the newest weights (`Pools.replace_dead`); each load answers the
        version it was given or a newer one (a rollout worker under `rollout.partial` may take weights early)."""
        still = []
        for version, refs in self.pending:
            if not block and ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[1]:
                still.append((version, refs))
                continue
            try:
                got = ray.get(refs)
            except WORKER_LOST as e:
                if not self.pools.replaceable(e):
                    raise
                self.pools.replace_dead()
                continue
            assert min(got, default=version) >= version, f"workers serve {got} after loading version {version}"
        self.pending = still

    def _push(self, version: int, policy: bool, wait: bool = True) -> list[int]:
        """One pass of `sync`; the versions the receivers report (the policy loads deferred unless `wait`)."""
        p = self.pools
        critic = self.rank0(p.critics, "state_dict") if p.critics else None
        waits = [w.load_value_weights.remote(critic) for w in p.scoring] if critic is not None else []
        self.bytes = {"sync/bytes": 0.0} | ({"sync/critic_bytes": self._size("critic", p.critics)} if critic else {})
        if policy:
            nccl = self.method == "nccl"
            receivers = p.policy_scorers if nccl else p.rollout + p.policy_scorers
            refs = []
            if receivers:
                packed = self.rank0(p.trainers, "state_dict")
                if getattr(p, "board", None) is not None:  # partial rollouts: taken mid-sequence by busy workers
                    p.board.post.remote(version, [packed])
                refs = [w.load_weights.remote(packed, version) for w in receivers]
            if receivers or nccl:
                self.bytes["sync/bytes"] = self._size("policy", p.trainers)
            p.version = version
            if not wait and not nccl:
                self.pending.append((version, refs))
                refs = []
            versions = (self._nccl_sync(version) if nccl else []) + ray.get(refs)  # the broadcast overlaps the loads
        else:
            versions = [v for v, _ in p.served_versions()]
        ray.get(waits)
        return versions

    def _size(self, role: str, ranks: list) -> float:
        """Bytes of one payload of `role` (policy or critic): the put into the object store that every receiver
        reads, or the NCCL broadcast."""
        if role not in self._sizes:
            self._sizes[role] = ray.get(self.rank0(ranks, "sync_bytes"))
        return float(self._sizes[role])

    def bring_up(self, pool: str, worker) -> None:
        """Give a freshly started replacement worker of `pool` the current weights. A rollout worker cannot join
        the NCCL group of the others, so from now on every rollout worker loads from the object store: said
        once on stderr and counted (`sync/fallbacks`)."""
        p = self.pools
        if pool == "rollout" and self.method == "nccl":
            self.method = "object_store"
            self.fallbacks += 1
            print("raylhf: a rollout worker was replaced; its NCCL weight group cannot take a new member, so weights "
                  "now reach every rollout worker through the object store (counted in sync/fallbacks)",
                  file=sys.stderr, flush=True)
        if (pool == "rollout" or (pool == "scoring" and p.scoring_holds_policy)) and p.version:
            ray.get(worker.load_weights.remote(self.rank0(p.trainers, "state_dict"), p.version))
        if pool == "scoring" and p.critics:
            ray.get(worker.load_value_weights.remote(self.rank0(p.critics, "state_dict")))

    def rank0(self, ranks: list, method: str, *args) -> ray.ObjectRef:
        """Rank 0's answer to `method` as an object ref; under ZeRO-3 the other ranks are called too, since
        gathering the sharded parameters takes them all (their answers are not needed)."""
        if self.zero3:
            ray.get([getattr(r, method).remote(*args, **({"pack": False} if method == "state_dict" else {}))
                     for r in ranks[1:]] + [ref := getattr(ranks[0], method).remote(*args)])
            return ref
        return getattr(ranks[0], method).remote(*args)

    def _nccl_sync(self, version: int) -> list[int]:
        """Broadcast the policy from trainer rank 0 into every vLLM rollout worker over the NCCL weight group
        (formed at the first sync); the versions the workers report serving afterwards (the handshake)."""
        from actors.engines.vllm import weight_group_ranks

        p = self.pools
        if not self._nccl_ready:
            world, offsets = weight_group_ranks(ray.get([w.tensor_parallel_size.remote() for w in p.rollout]))
            addr, port = ray.get(p.trainers[0].init_weight_sender.remote(world))
            ray.get([w.init_weight_group.remote(addr, port, offset, world) for w, offset in zip(p.rollout, offsets)]
                    + [p.trainers[0].join_weight_group.remote()])
            self._nccl_ready = True
        meta = ray.get(self.rank0(p.trainers, "weight_meta"))
        receive = [w.receive_weights.remote(meta, version) for w in p.rollout]
        send = [tr.send_weights.remote() for tr in (p.trainers if self.zero3 else p.trainers[:1])]
        ray.get(send)
        return ray.get(receive)
