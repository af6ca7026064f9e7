"""The report's PNG plots, drawn from report.json's numbers alone (matplotlib, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..errors import ConfigError

DPI = 100  # small files: the plots are committed and shown in READMEs
METHOD_COLOURS = {"float": "black", "rtn": "tab:blue", "gptq": "tab:orange", "awq": "tab:green", "awq+gptq": "tab:red", "none": "tab:purple"}


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot
    try:
        import matplotlib
    except ImportError as err:
        raise ConfigError("the report's plots need matplotlib: pip install 'llmcompress[report]' (or pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_available() -> None:
    """Fail before a grid runs, not after it, when matplotlib is missing."""
    _pyplot()


def draw_all(report: dict, out: Path) -> dict[str, str]:
    """Write every plot the report's rows allow; return {kind: file name}."""
    plots = {"pareto": draw_pareto(report, out / "pareto.png")}
    if draw_rank(report, out / "rank.png"):
        plots["rank"] = "rank.png"
    if report["heatmaps"]:
        draw_layer_errors(report, out / "layer_error.png")
        plots["layers"] = "layer_error.png"
    return plots


def _finished(report: dict) -> list[dict]:
    return [row for row in report["rows"] if row["status"] == "ok"]


def draw_pareto(report: dict, path: Path) -> str:
    plt = _pyplot()
    rows = _finished(report)
    from matplotlib.ticker import ScalarFormatter

    figure, axes = plt.subplots(figsize=(10, 6.5))
    for method in dict.fromkeys(row["method"] for row in rows):
        members = [row for row in rows if row["method"] == method]
        axes.scatter([r["bits_per_weight"]["layers"] for r in members], [r["perplexity"] for r in members],
                     color=METHOD_COLOURS.get(method, "tab:gray"), label="16-bit weights (pruning only)" if method == "none" else method,
                     zorder=3)
    front = [next(r for r in rows if r["name"] == name) for name in report["pareto_front"]]
    axes.step([r["bits_per_weight"]["layers"] for r in front], [r["perplexity"] for r in front], where="post", color="gray",
              linestyle="--", label="Pareto front", zorder=2)
    perplexities = [r["perplexity"] for r in rows]
    if max(perplexities) > 3 * min(perplexities):  # a log scale only where it keeps the good rows apart
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ScalarFormatter())
        axes.yaxis.set_minor_formatter(ScalarFormatter())
        axes.tick_params(axis="y", which="minor", labelsize=7)
    axes.set_xlabel("bits per weight of the compressed layers (codes + metadata + low-rank branch)")
    axes.set_ylabel(f"perplexity on {report['protocol']['evaluation']['text']}")
    axes.set_title(f"{report['model']}: quality against size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="method", fontsize=8)
    figure.tight_layout()  # first, so that labels are placed on the final axes
    _place_labels(figure, axes, [(row["name"], row["bits_per_weight"]["layers"], row["perplexity"]) for row in rows])
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path.name


MARKER_RADIUS_POINTS = 3.5  # a scatter marker of the default size, with a little room
# Where a point's label may go, in points from the marker: right, left, then above and below each.
LABEL_OFFSETS = ((5, -3, "left"), (-5, -3, "right"), (5, 5, "left"), (5, -11, "left"), (-5, 5, "right"), (-5, -11, "right"),
                 (5, 13, "left"), (5, -19, "left"), (-5, 13, "right"), (-5, -19, "right"))


def _place_labels(figure, axes, points: list[tuple[str, float, float]]) -> None:  # noqa: ANN001
    """Label each point at the first offset whose text stays inside the axes and covers no label
    placed before it, no other point and not the legend; when every offset covers something,
    at the one that covers least (another label counting most)."""
    from matplotlib.transforms import Bbox

    axes.autoscale_view()
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    legend = axes.get_legend()
    obstacles = [legend.get_window_extent(renderer)] if legend is not None else []
    radius = MARKER_RADIUS_POINTS * figure.dpi / 72
    markers = [Bbox.from_bounds(px - radius, py - radius, 2 * radius, 2 * radius)
               for px, py in axes.transData.transform([(x, y) for _, x, y in points])]
    placed: list = []
    for index in sorted(range(len(points)), key=lambda i: (points[i][1], points[i][2])):
        name, x, y = points[index]
        others = markers[:index] + markers[index + 1:]
        best = None
        for dx, dy, align in LABEL_OFFSETS:
            label = axes.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, ha=align)
            box = label.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            cost = (100 * sum(box.overlaps(other) for other in placed) + 10 * (not inside)
                    + sum(box.overlaps(other) for other in others + obstacles))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label, box)
            else:
                label.remove()
            if cost == 0:
                break
        placed.append(best[2])


def rank_series(report: dict) -> dict[str, list[tuple[int, float]]]:
    """Perplexity against rank for each (quantizer, weights, pruning, branch method), with the
    same configuration without a branch as rank 0 when the grid has it."""
    rows = _finished(report)
    base = {(r["method"], r["weights"], r["pruning"]): r["perplexity"] for r in rows if r["rank"] == 0}
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["rank"]:
            key = (row["method"], row["weights"], row["pruning"])
            label = f"{row['method'].upper()} {row['weights']}{' + ' + row['pruning'] if row['pruning'] else ''} + {row['lowrank_method']}"
            series[label].append((row["rank"], row["perplexity"]))
            if key in base and (0, base[key]) not in series[label]:
                series[label].append((0, base[key]))
    return {label: sorted(points) for label, points in series.items()}


def draw_rank(report: dict, path: Path) -> bool:
    series = rank_series(report)
    if not series:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if report["float_perplexity"] is not None:
        axes.axhline(report["float_perplexity"], color="black", linestyle=":", label="float model")
    axes.set_xlabel("rank of the 16-bit low-rank branch (0: no branch)")
    axes.set_ylabel(f"perplexity on {report['protocol']['evaluation']['text']}")
    axes.set_title("Perplexity against the rank of the error branch")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return True


def draw_layer_errors(report: dict, path: Path) -> None:
    """One heatmap per chosen configuration, layer types x blocks, on one shared log colour scale."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    heatmaps = report["heatmaps"]
    values = [v for h in heatmaps.values() for row in h["output_error"] for v in row if v]
    norm = LogNorm(vmin=min(values), vmax=max(values))
    figure, axes_list = plt.subplots(len(heatmaps), 1, figsize=(10, 1.2 + 1.7 * len(heatmaps)), squeeze=False, layout="constrained")
    image = None
    for axes, (name, heatmap) in zip(axes_list[:, 0], heatmaps.items()):
        matrix = [[v if v else float("nan") for v in row] for row in heatmap["output_error"]]
        image = axes.imshow(matrix, aspect="auto", norm=norm, cmap="magma", interpolation="nearest")
        axes.set_yticks(range(len(heatmap["layer_types"])), heatmap["layer_types"], fontsize=7)
        axes.set_title(name, fontsize=9, loc="left")
        axes.set_xticks(range(heatmap["blocks"]))
        axes.tick_params(axis="x", labelsize=6)
    axes_list[-1, 0].set_xlabel("decoder block", fontsize=8)
    figure.colorbar(image, ax=axes_list[:, 0].tolist(), label="relative output error ||(W - Q)X|| / ||WX||")
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
