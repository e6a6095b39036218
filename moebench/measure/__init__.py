"""Measuring on the ranks: one timing helper (``timing``), telemetry (``telemetry``), host state
(``host``), training memory (``memory``), profiler traces (``profile_trace``), the per-expert loop
floors (``floors``), and the rank-side helpers the kinds share (``common``, with the overlap and
offload timings in ``overlap`` and ``offload``)."""
