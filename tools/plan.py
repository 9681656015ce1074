"""Which dp / tp / pp for a cluster: every layout of --gpus GPUs for a config, estimated and ranked.

    python tools/plan.py --config train_configs/7b.toml --gpus 8 --gpus-per-node 8 --hardware a100_80g_nvlink
    python tools/plan.py --config FILE --gpus 16 --gpus-per-node 8 --hardware my_cluster.toml --json
    python tools/plan.py --config train_configs/7b.toml --gpus 8 --layout

With --layout, no search and no hardware: the config's own [parallelism] layout on --gpus ranks,
each pipeline rank's parameters, gradients, optimizer state and gathered FSDP units from the real
plan on a fake process group (dtcollie.parallel.plan), then its activations, buffers and peak.

Per layout: peak memory per GPU (parameters, gradients, optimizer state, activations, buffers,
gathered FSDP units: dtcollie.planner.memory), communication per step per mesh dim
(dtcollie.planner.comm_model) and step time, tokens/GPU/s and MFU (dtcollie.planner.time_model).
The winner is printed as a config fragment to paste. Bundled hardware profiles:
rtx3090_pcie, a100_80g_nvlink, h100_sxm, h200_sxm (or a TOML file of your own with their keys).
"""

import json
import sys

from dtcollie import config as config_module
from dtcollie.cli import run_main
from dtcollie.errors import ConfigError
from dtcollie.parallel.plan import check_plan, format_plan, plan, planning_config
from dtcollie.planner.hardware import load_hardware
from dtcollie.planner.memory import estimate
from dtcollie.planner.search import GIB, Layout, comm_bytes_by_dim, plan_layouts

USAGE = ("usage: python tools/plan.py --config FILE --gpus N (--gpus-per-node G --hardware NAME [--json] "
         "[--top K] | --layout) [--section.key value ...]")
OWN_OPTIONS = {"--gpus": int, "--gpus-per-node": int, "--hardware": str, "--top": int}


def split_options(argv: list[str]) -> tuple[dict, set, list[str]]:
    """This tool's options and flags (--json, --layout) out of argv; the rest are config arguments."""
    options, rest, flags, i = {}, [], set(), 0
    while i < len(argv):
        name, has_value, value = argv[i].partition("=")
        if name in ("--json", "--layout"):
            flags.add(name)
        elif name in OWN_OPTIONS:
            if not has_value:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value; {USAGE}")
                value, i = argv[i + 1], i + 1
            try:
                options[name] = OWN_OPTIONS[name](value)
            except ValueError:
                raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
        else:
            rest.append(argv[i])
        i += 1
    for required in ("--gpus",) if "--layout" in flags else ("--gpus", "--gpus-per-node", "--hardware"):
        if required not in options:
            raise ConfigError(f"{required} is required; {USAGE}")
    return options, flags, rest


def memory_cells(layout: Layout) -> list[str]:
    row = max(layout.rows, key=lambda r: r["total_bytes"])
    return [f"{row[key] / GIB:.1f}" for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
                                               "buffer_bytes", "gathered_bytes", "total_bytes")]


def comm_cell(layout: Layout) -> str:
    return " ".join(f"{dim} {nbytes / 1e9:.1f}" for dim, nbytes in sorted(comm_bytes_by_dim(layout.collectives).items())
                    if nbytes >= 1e7) or "-"


def table(layouts: list[Layout]) -> list[str]:
    header = ("layout", "mbs", "AC", "params", "grads", "optim", "acts", "buffers", "gathered", "peak GiB",
              "comm GB/step", "step s", "TGS", "MFU")
    rows = [header] + [(layout.describe(), str(layout.micro_batch), layout.ac, *memory_cells(layout), comm_cell(layout),
                        f"{layout.time.total_s:.2f}", f"{layout.tgs:,.0f}", f"{layout.mfu:.1%}") for layout in layouts]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i in (0, 2, 10) else cell.rjust(w) for i, (cell, w) in
                      enumerate(zip(row, widths))).rstrip() for row in rows]


def fragment(layout: Layout) -> str:
    pipeline = (f'pp_schedule = "{layout.schedule}"\npp_stages_per_rank = {layout.stages_per_rank}\n'
                f"pp_microbatches = {layout.micro_batch}\n") if layout.pp > 1 else ""
    return (f"[parallelism]\ndp_replicate = {layout.dp_replicate}\ndp_shard = {layout.dp_shard}\ntp = {layout.tp}\n"
            f"pp = {layout.pp}\n{pipeline}\n[training]\nmicro_batch_size = {layout.micro_batch}\n\n"
            f'[activation_checkpoint]\nmode = "{layout.ac}"\nselective_every = 2\n')


def rejected_lines(layouts: list[Layout]) -> list[str]:
    """Each rejected layout (sizes and schedule) once, with the reason of its least demanding variant."""
    seen, lines = set(), []
    for layout in sorted(layouts, key=lambda layout: layout.peak_bytes if layout.rows else 0):
        if layout.describe() not in seen:
            seen.add(layout.describe())
            lines.append(f"  {layout.describe()}: {layout.rejected}")
    return lines


def nothing_fits(layouts: list[Layout], budget_gib: float) -> str:
    measured = [layout for layout in layouts if layout.rows]
    if not measured:
        return f"no layout is valid for this config: {layouts[0].rejected}"
    smallest = min(measured, key=lambda layout: layout.peak_bytes)
    return (f"no layout fits in {budget_gib:.1f} GiB per GPU; the smallest needs {smallest.peak_bytes / GIB:.1f} GiB "
            f"({smallest.describe()}, micro-batch {smallest.micro_batch}, AC {smallest.ac}): use more GPUs, a "
            f"shorter training.seq_len or a lighter optimizer")


def this_layout(cfg, gpus: int) -> str:
    """The config's own layout: the parameter plan's table, then each pipeline rank's peak."""
    rows = estimate(check_plan(planning_config(cfg), gpus))
    lines = ["activations over the step's micro-batches (measured on fake tensors, dtcollie.planner.memory), "
             "buffers and the peak they reach with the table above:",
             "rank  acts GiB  buffers GiB  peak GiB"]
    lines += [f"{row['rank']:<4}  {row['activation_bytes'] / GIB:8.2f}  {row['buffer_bytes'] / GIB:11.2f}  "
              f"{row['total_bytes'] / GIB:8.2f}" for row in rows]
    return format_plan(plan(cfg, gpus), cfg) + "\n\n" + "\n".join(lines)


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    options, flags, rest = split_options(argv)
    cfg = config_module.load(*config_module.parse_overrides(rest))
    if "--layout" in flags:
        print(this_layout(cfg, options["--gpus"]))
        return
    hw = load_hardware(options["--hardware"])
    layouts = plan_layouts(cfg, options["--gpus"], hw, options["--gpus-per-node"])
    fitting = [layout for layout in layouts if not layout.rejected]
    if not fitting:
        raise ConfigError(nothing_fits(layouts, hw.memory_gib - hw.reserved_gib))
    if "--json" in flags:
        print(json.dumps([{"layout": layout.describe(), "micro_batch": layout.micro_batch, "ac": layout.ac,
                           "peak_bytes": layout.peak_bytes, "tgs": layout.tgs, "mfu": layout.mfu,
                           "step_s": layout.time.total_s, "comm_bytes": comm_bytes_by_dim(layout.collectives)}
                          for layout in fitting], indent=1))
        return
    top = fitting[:options.get("--top", 10)]
    print(f"{options['--gpus']} x {hw.name} ({options['--gpus-per-node']} per node), budget "
          f"{hw.memory_gib - hw.reserved_gib:.1f} GiB per GPU; {len(fitting)} layouts fit, "
          f"{len(layouts) - len(fitting)} rejected; memory columns: GiB on the fullest rank")
    print("\n".join(table(top)))
    print("\nrejected:\n" + "\n".join(rejected_lines([layout for layout in layouts if layout.rejected])))
    print("\nthe winner, as a config fragment:\n" + fragment(fitting[0]))


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
