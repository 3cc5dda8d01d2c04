"""`--timeline out.png`: phases, layout transitions and KV tier occupancy over a run."""
from __future__ import annotations

from typing import List


def plot_timeline(path: str, steps: List[tuple], transitions: List[dict], title: str = "") -> None:
    """steps: engine.stats.timeline rows; transitions: engine.transitions (with "at")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not steps:
        raise ValueError("nothing to plot: the run recorded no steps")
    t0 = min(s[0] for s in steps)
    fig, (ax_phase, ax_occ) = plt.subplots(2, 1, figsize=(11, 5), sharex=True,
                                           gridspec_kw={"height_ratios": [1, 2]})
    colors = {"prefill": "tab:orange", "decode": "tab:blue"}
    for start, dur, phase, *_ in steps:
        ax_phase.broken_barh([(start - t0, dur)], (0, 1), color=colors[phase], linewidth=0)
    for t in transitions:
        if "at" in t:
            for ax in (ax_phase, ax_occ):
                ax.axvline(t["at"] - t0, color="black", linewidth=0.6, alpha=0.6)
    ax_phase.set_yticks([])
    ax_phase.set_ylabel("phase")
    ax_phase.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()],
                    labels=list(colors), loc="upper right", fontsize=8)
    xs = [s[0] - t0 + s[1] for s in steps]
    ax_occ.plot(xs, [100 * s[4] for s in steps], label="device tier", color="tab:blue")
    ax_occ.plot(xs, [100 * s[5] for s in steps], label="host tier", color="tab:green")
    ax_occ.set_ylabel("KV tier use (%)")
    ax_occ.set_xlabel("seconds (black lines: layout transitions)")
    ax_occ.set_ylim(0, 105)
    ax_occ.legend(loc="upper right", fontsize=8)
    ax_phase.set_title(title or f"{len(transitions)} transitions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
