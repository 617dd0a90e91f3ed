"""Kernel shares for `amppatch tune`: how much of the profiled CPU time each site's kernel takes (pure).

A site's share is the sample share of its function in the profile's `hot_functions` (every sampled
symbol whose site name is the site's function; failing that, whose bare name is); failing both, the sum of
the profile's loop shares for that function. It weighs the site in the budget split
(amppatch/tune/budget.py) and decides `--min-share`.

Why `--min-share` defaults to 0.05: a kernel with share s can lift the whole token rate by at most
s × (1 − 1/g) when prefetching speeds it up g-fold; a 5 % kernel is worth at most 1.7 % at g = 1.5 (the top
of what software prefetch wins) and 0.5 % at g = 1.1 — at or below what a confirmation probe resolves, so
below it the time is better spent on the hot kernels. The profile's own floor is per loop (a loop with
under 2 % of the in-token CPU time never becomes a site, amppatch/profile/sites.py `SITE_MIN_SHARE`);
`--min-share` is applied on top of it, per kernel, to the sites the profile did produce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_MIN_SHARE = 0.05


def kernel_share(site: Mapping[str, Any], hot_functions: Sequence[Mapping[str, Any]],
                 profile_sites: Sequence[Mapping[str, Any]]) -> float | None:
    """The sample share of a site's kernel (see the module docstring); None when the profile does not know it.
    `site` is an apply manifest's site (`function`, and `requested`: the name the request used)."""
    from amppatch.profile.derive import bare_name, site_function_name

    names = [n for n in (site.get("function"), site.get("requested")) if n]
    for name in names:
        exact = sum(float(h.get("share") or 0) for h in hot_functions
                    if h.get("name") and site_function_name(str(h["name"])) == name)
        if exact > 0:
            return exact
    for name in names:
        loose = sum(float(h.get("share") or 0) for h in hot_functions
                    if h.get("name") and bare_name(str(h["name"])) == bare_name(str(name)))
        if loose > 0:
            return loose
    loops = sum(float(s.get("share") or 0) for s in profile_sites if s.get("function") in names)
    return loops if loops > 0 else None
