"""What ``synthtune memory`` prints: the JSON contract and the human tables (rich, to stderr)."""

from __future__ import annotations

from typing import Any

from synthtune.memory.estimate import Estimate

BREAKDOWN_KEYS = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")


def estimate_json(e: Estimate) -> dict[str, Any]:
    """The stable contract: per_gpu_gib, params, trainable_params, breakdown (GiB); then extras."""
    out: dict[str, Any] = {
        "per_gpu_gib": e.per_gpu_gib,
        "params": e.params,
        "trainable_params": e.trainable_params,
        "breakdown": {k: e.breakdown[k] for k in BREAKDOWN_KEYS},
        "peak_phase": e.peak_phase,
        "phases_gib": e.phases_gib,
        "model_states_gib": e.model_states_gib,
        "model_states_bytes": e.model_states_bytes,
        "bytes_per_param": e.bytes_per_param,
        "cpu_gib": e.cpu_gib,
        "model": e.model,
        "setup": e.setup,
        "notes": e.notes,
    }
    return out


def print_estimate(e: Estimate, console) -> None:
    from rich.table import Table

    s = e.setup
    t = Table(title=f"{e.model}: {s['method']} {s['precision']} {s['optimizer']}, micro-batch {s['batch_size']} x "
                    f"{s['seq_len']}{'/' + str(s['target_len']) if s.get('target_len') else ''}, "
                    f"ckpt {'on' if s['grad_ckpt'] else 'off'}, ZeRO-{s['zero_stage']}, "
                    f"{s['gpus']}x{s['nodes']} GPUs")
    t.add_column("at the peak", style="bold")
    t.add_column("GiB per GPU", justify="right")
    for k in BREAKDOWN_KEYS:
        t.add_row(k, f"{e.breakdown[k]:.2f}")
    t.add_row("total (peak allocated)", f"[bold]{e.per_gpu_gib:.2f}[/]")
    console.print(t)
    console.print(f"params {e.params:,}  trainable {e.trainable_params:,} "
                  f"({100 * e.trainable_params / max(e.params, 1):.2f}%)  peak in: {e.peak_phase}  "
                  f"model states {e.bytes_per_param:g} B/param before sharding"
                  + (f"  host RAM for offload {e.cpu_gib:.1f} GiB/node" if e.cpu_gib else ""))
    for n in e.notes:
        console.print(f"[dim]note: {n}[/]")


def print_fit(r: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"{r['model']} on {r['gpus']}x{r['nodes']} GPUs of {r['gpu_gib']:g} GiB "
                    f"({r['usable_gib']:g} usable)")
    t.add_column("method")
    t.add_column("fits")
    t.add_column("setup / reason", overflow="fold")
    for m, info in r["methods"].items():
        if info["fits"]:
            s = info["setup"]
            t.add_row(m, "[green]yes[/]", f"ZeRO-{s['zero_stage']} offload {s['offload']}, ckpt "
                      f"{'on' if s['grad_ckpt'] else 'off'}, micro-batch {s['batch_size']}: {info['per_gpu_gib']:.1f} GiB")
        else:
            t.add_row(m, "[red]no[/]", info.get("reason", ""))
    console.print(t)
    console.print(f"workshop rule: 18 B/param x {r['params'] / 1e9:.2f}B = {r['workshop_rule_gb']:g} GB of model states")
    if r.get("fits"):
        console.print(f"[bold]fastest that fits:[/] {r['best']}  ({r['per_gpu_gib']:.1f} GiB per GPU)")
        console.print(r["command"], soft_wrap=True, markup=False)
    else:
        console.print(f"[red]{r['reason']}[/]")
