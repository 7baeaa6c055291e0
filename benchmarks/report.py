"""
The benchmark's outputs: results.csv, results.md, throughput.png, and
results.json (rows and run context) from which the others can be redrawn:

    python -m benchmarks.report benchmarks/results
"""

import csv
import json
import os
import sys

COLUMNS = (
    "system", "mode", "channels", "published_per_s", "delivered_per_s", "lost", "p50_ms", "p99_ms",
)
# The offered rate (0: flat out), how long a publish waited for its
# acknowledgement, the ordering violations the subscribers saw (ordered
# modes only), CPU microseconds per event (all replicas together, the
# publisher, the busiest subscriber), then the reason a row has no
# figures (unavailable, failed), after the columns every reader relies on.
CSV_COLUMNS = COLUMNS + (
    "rate", "ack_p50_ms", "ack_p99_ms", "out_of_order",
    "replica_cpu_us", "publisher_cpu_us", "subscriber_cpu_us", "note",
)

CEILING = ("null-relay", "relay")
COLOURS = {
    "null-relay": "black",
    "fitbroker": "tab:blue",
    "mosquitto": "tab:orange",
    "nats": "tab:green",
    "redis": "tab:red",
}
# FIT Broker's modes are the subject: each its own colour.
MODE_COLOURS = {
    "cft": "tab:blue",
    "bft-ha": "tab:purple",
    "bft-pks": "tab:cyan",
    "bft-pke": "tab:brown",
    "bft-ordered": "tab:pink",
    "bft-ordered-global": "tab:red",
    "cft-ordered": "tab:green",
}


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in CSV_COLUMNS})


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(value):
    if value in (None, ""):
        return None
    return float(value)


def ceiling_by_channels(rows):
    return {
        int(row["channels"]): _number(row["delivered_per_s"])
        for row in rows
        if (row["system"], row["mode"]) == CEILING and _number(row["delivered_per_s"])
    }


def _fmt(value, digits=0):
    value = _number(value)
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _cpu(row):
    figures = [_number(row.get(key)) for key in ("replica_cpu_us", "publisher_cpu_us", "subscriber_cpu_us")]
    if all(value is None for value in figures):
        return "-"
    return ", ".join("-" if value is None else f"{value:.0f}" for value in figures)


def write_markdown(path, rows, context):
    """
    A table of every measured point, each with its delivered rate as a share
    of the null relay's at the same channel count, and a list of what could
    not be measured and why.
    """
    ceiling = ceiling_by_channels(rows)
    rate = _number(context.get("rate"))
    load = (
        f"each publisher offers {rate:,.0f} events/s" if rate
        else "publishers publish flat out (latency is then mostly queueing)"
    )
    lines = [
        "# Throughput against channels",
        "",
        f"`{context['command']}`",
        "",
        f"{context['cores']} cores (load average {context.get('load', '?')} at the start), "
        f"commit {context['commit']}, {context['when']}; "
        f"{context['replicas']} replicas (f={context['faults']}), {context['event_size']}-byte events, "
        f"{context['seconds']} s per point, {context['publishers']} publisher and "
        f"{context.get('subscribers', 1)} subscriber process(es) per point; {load}.",
        "",
        "| system | mode | channels | published/s | delivered/s | lost | out of order | p50 ms | p99 ms "
        "| ack p50 ms | CPU µs/event: replicas, pub, sub | share of null relay | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    unavailable = {}
    for row in rows:
        note = row.get("note") or ""
        if note.startswith("unavailable") and _number(row.get("delivered_per_s")) is None:
            unavailable.setdefault((row["system"], row["mode"]), note)
            continue
        delivered = _number(row["delivered_per_s"])
        top = ceiling.get(int(row["channels"]))
        share = f"{100 * delivered / top:.0f}%" if delivered and top else "-"
        lines.append(
            f"| {row['system']} | {row['mode']} | {row['channels']} | "
            f"{_fmt(row['published_per_s'])} | {_fmt(row['delivered_per_s'])} | "
            f"{_fmt(row['lost'])} | {_fmt(row.get('out_of_order'))} | "
            f"{_fmt(row['p50_ms'], 1)} | {_fmt(row['p99_ms'], 1)} | {_fmt(row.get('ack_p50_ms'), 1)} | "
            f"{_cpu(row)} | "
            f"{share} | {note} |"
        )
    lines += _disk_lines(rows, context.get("disk"))
    if unavailable:
        lines += ["", "Not measured:", ""]
        for (system, mode), note in unavailable.items():
            lines.append(f"- {system} {mode}: {note}")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _disk_lines(rows, disk):
    """
    Where disk channels kept their data, what one fsync costs there, and
    each disk mode's delivered rate as a share of the memory mode of the
    same QoP at the same channel count (C{cft-disk-always} against C{cft}).
    """
    if not disk:
        return []
    lines = [
        "",
        f"Disk channels: data folders on {disk['filesystem']} ({disk['folder']}); "
        f"{disk['fsyncs']} appends of 4 KiB each followed by fsync took "
        f"{disk['median_ms']:.2f} ms median, {disk['p99_ms']:.2f} ms p99.",
    ]
    delivered = {
        (row["system"], row["mode"], int(row["channels"])): _number(row["delivered_per_s"]) for row in rows
    }
    shares = []
    for (system, mode, channels), rate in delivered.items():
        if system != "fitbroker" or "-disk-" not in mode:
            continue
        memory_mode = mode.split("-disk-")[0]
        memory_mode = "bft-ha" if memory_mode == "bft" else memory_mode
        memory = delivered.get((system, memory_mode, channels))
        if rate and memory:
            shares.append(f"{mode} {channels}ch {100 * rate / memory:.0f}% of {memory_mode}")
    if shares:
        lines += ["", "Delivered/s as a share of memory channels: " + ", ".join(shares) + "."]
    return lines


def plot(path, rows, context):
    """
    Events/s against channels, publisher side and subscriber side, one line
    per system and mode, in the manner of the paper's Figure 3.
    """
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install '.[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series = {}
    for row in rows:
        if _number(row.get("delivered_per_s")) is None and _number(row.get("published_per_s")) is None:
            continue
        series.setdefault((row["system"], row["mode"]), []).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    markers = "osD^v<>ph*"
    for number, ((system, mode), points) in enumerate(series.items()):
        points.sort(key=lambda r: int(r["channels"]))
        x = [int(r["channels"]) for r in points]
        style = {
            "marker": markers[number % len(markers)],
            "label": f"{system} {mode}",
            "color": MODE_COLOURS.get(mode, "tab:olive")
            if system == "fitbroker"
            else COLOURS.get(system, "grey"),
        }
        if (system, mode) == CEILING:
            style.update(linestyle="--")
        elif system == "fitbroker":
            style.update(linewidth=2.5)
        else:
            style.update(linewidth=1.2, linestyle="-." if mode.endswith("-batch") else ":")
        for axis, key in zip(axes, ("published_per_s", "delivered_per_s")):
            y = [_number(r[key]) for r in points]
            axis.plot(x, [v if v is not None else float("nan") for v in y], **style)
    thousands = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:,.0f}k")
    for axis, title in zip(axes, ("publisher", "subscriber")):
        axis.set_title(f"{title} events/s")
        axis.set_xlabel("channels")
        axis.grid(True, alpha=0.3)
        axis.set_ylim(bottom=0)
        axis.yaxis.set_major_formatter(thousands)
    axes[0].set_ylabel("events/s")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.text(
        0.5, 0.01,
        f"{context['cores']} cores, commit {context['commit']}; {context['replicas']} replicas "
        f"(f={context['faults']}), {context['event_size']}-byte events, {context['seconds']} s per point, "
        + (f"{_number(context['rate']):,.0f} events/s offered, " if _number(context.get("rate")) else "")
        + "loopback",
        ha="center", fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.04, 0.83, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/"


def _frame(text, with_line):
    """
    C{function (file:line)} of a py-spy frame C{function (path:line)}, the
    path shortened to the package or the checkout; without C{with_line},
    C{function (file)}.
    """
    name, _, where = text.rpartition(" (")
    if not name:
        return text
    path, _, line = where.rstrip(")").rpartition(":")
    for marker in ("site-packages/", "/lib/python3.", _CHECKOUT):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib/python3."):
                path = path.split("/", 1)[-1]
    return f"{name} ({path}:{line})" if with_line else f"{name} ({path})"


def summarise_samples(path, top=25):
    """
    Return a text summary of py-spy's collapsed stacks in C{path}: the share
    of samples idle in the reactor's poll, then the busiest lines (self
    time) and FIT Broker's functions (inclusive), each as a share of the
    main thread's samples (other threads, such as the driver's stdin
    reader, only wait).
    """
    own = {}
    inclusive = {}
    total = idle = others = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            count = int(count)
            frames = stack.split(";")
            if frames[0].startswith("Thread._bootstrap ("):
                others += count
                continue
            total += count
            if "doPoll" in frames[-1] or frames[-1].startswith("poll "):
                idle += count
            leaf = _frame(frames[-1], True)
            own[leaf] = own.get(leaf, 0) + count
            for name in {_frame(frame, False) for frame in frames}:
                if "(fit_broker/" in name:
                    inclusive[name] = inclusive.get(name, 0) + count
    if not total:
        return f"{path}: no samples\n"
    lines = [
        f"{os.path.basename(path)}: {total} samples of the main thread, "
        f"{100 * idle / total:.0f}% idle in the reactor's poll ({others} of other threads left out)",
        "",
    ]
    tables = (("self time, by line", own), ("inclusive time, by function of fit_broker", inclusive))
    for title, table in tables:
        lines.append(title)
        for name, count in sorted(table.items(), key=lambda item: -item[1])[:top]:
            lines.append(f"{100 * count / total:6.1f}%  {name}")
        lines.append("")
    return "\n".join(lines)


def write_all(folder, rows, context, with_plot=True):
    os.makedirs(folder, exist_ok=True)
    write_csv(os.path.join(folder, "results.csv"), rows)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"context": context, "rows": rows}, f, indent=1)
    write_markdown(os.path.join(folder, "results.md"), rows, context)
    if with_plot:
        problem = plot(os.path.join(folder, "throughput.png"), rows, context)
        if problem:
            print(problem, file=sys.stderr)


def main(argv=None):
    folder = (argv if argv is not None else sys.argv[1:] or [os.path.join("benchmarks", "results")])[0]
    with open(os.path.join(folder, "results.json")) as f:
        saved = json.load(f)
    write_all(folder, saved["rows"], saved["context"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
