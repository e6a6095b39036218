"""A residual stack of MoE layers, one rank's part: x ← x + moe_l(x) for each layer l.

Shape legend: T = tokens on this rank, D = hidden.

Every layer is built with the same features (``MoELayer``'s constructor arguments), except the
per-layer ones: ``redundancy`` (each layer's measured loads) and the recorded steps an offloaded
layer's Belady replays. With offload and a prefetch, the stack loads layer l+1's guessed experts
before layer l computes: prefetch "oracle" names the recorded experts, "next_layer" those layer
l+1's router picks on layer l's input (``MoEStack.__init__``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from runtime.config import MoEConfig, ParallelConfig
from runtime.dispatch import Dispatcher
from runtime.eplb import Placement
from runtime.layer import MoELayer
from runtime.offload import OffloadConfig
from runtime.redundancy import RedundancyConfig
from runtime.router import Router
from runtime.weights import MoEWeights


class MoEStack(nn.Module):
    """A residual stack of MoE layers, one rank's part: x ← x + moe_l(x) for each layer l."""

    def __init__(
        self,
        moe: MoEConfig,
        par: ParallelConfig,
        weights: list[MoEWeights],
        group,
        device,
        dispatcher: str = "auto",
        *,
        offload: OffloadConfig | None = None,
        recorded: list[list[list[int]]] | None = None,
        horizon: int = 0,
        redundancy: list[RedundancyConfig] | None = None,
        placements: list[Placement] | None = None,
        on_loss: str = "reroute",
        wrap_dispatcher: Callable[[Dispatcher], Dispatcher] | None = None,
        wrap_router: Callable[[Router], Router] | None = None,
    ):
        """One layer per entry of ``weights`` (global weights, loaded into each layer's part).

        ``offload``: every layer's experts in host memory behind a device cache (runtime/offload.py).
        ``recorded[s][l]``: the experts layer l needs at step s of the stream the stack will run
        (``needed_experts`` of an all-resident pass over it, forward call k being step k mod len).
        Belady replays it, and prefetch "oracle" names exactly it. Prefetch "next_layer" names
        layer l+1's experts from its router applied to layer l's input: this rank's tokens only
        (the tokens other ranks send are not seen), the most chosen first. The cache loads what it
        can of the named experts without evicting any of them (``ExpertCache.prefetch``).
        ``horizon``: forwards Belady plans exactly (``cache_policy.optimal_plan``; without prefetch,
        whose loads the plan does not foresee); later ones, and prefetch runs, follow its rule.
        ``redundancy``: one ``RedundancyConfig`` per layer. ``placements``: one ``runtime.eplb.Placement`` per
        layer (``MoELayer``'s ``placement``: copies in equal slots per rank, re-placed by ``set_placement``).
        ``on_loss``, ``wrap_dispatcher``,
        ``wrap_router``: as ``MoELayer``'s, for every layer."""
        super().__init__()
        if offload is not None and (offload.policy == "belady" or offload.prefetch == "oracle") and not recorded:
            modes = f"OffloadConfig.policy = {offload.policy!r}, prefetch = {offload.prefetch!r}"
            raise ValueError(f"{modes} needs recorded: accepted the needed experts of each step of the stream")
        if offload is None and recorded is not None:
            raise ValueError("MoEStack recorded without offload is refused: accepted with an OffloadConfig")
        for name, per_layer in (("redundancy", redundancy), ("placements", placements)):
            if per_layer is not None and len(per_layer) != len(weights):
                raise ValueError(
                    f"MoEStack {name} has {len(per_layer)} entries: accepted one per layer ({len(weights)})"
                )
        group = group if par.ep_size > 1 or dispatcher == "all_to_all" else None
        plan = horizon if offload is not None and offload.prefetch == "none" else 0
        self.layers = nn.ModuleList(
            MoELayer(
                moe,
                par,
                group=group,
                device=device,
                dispatcher=dispatcher,
                offload=offload,
                offload_steps=[step[l] for step in recorded] if recorded else None,
                offload_horizon=plan,
                redundancy=None if redundancy is None else redundancy[l],
                placement=None if placements is None else placements[l],
                on_loss=on_loss,
                wrap_dispatcher=wrap_dispatcher,
                wrap_router=wrap_router,
            )
            for l in range(len(weights))
        )
        for layer, w in zip(self.layers, weights, strict=True):
            layer.load_global_weights(w)
        self._prefetch = "none" if offload is None else offload.prefetch
        self._recorded, self._calls = recorded, 0

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Returns the stack's output and each layer's ``MoEOutput``. With offload and a prefetch,
        layer l+1's guessed experts are loaded before layer l computes."""
        outputs = []
        for i, layer in enumerate(self.layers):
            if self._prefetch != "none" and i + 1 < len(self.layers):
                self._prefetch_next(i + 1, x_TD)
            result = layer(x_TD)
            x_TD = x_TD + result.out_TD
            outputs.append(result)
        self._calls += 1
        return x_TD, outputs

    def needed_experts(self, outputs: list) -> list[list[int]]:
        """Per layer, the local experts (indices into the rank's L, ascending) that had rows in a
        forward with these ``MoEOutput``s: the set an offloaded layer accesses."""
        return [
            [i for i, e in enumerate(layer.local_experts) if int(r.kept_WE[:, e].sum()) > 0]
            for layer, r in zip(self.layers, outputs, strict=True)
        ]

    def _prefetch_next(self, l: int, h_TD: torch.Tensor) -> None:
        layer = self.layers[l]
        if self._prefetch == "oracle":
            experts = self._recorded[self._calls % len(self._recorded)][l]
        else:  # the router's own choice, even where a trace replaces it (Router.forward, not ReplayRouter's)
            ids = Router.forward(layer.router, h_TD).ids_TK.reshape(-1)
            counts_E = torch.bincount(ids, minlength=layer.moe.num_experts).tolist()  # sync: a host list
            counts_L = [counts_E[e] for e in layer.local_experts]
            experts = sorted((i for i, n in enumerate(counts_L) if n), key=lambda i: -counts_L[i])
        layer.experts.cache.prefetch(experts)

    def reduce_replicated_grads(self) -> None:
        for layer in self.layers:
            layer.reduce_replicated_grads()
