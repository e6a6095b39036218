"""CPU offload of experts (runtime/offload.py, MoEStack's offload): the invariants the issue names.

- outputs with offload are bitwise the all-resident stack's, for every policy and prefetch, at
  every cache size, on 1 and 2 ranks;
- the device never holds more than ``cache_slots`` experts' weights per layer;
- with a slot per expert, every access after the first step hits;
- oracle prefetch is always right; a next-layer guess is scored against what was used.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from moebench.launch.spawn import launch
from moebench.workload.tokens import layer_weights, token_stream
from runtime import MoEConfig, ParallelConfig, cache_policy
from runtime.offload import PREFETCH, OffloadConfig
from runtime.stack import MoEStack

MOE = MoEConfig(16, 32, 8, top_k=2, activation="swiglu", capacity_factor=1.25)
LAYERS, STEPS, TOKENS = 3, 6, 4


def _stacks(config: OffloadConfig, ep: int = 1, group=None, rank: int = 0):
    """(resident stack, offloaded stack with the stream recorded, the stream) on CPU."""
    weights = layer_weights(MOE, LAYERS, 0, "uniform", None)
    par = ParallelConfig(ep_size=ep)
    resident = MoEStack(MOE, par, weights, group, "cpu")
    stream = token_stream(STEPS, TOKENS, MOE.hidden_size, 0, rank, 0.8)
    with torch.no_grad():
        recorded = [resident.needed_experts(resident(x)[1]) for x in stream]
    # the tests run the stream twice: Belady plans both passes
    offloaded = MoEStack(MOE, par, weights, group, "cpu", offload=config, recorded=recorded, horizon=2 * STEPS)
    return resident, offloaded, stream


def _caches(stack: MoEStack) -> list:
    return [layer.experts.cache for layer in stack.layers]


SLOTS, POLICIES = (1, 3, 8), ("lru", "lfu", "belady")
# Every (slots, policy, prefetch); the unit suite runs a Latin square of them (each pair of the three settings
# meets once: slots i, policy j, prefetch (i + j) mod 3), the slow session all 27.
CONFIGS = [
    pytest.param(
        OffloadConfig(slots, policy, prefetch),
        id=f"{slots}-{policy}-{prefetch}",
        marks=() if (i + j) % len(PREFETCH) == PREFETCH.index(prefetch) else pytest.mark.slow,
    )
    for (i, slots), (j, policy), prefetch in itertools.product(enumerate(SLOTS), enumerate(POLICIES), PREFETCH)
]


@pytest.mark.parametrize("config", CONFIGS)
def test_offloaded_stack_is_bitwise_the_resident_one_and_never_holds_more_than_its_slots(config):
    resident, offloaded, stream = _stacks(config)
    caches = _caches(offloaded)
    most = [0] * LAYERS
    for i, cache in enumerate(caches):  # watch residency at every load
        load = cache._load

        def watched(e, keep=frozenset(), cache=cache, load=load, i=i):
            load(e, keep)
            most[i] = max(most[i], len(cache.slot_of))

        cache._load = watched
    with torch.no_grad():
        for k in range(2 * STEPS):  # twice round the stream: Belady's replay wraps
            x_TD = stream[k % STEPS]
            assert torch.equal(offloaded(x_TD)[0], resident(x_TD)[0]), k
    assert max(most) <= config.cache_slots
    for cache in caches:  # the slots are the only device storage of the experts
        assert cache.slot_in_SDH.shape[0] == cache.slot_down_SFD.shape[0] == config.cache_slots
    assert all(list(layer.experts.parameters()) == [] for layer in offloaded.layers)


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_with_a_slot_per_expert_each_expert_misses_once_then_every_access_hits(policy):
    _, offloaded, stream = _stacks(OffloadConfig(8, policy))
    with torch.no_grad():
        for x_TD in stream:  # the first pass: only first uses miss
            offloaded(x_TD)
        first_pass = [list(cache.stats.misses_E) for cache in _caches(offloaded)]
        for cache in _caches(offloaded):
            cache.reset_stats()
        for x_TD in stream:  # the second: every expert is resident
            offloaded(x_TD)
    assert all(m <= 1 for misses in first_pass for m in misses) and sum(map(sum, first_pass)) > 0
    for cache in _caches(offloaded):
        assert cache.stats.accesses > 0 and cache.stats.hits == cache.stats.accesses
        assert cache.stats.copied_experts == 0 and cache.stats.h2d_bytes == 0


def test_misses_and_bytes_count_what_was_copied():
    _, offloaded, stream = _stacks(OffloadConfig(1, "lru"))
    with torch.no_grad():
        for x_TD in stream:
            offloaded(x_TD)
    for cache in _caches(offloaded):
        st = cache.stats
        assert st.accesses == st.hits + sum(st.misses_E)
        assert st.copied_experts == sum(st.misses_E)  # no prefetch: every copy is a miss
        assert st.h2d_bytes == st.copied_experts * cache.expert_bytes
        assert cache.expert_bytes == (16 * 64 + 32 * 16) * 4  # w_in [D, 2F] and w_down [F, D], fp32


def test_oracle_prefetch_is_always_right_and_next_layer_is_scored_against_use():
    _, oracle, stream = _stacks(OffloadConfig(2, "lru", "oracle"))
    _, guess, _ = _stacks(OffloadConfig(2, "lru", "next_layer"))
    with torch.no_grad():
        for x_TD in stream:
            oracle(x_TD)
            guess(x_TD)
    first, *later = _caches(oracle)
    assert first.stats.predicted == 0  # layer 0 is never prefetched
    for cache in later:
        assert cache.stats.predicted > 0 and cache.stats.prefetch_accuracy == 1.0
        assert cache.stats.needed_copies == cache.stats.copied_experts  # the oracle wastes no copy
    for cache in _caches(guess)[1:]:
        assert 0 < cache.stats.predicted <= TOKENS * MOE.top_k * STEPS  # at most every copy's expert
        assert 0 < cache.stats.prefetch_accuracy < 1  # some guesses missed, here
        assert cache.stats.needed_copies <= cache.stats.copied_experts


def test_a_prefetch_never_evicts_its_own_guess():
    from runtime.offload import ExpertCache

    w_in, w_down = torch.randn(4, 2, 6), torch.randn(4, 3, 2)
    cache = ExpertCache(w_in, w_down, 2, cache_policy.LRU(), "cpu")
    for e in (0, 1):
        cache.weights(e)
    cache.prefetch([1, 2, 3])  # 1 stays; 2 replaces 0 (not named); then both slots hold named experts
    assert set(cache.slot_of) == {1, 2} and cache.stats.copied_experts == 3
    assert torch.equal(cache.slot_in_SDH[cache.slot_of[2]], w_in[2])
    cache.end_forward({2, 3})
    assert (cache.stats.predicted, cache.stats.predicted_used) == (3, 2)


def test_a_prefetch_evicts_an_unnamed_expert_even_when_the_policy_would_pick_a_named_one():
    from runtime.offload import ExpertCache

    w_in, w_down = torch.randn(5, 2, 6), torch.randn(5, 3, 2)
    # LRU: 1 is named and the least recently used resident expert; 0 is not named, so 0 goes
    lru = ExpertCache(w_in, w_down, 2, cache_policy.LRU(), "cpu")
    for e in (1, 0):
        lru.weights(e)
    lru.prefetch([1, 2])
    assert set(lru.slot_of) == {1, 2}
    # LFU: 3, just prefetched, has no accesses (the least frequently used); loading 4 evicts 1 instead
    # (0, 1, 2 each accessed twice: 0 went for 3 as the least recent, then 1)
    lfu = ExpertCache(w_in, w_down, 3, cache_policy.LFU(), "cpu")
    for e in (0, 1, 2, 0, 1, 2):
        lfu.weights(e)
    lfu.prefetch([3, 4])
    assert set(lfu.slot_of) == {2, 3, 4} and lfu.stats.copied_experts == 5
    assert torch.equal(lfu.slot_in_SDH[lfu.slot_of[3]], w_in[3])


def test_needed_copies_count_the_misses_and_the_prefetched_experts_used_not_the_wasted_guesses():
    from runtime.offload import ExpertCache

    cache = ExpertCache(torch.randn(4, 2, 6), torch.randn(4, 3, 2), 2, cache_policy.LRU(), "cpu")
    cache.prefetch([0, 1])  # two copies into the free slots
    for e in cache.begin_forward([0, 2]):  # 0 hits (prefetched, used); 2 misses; 1 was a wasted guess
        cache.weights(e)
    cache.end_forward({0, 2})
    st = cache.stats
    assert (st.copied_experts, st.hits, sum(st.misses_E)) == (3, 1, 1)
    assert st.needed_copies == 2  # the miss on 2 and the used guess 0; not 1
    for e in cache.begin_forward([3]):  # no prefetch: a miss is a needed copy
        cache.weights(e)
    cache.end_forward({3})
    assert (st.copied_experts, st.needed_copies) == (4, 3)


def test_the_next_layer_guess_is_that_layers_router_on_this_layers_input_most_chosen_first():
    _, guess, stream = _stacks(OffloadConfig(8, "lru", "next_layer"))
    named = {}
    for i, layer in enumerate(guess.layers):
        layer.experts.cache.prefetch = lambda experts, i=i: named.setdefault(i, list(experts))
    with torch.no_grad():
        h1 = stream[0] + guess.layers[0](stream[0]).out_TD  # layer 1's input: layer 2's guess reads it
        guess(stream[0])
    for layer, h in ((1, stream[0]), (2, h1)):  # layer l's guess: router l on layer l-1's input
        ids = guess.layers[layer].router(h).ids_TK.reshape(-1).tolist()
        counts = {e: ids.count(e) for e in set(ids)}
        assert sorted(named[layer]) == sorted(counts)  # every expert chosen (at EP 1 all are local)
        assert [counts[e] for e in named[layer]] == sorted(counts.values(), reverse=True)
    assert 0 not in named  # layer 0 is never prefetched


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
@pytest.mark.parametrize("slots", [1, 3])
def test_the_cache_hits_exactly_as_often_as_its_policy_says(policy, slots):
    _, offloaded, stream = _stacks(OffloadConfig(slots, policy))
    with torch.no_grad():
        steps = [offloaded.needed_experts(offloaded(x_TD)[1]) for x_TD in stream + stream]
    for l, cache in enumerate(_caches(offloaded)):
        assert cache.stats.hits == cache_policy.simulate(policy, [step[l] for step in steps], slots)


def test_offload_refuses_gradients_chunks_and_more_slots_than_experts():
    _, offloaded, stream = _stacks(OffloadConfig(2))
    x_TD = stream[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="offloaded experts are inference-only"):
        offloaded(x_TD)
    weights = layer_weights(MOE, 1, 0, "uniform", None)
    chunked = ParallelConfig(overlap_chunks=2)
    with pytest.raises(ValueError, match=r"offload with ParallelConfig\.overlap_chunks = 2 is refused: accepted 1"):
        MoEStack(MOE, chunked, weights, None, "cpu", dispatcher="local", offload=OffloadConfig(2))
    with pytest.raises(ValueError, match=r"cache_slots = 9 is invalid: accepted 1 to 8 \(the experts on this rank\)"):
        MoEStack(MOE, ParallelConfig(), weights, None, "cpu", offload=OffloadConfig(9))
    with pytest.raises(ValueError, match=r"prefetch = 'none' needs recorded: accepted the needed experts"):
        MoEStack(MOE, ParallelConfig(), weights, None, "cpu", offload=OffloadConfig(2, "belady"))
    with pytest.raises(ValueError, match=r"OffloadConfig.prefetch = 'always' is invalid: accepted one of 'none'"):
        OffloadConfig(2, "lru", "always")


def _ep2_rank(ctx, config: OffloadConfig) -> bool:
    torch.set_num_threads(1)
    resident, offloaded, stream = _stacks(config, ep=2, group=ctx.group, rank=ctx.rank)
    with torch.no_grad():
        same = [torch.equal(offloaded(x)[0], resident(x)[0]) for x in stream + stream]
    return all(same) and all(c.stats.accesses > 0 for c in _caches(offloaded))


@pytest.mark.multiproc
@pytest.mark.parametrize("config", [OffloadConfig(1, "belady", "oracle"), OffloadConfig(2, "lfu", "next_layer")])
def test_each_rank_caches_its_own_experts_and_outputs_stay_bitwise_at_ep_2(config):
    assert launch(_ep2_rank, 2, config, device="cpu", backend="gloo") == [True, True]


class _Counting:
    """A stack that counts its forwards (what ``offload.record`` runs), delegating everything else."""

    def __init__(self, stack: MoEStack):
        self.stack, self.forwards = stack, 0

    def __call__(self, x_TD):
        self.forwards += 1
        return self.stack(x_TD)

    def needed_experts(self, outputs):
        return self.stack.needed_experts(outputs)


@pytest.mark.parametrize(("steps", "calls", "forwards"), [(20, 5, 5), (3, 5, 3), (5, 5, 5)])
def test_recording_forwards_only_the_stream_steps_the_timed_rounds_reach(steps, calls, forwards):
    from moebench.measure.offload import record

    resident, _, _ = _stacks(OffloadConfig(1, "lru"))
    counting = _Counting(resident)
    stream = token_stream(steps, TOKENS, MOE.hidden_size, 0, 0, 0.8)
    recorded = record(counting, stream, None, calls)
    assert counting.forwards == forwards == len(recorded)  # was: every step of the stream (65536: minutes)
    with torch.no_grad():
        assert recorded == [resident.needed_experts(resident(x)[1]) for x in stream[:forwards]]


@pytest.mark.parametrize("config", [OffloadConfig(2, "belady"), OffloadConfig(2, "lru", "oracle")], ids=str)
def test_a_recording_cut_to_the_calls_run_gives_the_cache_the_same_hits_as_the_whole_stream(config):
    from moebench.measure.offload import record

    weights, calls = layer_weights(MOE, LAYERS, 0, "uniform", None), 5
    resident = MoEStack(MOE, ParallelConfig(ep_size=1), weights, None, "cpu")
    stream = token_stream(3 * calls, TOKENS, MOE.hidden_size, 0, 0, 0.3)
    stats = []
    for recorded in (record(resident, stream, None, len(stream)), record(resident, stream, None, calls)):
        offloaded = MoEStack(
            MOE, ParallelConfig(ep_size=1), weights, None, "cpu", offload=config, recorded=recorded, horizon=calls
        )
        with torch.no_grad():
            for x_TD in stream[:calls]:
                offloaded(x_TD)
        stats.append([(c.stats.hits, c.stats.accesses, list(c.stats.misses_E)) for c in _caches(offloaded)])
    assert stats[0] == stats[1] and sum(hits for hits, _, _ in stats[0]) > 0
