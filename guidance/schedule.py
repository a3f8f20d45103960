"""The embedding schedule of Diff-Privacy (paper Eq. 16), as native ComfyUI timestep ranges.

At DDPM timestep t (0..T-1, T = 1000 for SD 1.5) the noise predictor is conditioned on

    UC          if t <= tau * T
    C^{t//100}  otherwise          (ten stages, stage i covers t in [100 i, 100 i + 99])

ComfyUI expresses "this conditioning is active only for part of sampling" with the
``start_percent`` / ``end_percent`` keys of a conditioning entry (what the stock
ConditioningSetTimestepRange node sets). For the discrete SD schedule a percent p maps to
the sigma of the fractional timestep (1 - p) * (T - 1), and the model rounds a sigma to the
nearest timestep in log-sigma. So putting every boundary half-way between two integer
timesteps makes each entry active on exactly its integer timesteps, whatever the sampler's
sigmas are, and the entries never overlap.
"""
from __future__ import annotations

import math

import torch

NUM_STAGES = 10
STAGE_WIDTH = 100  # DDPM timesteps per stage
NUM_TIMESTEPS = 1000


def stage_of(t, num_timesteps: int = NUM_TIMESTEPS):
    """Stage index i = t // 100 of a DDPM timestep (paper: C^{t//100}); ten equal stages for any T.

    ``t`` an int (returns an int) or a tensor of timesteps (returns a tensor).
    """
    if isinstance(t, torch.Tensor):
        return ((t * NUM_STAGES) // num_timesteps).clamp(max=NUM_STAGES - 1)
    return min(int(t) * NUM_STAGES // num_timesteps, NUM_STAGES - 1)


def last_uncond_timestep(tau: float, num_timesteps: int = NUM_TIMESTEPS) -> int:
    """The largest integer timestep that gets UC: t <= tau*T  <=>  t <= floor(tau*T) (capped at T - 1).

    The one definition of the tau switch: the schedule's ranges and the guidance scale's switch both use it.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    return min(math.floor(tau * num_timesteps), num_timesteps - 1)


def uses_uncond(t: int, tau: float, num_timesteps: int = NUM_TIMESTEPS) -> bool:
    """True where the schedule uses UC: t <= tau * T, as the paper states it (tests check the ranges against it)."""
    return t <= tau * num_timesteps


def stage_timestep_ranges(tau: float, num_timesteps: int = NUM_TIMESTEPS):
    """Integer timestep intervals of the schedule, as (stage, lo, hi) with stage None for UC.

    Intervals are inclusive, disjoint and cover 0..T-1; empty ones are left out.
    """
    last_uc = last_uncond_timestep(tau, num_timesteps)
    ranges = [(None, 0, last_uc)]
    for i in range(NUM_STAGES):
        lo, hi = max(i * STAGE_WIDTH, last_uc + 1), min(i * STAGE_WIDTH + STAGE_WIDTH - 1, num_timesteps - 1)
        if i == NUM_STAGES - 1:
            hi = num_timesteps - 1
        if lo <= hi:
            ranges.append((i, lo, hi))
    return ranges


def timestep_range_to_percent(lo: int, hi: int, num_timesteps: int = NUM_TIMESTEPS):
    """(start_percent, end_percent) making a conditioning active on integer timesteps lo..hi."""
    last = num_timesteps - 1
    start = 0.0 if hi >= last else 1.0 - (hi + 0.5) / last
    end = 1.0 if lo <= 0 else 1.0 - (lo - 0.5) / last
    return start, end


def scheduled_conditioning(stages, uncond, tau: float):
    """Build the scheduled CONDITIONING.

    ``stages``: ten ComfyUI conditioning entries ``[tensor, dict]`` (C^0..C^9);
    ``uncond``: one entry (UC). Returns a CONDITIONING list whose entries carry
    ``start_percent`` / ``end_percent`` (and a ``diffprivacy_stage`` tag: the stage index, or -1 for UC).
    """
    if len(stages) != NUM_STAGES:
        raise ValueError(f"the embedding schedule needs {NUM_STAGES} stage conditionings (C^0..C^9), got {len(stages)}")
    out = []
    for stage, lo, hi in stage_timestep_ranges(tau):
        tensor, extra = uncond if stage is None else stages[stage]
        start, end = timestep_range_to_percent(lo, hi)
        entry = dict(extra)
        entry.update(start_percent=start, end_percent=end, diffprivacy_stage=-1 if stage is None else stage)
        out.append([tensor, entry])
    return out
