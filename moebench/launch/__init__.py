"""Process life: spawning and joining the ranks (``spawn``), the rank entry point (``rank_entry``) and
the watchdog that names a rank that died or went silent (``watchdog``)."""
