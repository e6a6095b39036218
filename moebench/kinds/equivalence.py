"""The equivalence kind: the EP layer against the fp64 reference, at any EP size.

One *case* fixes a layer config, the number of stacked layers, a placement, a routing pattern
and skew, and a token split. The same global weights and tokens go to a stack of
``runtime.reference.reference_moe`` layers (fp64, one process) and to a ``MoEStack`` of
``runtime.MoELayer`` on W ranks (each rank gets a contiguous slice of the tokens); both stacks are
residual, x ← x + moe_l(x). The training objective is L = Σ_t ⟨out_t, g_t⟩ + Σ_l router_loss_l
with a fixed random g, summed over ranks.

With sequence routing (``MoEConfig.granularity = "sequence"``) each rank cuts its tokens into sequences
of ``seq_len`` (None: its whole slice is one sequence); the reference is given the same sequences
(``reference_lengths``) and routes them by its own code.

Compared, each as ‖x − ref‖ / ‖ref‖ (``rel_error``): the output, the aux and z losses (summed
over ranks and layers), and the gradients of the input, each router (after
``reduce_replicated_grads``) and every expert weight (gathered from the owners into the global
layout). Gradient names: "x", then "router", "w_in", "w_down" for layer 0 and "router.1", ... for
later layers.

With ``[offload]`` (``Case.offload``) the stack's experts are offloaded (``MoEStack``'s ``offload``) and
only the forward is compared: offload is inference-only. Each rank also checks that its
offloaded output is bitwise the all-resident stack's on the same tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moebench import adapters
from moebench import metrics as M
from moebench.measure import impl_decoder, slowdown
from moebench.measure.common import sampler
from moebench.measure.impl import check_impl
from moebench.measure.offload import offload_config
from moebench.workload.tokens import layer_weights
from runtime import MoEConfig, MoEWeights, ParallelConfig, reference_moe
from runtime.offload import OffloadConfig
from runtime.reference import rel_error
from runtime.router import cut_sequences
from runtime.stack import MoEStack

if TYPE_CHECKING:
    from moebench.spec import RunSpec

# Documented tolerances of ‖out − ref‖/‖ref‖ against the fp64 reference, per compute dtype.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


@dataclass(frozen=True)
class Case:
    """One equivalence check. ``routing``: "random" | "hot:E" (every token's top choice is E)
    | "avoid:E" (no token picks E) | "cyclic" (token t's top choice is t mod num_experts)
    | "tied" (a zero router: every probability ties, so ties must go to the lower id)."""

    name: str
    moe: MoEConfig
    placement: str = "round_robin"
    par_extra: dict = field(default_factory=dict)  # expert_loads / expert_to_rank / max_experts_per_rank
    num_tokens: int = 128
    routing: str = "random"
    empty_rank: bool = False  # rank 0 gets no tokens when W > 1
    dispatcher: str = "auto"  # "all_to_all" forces the collective path even at W = 1
    expert_backend: str | None = None  # overrides moe.expert_backend (e.g. "grouped_mm" on GPU)
    seed: int = 0
    layers: int = 1  # residual stack depth
    skew: str = "uniform"  # router logit offset per layer, see moebench/workload/tokens.py
    skew_param: float | None = None
    offload: OffloadConfig | None = None  # forward only, experts behind a device cache

    def parallel(self, world_size: int) -> ParallelConfig:
        return ParallelConfig(ep_size=world_size, placement=self.placement, **self.par_extra)


@dataclass
class Result:
    """Global tensors of one run (EP or reference), all on the CPU."""

    out: torch.Tensor
    aux_loss: float
    z_loss: float
    tokens_dropped: int  # over all layers
    grads: dict[str, torch.Tensor]  # "x", "router", "w_in", "w_down", "router.1", ...


def make_inputs(case: Case) -> tuple[list[MoEWeights], torch.Tensor, torch.Tensor]:
    """Seeded global weights per layer, tokens x_ND and upstream gradient g_ND for the case.

    A ``routing`` pattern other than "random" rewrites the first layer's router."""
    cfg = case.moe
    weights = layer_weights(cfg, case.layers, case.seed, case.skew, case.skew_param)
    gen = torch.Generator().manual_seed(case.seed + 1)
    x_ND = torch.randn(case.num_tokens, cfg.hidden_size, generator=gen)
    g_ND = torch.randn(case.num_tokens, cfg.hidden_size, generator=gen)
    router = weights[0].router_ED.clone()
    kind, _, arg = case.routing.partition(":")
    if kind in ("hot", "avoid"):
        x_ND[:, 0] = 1.0  # a constant feature only expert E's gate weighs: a fixed logit offset
        router[:, 0] = 0.0
        router[int(arg), 0] = 6.0 if kind == "hot" else -6.0  # decisive, yet the softmax is not saturated
    elif kind == "cyclic":
        e = cfg.num_experts
        x_ND[:, :e] = 0.1 * x_ND[:, :e] + 2.0 * torch.eye(e)[torch.arange(case.num_tokens) % e]
        router.zero_()
        router[:, :e] = 2.0 * torch.eye(e)
    elif kind == "tied":
        router.zero_()
    elif kind != "random":
        raise ValueError(f"Case.routing = {case.routing!r}: accepted random, hot:E, avoid:E, cyclic, tied")
    weights[0] = dataclasses.replace(weights[0], router_ED=router)
    return weights, x_ND, g_ND


def _grad_name(name: str, layer: int) -> str:
    return name if layer == 0 else f"{name}.{layer}"


def _grad(t: torch.Tensor) -> torch.Tensor:
    """``t``'s gradient; zeros when autograd left it None (no copy reached any of its experts)."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def token_splits(case: Case, world_size: int) -> list[int]:
    """Tokens per rank: as even as possible, or none on rank 0 when ``empty_rank``."""
    ranks = world_size - 1 if case.empty_rank and world_size > 1 else world_size
    base, extra = divmod(case.num_tokens, ranks)
    sizes = [base + (1 if r < extra else 0) for r in range(ranks)]
    return [0] * (world_size - ranks) + sizes


def run_rank(ctx, case: Case) -> dict:
    """One rank's forward and backward; returns its slices (called on every rank by ``launch``)."""
    weights, x_ND, g_ND = make_inputs(case)
    splits = token_splits(case, ctx.world_size)
    start = sum(splits[: ctx.rank])
    x_TD = x_ND[start : start + splits[ctx.rank]].to(ctx.device).requires_grad_()
    g_TD = g_ND[start : start + splits[ctx.rank]].to(ctx.device)
    moe = case.moe if case.expert_backend is None else dataclasses.replace(case.moe, expert_backend=case.expert_backend)

    def new_stack(**features) -> MoEStack:
        par = case.parallel(ctx.world_size)
        wrap = slowdown.wrapper()
        return MoEStack(moe, par, weights, ctx.group, ctx.device, case.dispatcher, wrap_dispatcher=wrap, **features)

    stack = new_stack()
    if case.offload is not None:
        return _offloaded_forward(ctx, case, stack, x_TD.detach(), new_stack)
    out_TD, results = stack(x_TD)
    loss = (out_TD.float() * g_TD).sum() + sum(r.router_loss for r in results)
    loss.backward()
    stack.reduce_replicated_grads()
    grads = {"x": _grad(x_TD).cpu()}
    for i, layer in enumerate(stack.layers):
        grads[_grad_name("router", i)] = _grad(layer.router.weight_ED).cpu()
        grads[_grad_name("w_in", i)] = _grad(layer.experts.w_in_LDH).cpu()
        grads[_grad_name("w_down", i)] = _grad(layer.experts.w_down_LFD).cpu()
    return {
        "out": out_TD.detach().cpu(),
        "aux_loss": sum(r.aux_loss.item() for r in results),
        "z_loss": sum(r.z_loss.item() for r in results),
        "tokens_dropped": sum(r.tokens_dropped for r in results),
        "local_experts": stack.layers[0].local_experts,
        "grads": grads,
    }


def _offloaded_forward(ctx, case: Case, resident: MoEStack, x_TD: torch.Tensor, new_stack) -> dict:
    """The forward of an offloaded stack (no gradients), and whether it is bitwise the resident one's."""
    with torch.no_grad():
        want_TD, recorded_results = resident(x_TD)
        offloaded = new_stack(offload=case.offload, recorded=[resident.needed_experts(recorded_results)])
        out_TD, results = offloaded(x_TD)
    return {
        "out": out_TD.cpu(),
        "aux_loss": sum(r.aux_loss.item() for r in results),
        "z_loss": sum(r.z_loss.item() for r in results),
        "tokens_dropped": sum(r.tokens_dropped for r in results),
        "local_experts": offloaded.layers[0].local_experts,
        "grads": {},
        "bitwise_resident": bool(torch.equal(out_TD, want_TD)),
    }


def run_cases(ctx, cases: list[Case]) -> list[dict]:
    """``run_rank`` for several cases in one launch (spawning ranks costs seconds)."""
    return [run_rank(ctx, case) for case in cases]


def assemble(per_rank: list[dict]) -> Result:
    """Stitch the ranks' slices into global tensors (expert grads into their global slots)."""
    num_experts = sum(len(r["local_experts"]) for r in per_rank)
    grads = {}
    for name, first in per_rank[0]["grads"].items():
        if name == "x":
            grads[name] = torch.cat([r["grads"]["x"] for r in per_rank])
        elif name.startswith("router"):
            grads[name] = first  # already summed over the group
        else:
            full = first.new_zeros((num_experts, *first.shape[1:]))
            for r in per_rank:
                full[list(r["local_experts"])] = r["grads"][name]
            grads[name] = full
    return Result(
        out=torch.cat([r["out"] for r in per_rank]),
        aux_loss=sum(r["aux_loss"] for r in per_rank),
        z_loss=sum(r["z_loss"] for r in per_rank),
        tokens_dropped=per_rank[0]["tokens_dropped"],
        grads=grads,
    )


def reference_lengths(case: Case, world_size: int) -> list[int] | None:
    """The sequences the ranks route on, over the whole batch in rank order (None: token routing)."""
    if case.moe.granularity == "token":
        return None
    return [n for split in token_splits(case, world_size) for n in cut_sequences(split, case.moe.seq_len)]


def run_reference(case: Case, world_size: int = 1) -> Result:
    """The fp64 reference stack on the whole batch, with gradients of the same objective (``world_size``:
    the ranks' split, which sets the sequences when each rank's slice is one)."""
    weights, x_ND, g_ND = make_inputs(case)
    lengths = reference_lengths(case, world_size)
    x = x_ND.double().requires_grad_()
    leaves = [
        MoEWeights(
            *(t.double().requires_grad_() for t in (w.router_ED, w.w_in_EDH, w.w_down_EFD)),
            w.router_bias_E,
            w.score_bias_E,
        )
        for w in weights
    ]
    h, loss, aux, z, dropped = x, 0.0, 0.0, 0.0, 0
    for w in leaves:
        ref = reference_moe(h, w, case.moe, lengths)
        h = h + ref.out_ND
        loss = loss + case.moe.aux_loss_coef * ref.aux_loss + case.moe.z_loss_coef * ref.z_loss
        aux, z, dropped = aux + ref.aux_loss.item(), z + ref.z_loss.item(), dropped + len(ref.dropped)
    loss = loss + (h * g_ND.double()).sum()
    loss.backward()
    grads = {"x": _grad(x)}
    for i, w in enumerate(leaves):
        grads[_grad_name("router", i)] = _grad(w.router_ED)
        grads[_grad_name("w_in", i)] = _grad(w.w_in_EDH)
        grads[_grad_name("w_down", i)] = _grad(w.w_down_EFD)
    return Result(h.detach(), aux, z, dropped, grads)


def compare(ep: Result, ref: Result) -> dict[str, float]:
    """Relative error of every compared quantity (forward, losses, each gradient)."""
    errors = {
        "out": rel_error(ep.out, ref.out),
        "aux_loss": rel_error(torch.tensor(ep.aux_loss), torch.tensor(ref.aux_loss)),
        "z_loss": rel_error(torch.tensor(ep.z_loss), torch.tensor(ref.z_loss)),
    }
    errors.update({f"grad_{k}": rel_error(ep.grads[k], ref.grads[k]) for k in ref.grads if k in ep.grads})
    return errors


# -------------------------------------------------------------------------------------------
# The kind: one case from the scenario, run on the ranks, compared in the parent

NAME = "equivalence"
ORDER = 4  # place in listings and "accepted" lists
# overlapped chunks and offload are checked too (forward only with offload); impl: another implementation's forward
FEATURES = frozenset({"overlap", "offload", "impl"})
COLUMNS = (
    ("rel_error_forward", "fwd rel err", 1, ".1e"),
    ("rel_error_grad", "grad rel err", 1, ".1e"),
    ("tokens_dropped", "dropped (copies)", 1, ".0f"),
    *impl_decoder.COLUMNS,
)
METRICS = ("rel_error_forward", "rel_error_grad", "tokens_dropped", "rel_error_runtime")


def case(spec: RunSpec) -> Case:
    """The scenario's run as an equivalence case (all ranks' tokens make the global batch)."""
    return Case(
        name=spec.name,
        moe=spec.moe_config(),
        placement=spec.parallel["placement"],
        num_tokens=spec.workload["tokens_per_rank"] * spec.world_size,
        seed=spec.workload["seed"],
        layers=spec.model["layers"],
        skew=spec.workload["skew"],
        skew_param=spec.workload["skew_param"],
        offload=offload_config(spec),
        par_extra={"overlap_chunks": chunks} if (chunks := spec.parallel.get("overlap_chunks")) else {},
        dispatcher="all_to_all" if chunks else "auto",  # chunks: collectives even at W = 1
    )


def window_tokens(spec: RunSpec) -> int:
    """Tokens processed, over all ranks, inside the telemetry window: one forward + backward (with
    offload: the resident forward and the offloaded one, each of the same tokens, counted once)."""
    return spec.workload["tokens_per_rank"] * spec.world_size


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """This rank's forward and backward of the case (``run_rank``), under the sampler; with ``[model] impl``
    the implementation's forward on the whole batch (world size 1)."""
    with sampler(ctx, interval) as s:
        out = impl_forward(spec, ctx.device) if _impl(spec) != adapters.RUNTIME else run_rank(ctx, case(spec))
    out["telemetry"] = s.summary()
    return out


def _impl(spec: RunSpec) -> str:
    return spec.model.get("impl", adapters.RUNTIME)


def validate(spec: RunSpec) -> None:
    """``[model] impl``: one layer at world size 1, an implementation that can express the layer."""
    check_impl(spec)


def impl_inputs(spec: RunSpec) -> tuple[Case, list[MoEWeights], torch.Tensor]:
    """The case, its seeded weights without the skew calibration's router offset (no family's router has a
    bias: the implementation and the reference both get ``init_weights``' tensors) and its tokens."""
    c = case(spec)
    weights, x_ND, _ = make_inputs(c)
    return c, [dataclasses.replace(w, router_bias_E=None) for w in weights], x_ND


def impl_forward(spec: RunSpec, device: torch.device | str = "cpu") -> dict:
    """The implementation's output on the case's tokens and weights (forward only, no gradients), computed on
    the run's ``device``; with the decoder keys, a whole decoder's and our own decoder's on one sequence
    (``impl_decoder``)."""
    if impl_decoder.is_decoder(spec):
        return impl_decoder.forward(spec, _impl(spec), device)
    c, weights, x_ND = impl_inputs(spec)
    module = adapters.build(_impl(spec), weights, c.moe).to(device)
    with torch.no_grad():
        out_ND = module(x_ND.to(device, c.moe.torch_dtype))
    return {"out": out_ND.float().cpu(), "impl": _impl(spec)}


def first_difference(
    out_ND: torch.Tensor, ref_ND: torch.Tensor, weights: MoEWeights, cfg: MoEConfig, x_ND: torch.Tensor, tol: float
) -> dict | None:
    """Where an implementation's output first leaves the reference's ``ref_ND``: the first token whose row
    error ‖out_t − ref_t‖ exceeds tol · ‖ref‖/√N, and the expert that explains most of that row's difference
    (the difference fitted by least squares on every expert's own fp64 output for the token; the expert of the
    largest term |c_e| · ‖expert_e(x_t)‖). None when no row differs."""
    if out_ND.shape != ref_ND.shape:
        shapes = f"output shape {tuple(out_ND.shape)}, reference {tuple(ref_ND.shape)}"
        return {"token": 0, "expert": None, "detail": shapes}
    t = impl_decoder.first_position(out_ND, ref_ND, tol)  # the same row rule as a decoder's first position
    if t is None:
        return None
    diff_ND = out_ND.double() - ref_ND
    one = MoEConfig(cfg.hidden_size, cfg.ffn_hidden_size, 1, activation=cfg.activation)  # one expert, weight 1
    columns = []
    for e in range(cfg.num_experts):  # each expert's own output for token t
        single = MoEWeights(torch.zeros(1, cfg.hidden_size), weights.w_in_EDH[e : e + 1], weights.w_down_EFD[e : e + 1])
        columns.append(reference_moe(x_ND[t : t + 1].double(), single, one).out_ND[0])
    basis_DE = torch.stack(columns, dim=1)
    coef_E = torch.linalg.lstsq(basis_DE, diff_ND[t].nan_to_num().unsqueeze(1)).solution[:, 0]
    e = int((coef_E.abs() * basis_DE.norm(dim=0)).argmax())
    return {
        "token": t,
        "expert": e,
        "detail": f"token {t}, expert {e} (weighted {coef_E[e].item():+.3g} off the reference)",
    }


def _evaluate_impl(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    """An implementation against the fp64 reference: the forward's relative error, and where it first differs."""
    if impl_decoder.is_decoder(spec):
        return impl_decoder.evaluate(spec, per_rank, _impl(spec), TOLERANCE[spec.model["dtype"]])
    c, weights, x_ND = impl_inputs(spec)
    out = per_rank[0]["out"]
    ref = reference_moe(x_ND.double(), weights[0], c.moe).out_ND
    error = rel_error(out, ref) if out.shape == ref.shape else float("inf")
    tol = TOLERANCE[spec.model["dtype"]]
    where = first_difference(out, ref, weights[0], c.moe, x_ND, tol) if not error <= tol else None
    detail = f"{_impl(spec)} forward vs the fp64 reference: {error:.2e}, tolerance {tol:g}"
    if where is not None:
        detail += f"; first differs at {where['detail']}"
    finite = error < float("inf")  # a wrong shape or a NaN: no number to record, the check says why
    metrics = {"rel_error_forward": M.metric([error], "ratio", "lower", exact=True)} if finite else {}
    checks = [{"name": "rel_error_within_tolerance", "pass": error <= tol, "detail": detail}]
    return metrics, checks, {"compared": "output (forward only)", "impl": _impl(spec), "first_difference": where}


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    """The worst relative error against the reference, and dropped copies against the reference's
    (with offload: the forward only, and each rank's output bitwise the resident stack's)."""
    if _impl(spec) != adapters.RUNTIME:
        return _evaluate_impl(spec, per_rank)
    ep, ref = assemble(per_rank), run_reference(case(spec), spec.world_size)
    errors = compare(ep, ref)
    forward = errors["out"]
    grads = [v for k, v in errors.items() if k.startswith("grad_")]
    worst_name = max(errors, key=errors.get)
    tol = TOLERANCE[spec.model["dtype"]]
    metrics = {
        "rel_error_forward": M.metric([forward], "ratio", "lower", exact=True),
        "tokens_dropped": M.metric([ep.tokens_dropped], "copies", "lower", exact=True),
    }
    if grads:
        metrics["rel_error_grad"] = M.metric([max(grads)], "ratio", "lower", exact=True)
    compared = "output, aux and z losses" + (", every gradient" if grads else " (offload: forward only)")
    checks = [
        {
            "name": "rel_error_within_tolerance",
            "pass": errors[worst_name] <= tol,  # NaN or inf never passes
            "detail": f"worst of {len(errors)} ({compared}): {worst_name} {errors[worst_name]:.2e}, tolerance {tol:g}",
        },
        {
            "name": "tokens_dropped_match_reference",
            "pass": ep.tokens_dropped == ref.tokens_dropped,
            "detail": f"{ep.tokens_dropped} dropped, reference {ref.tokens_dropped}",
        },
    ]
    if "bitwise_resident" in per_rank[0]:
        same = [r["bitwise_resident"] for r in per_rank]
        checks.append(
            {
                "name": "offload_bitwise_resident",
                "pass": all(same),
                "detail": f"offloaded output bitwise the all-resident stack's on {sum(same)} of {len(same)} ranks",
            }
        )
    return metrics, checks, {"compared": compared}
