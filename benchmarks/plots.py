"""Figures of the benchmark results, written as PNGs next to their tables in benchmarks/results/.

The benchmark scripts call these functions after writing their tables; ``python
benchmarks/plots.py`` redraws every figure from the committed results without rerunning anything:

* models.png   CAVI vs NUTS vs SVI AutoNormal per textbook model (models.json): first-call time
  and max |mean - mean_NUTS| / sd_NUTS;
* datagen.png  adaptive NUTS vs fixed-step HMC (datagen.md's table; the benchmark writes no
  JSON): RMSE / sd per family, NUTS at its default settings and at the baseline's wall time;
* oracles.png  neural oracle error / NUTS data error per family, best pair of each training
  protocol (oracles.json), with the goal of 0.5;
* flows.png    PSIS k-hat over the test eta per family and flow, at equal time with NUTS (the
  flows.json rows of the version that flows.md reports).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from models import versus  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_models(rows: dict, path: Path) -> None:
    """Per model: first-call seconds of CAVI, NUTS and SVI, and each approximation's max
    |dmean| / NUTS sd. ``rows`` are models.json's results ({"<model>|<method>": row})."""
    names = list(dict.fromkeys(k.split("|")[0] for k in rows))
    y = np.arange(len(names))
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 0.32 * len(names) + 1.6), sharey=True)
    for offset, (method, label) in zip((-0.25, 0.0, 0.25),
                                       (("cavi", "CAVI"), ("nuts", "NUTS"), ("svi", "SVI")),
                                       strict=True):
        seconds = [rows.get(f"{n}|{method}", {}).get("first_s", np.nan) for n in names]
        ax_t.barh(y + offset, seconds, height=0.25, label=label)
        if method != "nuts":
            errors = [versus(rows.get(f"{n}|{method}", {}), rows.get(f"{n}|nuts", {}))
                      for n in names]
            ax_e.scatter([np.nan if e is None else e["z"] for e in errors], y, label=label,
                         marker="o" if method == "cavi" else "x")
    ax_t.set_xscale("log")
    ax_t.set_xlabel("first call, s (compilation included)")
    ax_t.set_yticks(y, names)
    ax_t.invert_yaxis()
    ax_t.legend(loc="upper center", bbox_to_anchor=(0.5, -0.03 - 0.5 / len(names)), ncols=3)
    ax_e.set_xscale("log")
    ax_e.axvline(0.5, color="grey", ls="--", lw=1)
    ax_e.set_xlabel("max |mean - mean_NUTS| / sd_NUTS (dashed: 0.5)")
    ax_e.legend(loc="upper center", bbox_to_anchor=(0.5, -0.03 - 0.5 / len(names)), ncols=2)
    fig.suptitle("CAVI vs NUTS vs SVI AutoNormal on textbook models")
    _save(fig, path)


def markdown_table(text: str) -> list[dict]:
    """The rows of the first markdown table in ``text``, as {header: cell}."""
    lines = text[text.index("\n|") + 1:].split("\n\n")[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:]]


def plot_datagen(table: list[dict], path: Path) -> None:
    """RMSE / sd per family and method, from the rows of datagen.md's table."""
    families = list(dict.fromkeys(r["family"] for r in table))
    methods = list(dict.fromkeys(r["method"] for r in table))
    x = np.arange(len(families))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, method in enumerate(methods):
        cells = {r["family"]: r for r in table if r["method"] == method}
        values = [float(cells[f]["RMSE / sd"]) if f in cells else np.nan for f in families]
        walls = [cells[f]["wall s"] if f in cells else "" for f in families]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=method)
        ax.bar_label(bars, [f"{w} s" for w in walls], fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, [textwrap.fill(f, 20) for f in families], fontsize=8)
    ax.set_ylabel("RMSE of E[T] / exact sd")
    ax.set_title("NUTS vs fixed-step HMC (labels: wall seconds)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _grouped_positions(num_groups: int, num_series: int) -> tuple[np.ndarray, list, float]:
    """Bar positions of a grouped chart: (group centres, each series' positions, width)."""
    x = np.arange(num_groups)
    width = 0.8 / num_series
    return x, [x + (i - (num_series - 1) / 2) * width for i in range(num_series)], width


def plot_oracles(rows: dict, path: Path) -> None:
    """Best ratio (network error / NUTS data error, both against exact) per family and
    protocol. ``rows`` are oracles.json's results."""
    best: dict[tuple[str, str], float] = {}
    for r in rows.values():
        if "error" in r or not np.isfinite(r.get("ratio", np.nan)):
            continue
        key = (r["family"], r["protocol"])
        best[key] = min(best.get(key, np.inf), r["ratio"])
    families = list(dict.fromkeys(f for f, _ in best))
    protocols = list(dict.fromkeys(p for _, p in best))
    x, positions, width = _grouped_positions(len(families), len(protocols))
    fig, ax = plt.subplots(figsize=(10, 4))
    for pos, protocol in zip(positions, protocols, strict=True):
        ax.bar(pos, [best.get((f, protocol), np.nan) for f in families], width, label=protocol)
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="goal 0.5")
    ax.set_yscale("log")
    ax.set_xticks(x, families, fontsize=8, rotation=15)
    ax.set_ylabel("oracle nRMSE / NUTS data nRMSE")
    ax.set_title("Neural oracle error against exact answers (best architecture per protocol)")
    ax.legend(fontsize=8, ncols=5)
    _save(fig, path)


def plot_flows(rows: dict, path: Path) -> None:
    """PSIS k-hat over the test eta (median, 90th percentile, max) at equal time with NUTS, per
    family and flow. ``rows``: {(family, architecture): row} of one code version (NUTS rows are
    ignored)."""
    rows = {k: r for k, r in rows.items() if r.get("kind") == "flow" and "error" not in r}
    families = list(dict.fromkeys(f for f, _ in rows))
    archs = list(dict.fromkeys(a for _, a in rows))
    x, positions, _ = _grouped_positions(len(families), len(archs))
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (pos, arch) in enumerate(zip(positions, archs, strict=True)):
        khat = [rows[f, arch]["equal_time"]["khat"] if (f, arch) in rows else None
                for f in families]
        low = [k["median"] if k else np.nan for k in khat]
        high = [k["max"] if k else np.nan for k in khat]
        ax.vlines(pos, low, high, lw=3, color=f"C{i}", label=arch)
        ax.scatter(pos, [k["q90"] if k else np.nan for k in khat], color="black", marker="_",
                   s=120, zorder=3)
    ax.axhline(0.7, color="grey", ls="--", lw=1, label="0.7")
    ax.set_xticks(x, families, fontsize=8)
    ax.set_ylabel("PSIS k-hat per eta")
    ax.set_title("Flow samplers at NUTS's cost per eta: k-hat from median to max (tick: 90%)")
    ax.legend(fontsize=8, ncols=6)
    _save(fig, path)


def reported_flow_rows(results: dict, report: str) -> dict:
    """The flows.json rows of the code version that flows.md reports, by (family, unit)."""
    match = re.search(r"\): ([0-9a-f]{12}) \(every unit in this report", report)
    if match is None:
        raise ValueError("flows.md does not name the code version of its units")
    return {(r["family"], r["architecture"] if r["kind"] == "flow" else "nuts"): r
            for r in results.values() if r["code"]["package_sha"] == match.group(1)}


def _results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())["results"]


def main() -> None:
    plot_models(_results("models"), RESULTS / "models.png")
    plot_datagen(markdown_table((RESULTS / "datagen.md").read_text()), RESULTS / "datagen.png")
    plot_oracles(_results("oracles"), RESULTS / "oracles.png")
    plot_flows(reported_flow_rows(_results("flows"), (RESULTS / "flows.md").read_text()),
               RESULTS / "flows.png")
    print(f"wrote models, datagen, oracles and flows .png in {RESULTS}")


if __name__ == "__main__":
    main()
