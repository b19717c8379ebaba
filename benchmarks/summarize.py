"""Print the committed benchmark results as the Markdown tables of ``benchmarks/README.md``.

python benchmarks/summarize.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _machine(r: dict[str, Any]) -> str:
    m = r["machine"]
    flag = " **measured under contention**" if m.get("measured_under_contention") else ""
    return (
        f"_{m['date']}, {m['host_cpu']}, {m['cpu_count']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), {m['device']}, {m.get('precision', 'fp32')}, "
        f"load {m['load_average_at_start'][0]:.2f}{flag}_"
    )


def step_tables(r: dict[str, Any]) -> list[str]:
    out = [_machine(r), ""]
    for net in r["networks"]:
        ft = net["finetune"]
        out += [
            f"**{net['network']}**: {net['description']}, batch {net['batch_size']}; fine-tune step "
            f"{ft['ms']:.0f} ms (before {ft['ms_before']:.0f}, after {ft['ms_after']:.0f})",
            "",
            "| objective | ms / iteration | measured ratio | pass-count estimate | overhead beyond passes | "
            "static MiB (full / LoRA) | step peak MiB (full / checkpointing / LoRA) | LoRA ms / it |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        ck = {c["label"]: c for c in net.get("checkpointing", [])}
        lo = {c["label"]: c for c in net.get("lora", [])}

        def mem(rows: dict, label: str, key: str = "step_peak_above_static"):
            return (rows.get(label, {}).get("memory_mib") or {}).get(key, "-")

        ftm = (ft.get("memory_mib") or {}).get("step_peak_above_static")
        out.append(
            f"| fine-tune (reference) | {ft['ms']:.0f} | 1.00 | 1.00 | - | "
            f"{(ft.get('memory_mib') or {}).get('static', '-')} / {mem(lo, 'finetune', 'static')} | "
            f"{ftm} / {mem(ck, 'finetune')} / {mem(lo, 'finetune')} | "
            f"{lo.get('finetune', {}).get('ms_per_iteration', '-')} |"
        )
        for row in net["objectives"]:
            if "error" in row:
                out.append(f"| {row['label']} | failed: {row['error'][:60]} | | | | | | |")
                continue
            m = row.get("memory_mib") or {}
            lab = row["label"]
            out.append(
                f"| {lab} | {row['ms_per_iteration']:.0f} | {row['measured_ratio']:.2f} | "
                f"{row['estimate_ratio']:.2f} | {100 * row['overhead_beyond_passes']:+.0f}% | "
                f"{m.get('static', '-')} / {mem(lo, lab, 'static')} | "
                f"{m.get('step_peak_above_static', '-')} / {mem(ck, lab)} / {mem(lo, lab)} | "
                f"{lo.get(lab, {}).get('ms_per_iteration', '-')} |"
            )
        pc = net.get("peer_comparison")
        if pc:
            peer = pc["peer"]
            out += [
                "",
                f"Peer on this network: {peer['code']} ({peer['objective']}) **{peer['ratio']}x**; "
                f"diffdistill `{pc['diffdistill_row']}` **{pc['diffdistill_ratio']}x** "
                f"(estimate {pc['diffdistill_estimate']}x). {peer['note']}.",
            ]
        out.append("")
    so = r.get("speed_options")
    if so:
        out += [
            f"**Speed options** ({so['network']}, batch {so['batch_size']})",
            "",
            "| step | option | ms / iteration | speed-up | first call ms |",
            "|---|---|---:|---:|---:|",
        ]
        for row in so["rows"]:
            if "error" in row:
                out.append(f"| {row['label']} | {row['option']} | failed | | |")
            else:
                out.append(
                    f"| {row['label']} | {row['option']} | {row['ms_per_iteration']:.0f} | "
                    f"{row.get('speedup_vs_default', '-')} | {row['first_call_ms']:.0f} |"
                )
        tf = so.get("teacher_forward")
        if tf:
            out += [
                "",
                f"Teacher no-grad forward: `no_grad` {tf['no_grad_ms']} ms, `inference_mode` "
                f"{tf['inference_mode_ms']} ms (identical outputs: {tf['identical_outputs']}).",
            ]
    return out


def sampling_table(r: dict[str, Any]) -> list[str]:
    out = [
        _machine(r),
        "",
        f"{r['network']}, batch {r['batch_size']}",
        "",
        "| model | sampler | NFE | images/s | speed-up vs teacher (no CFG / CFG) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in r["rows"]:
        su = "-" if row["model"] == "teacher" else f"{row['speedup_vs_teacher']}x / {row['speedup_vs_teacher_cfg']}x"
        name = row["model"] + (f" (w={row['guidance_scale']})" if "guidance_scale" in row else "")
        out.append(f"| {name} | {row['sampler']} | {row['nfe']} | {row['images_per_s']:.1f} | {su} |")
    return out


def toy_table(r: dict[str, Any]) -> list[str]:
    """The mixture benchmark's table, as ``bench_toy_quality.py --table`` prints it (one definition)."""
    from bench_toy_quality import table

    return [_machine(r), "", table(r)]


def fm_quality_table(r: dict[str, Any]) -> list[str]:
    t = r.get("teacher") or {}
    out = [
        _machine(r),
        "",
        f"Budget: {r['setup']['budget_train_seconds']:.0f} s of training iterations per recipe; "
        f"FID-EffNet-128 / KID of {r['setup']['eval'].get('num_images', 500)} images vs 5k test images.",
        "",
        "| recipe | objective | iterations | s / it | FID 1 step | KID 1 step | FID 2 steps | KID 2 steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    if t:
        out.append(f"| packaged teacher | Heun 18 steps (35 NFE) | - | - | {t['fid']:.1f} | {t['kid']:.3f} | | |")
    for row in r["objectives"]:
        if "error" in row:
            out.append(f"| {row['recipe_name']} | failed: {row['error'][:70]} | | | | | | |")
            continue
        one, two = row.get("one_step", {}), row.get("two_step", {})

        def num(d: dict, k: str, fmt: str) -> str:
            return format(d[k], fmt) if k in d else "-"

        out.append(
            f"| {row['recipe_name']} | {row['objective']} | {row['iterations']} | {row['seconds_per_iteration']} | "
            f"{num(one, 'fid', '.1f')} | {num(one, 'kid', '.3f')} | "
            f"{num(two, 'fid', '.1f')} | {num(two, 'kid', '.3f')} |"
        )
    return out


def compile_table(r: dict[str, Any]) -> list[str]:
    out = [
        _machine(r),
        "",
        f"{r['setup']['network']}; {r['setup']['timed']}",
        "",
        "| objective | eager ms / it | compiled ms / it | speed-up | compile (first iterations) s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["objectives"]:
        e, c = row["eager"], row["compiled"]
        if "error" in e or "error" in c:
            out.append(
                f"| {row['objective']} | {e.get('ms_per_iteration', '-')} | failed: "
                f"{(c.get('error') or e.get('error'))[:70]} | | |"
            )
            continue
        out.append(
            f"| {row['objective']} | {e['ms_per_iteration']} | {c['ms_per_iteration']} | {row['speedup']} | "
            f"{c['first_iterations_s']} |"
        )
    return out


def switches_table(r: dict[str, Any]) -> list[str]:
    out = [_machine(r), ""]
    ck = r.get("checkpointing")
    if ck:
        out += [
            f"`{ck['switch']}` on {ck['network']} (batch {ck['batch_size']}): off / on",
            "",
            "| objective | ms / it off | ms / it on | time on/off | step memory MiB off | on | memory on/off |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in ck["rows"]:
            off, on = row["off"], row["on"]
            if "error" in off or "error" in on:
                out.append(f"| {row['objective']} | failed: {(off.get('error') or on.get('error'))[:70]} | | | | | |")
                continue
            mo, mn = off["memory_mib"].get("step_peak_above_static"), on["memory_mib"].get("step_peak_above_static")
            out.append(
                f"| {row['objective']} | {off['ms_per_iteration']} | {on['ms_per_iteration']} | "
                f"{row.get('time_ratio_on_off', '-')} | {mo} | {mn} | {row.get('step_memory_ratio_on_off', '-')} |"
            )
        out.append("")
    ema = r.get("ema")
    if ema:
        out += [
            "| EMA update | parameters | tensors | loop ms | fused ms | speed-up | same track |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in ema["rows"]:
            out.append(
                f"| {row['network']} | {row['parameters']:,} | {row['tensors']} | {row['loop']['ms_per_update']} | "
                f"{row['fused']['ms_per_update']} | {row['speedup']} | {row['identical_tracks']} |"
            )
        out.append("")
    comp = r.get("compile")
    if comp:
        rows = comp["rows"]
        cells = [f"{k}: {v.get('ms_per_iteration', v.get('error', '-'))}" for k, v in rows.items() if k != "speedup"]
        out += [f"`{comp['switch']}`, {comp['setup']}: ms / it {', '.join(cells)}; speed-up {rows.get('speedup')}", ""]
    for key in ("tf32", "channels_last"):
        if key in r and not r[key].get("applicable", True):
            out.append(f"`{r[key]['switch']}`: not applicable here ({r[key]['reason']})")
    return out


def loader_table(r: dict[str, Any]) -> list[str]:
    s = r["setup"]
    out = [
        _machine(r),
        "",
        f"{s['images']} PNG images, micro-batch {s['micro_batch']}; images/s of `DataStream` "
        f"over {s['timed_seconds']} s",
        "",
        "| px | in memory (decode all once) | source | 0 workers | 1 worker | 2 workers |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for row in r["throughput"]:
        m = row["in_memory"]
        first = f"{m['images_per_s']:,.0f} img/s after {m['decode_all_s']} s ({m['uint8_mib']} MiB)"
        for kind in ("image_folder_stream", "webdataset", "hf_datasets"):
            if kind in row:
                cells = [f"{row[kind][k]['images_per_s']:,.0f}" for k in sorted(row[kind])]
                out.append(f"| {row['resolution']} | {first} | {kind} | " + " | ".join(cells) + " |")
                first = ""
    if r.get("keep_up"):
        out += [
            "",
            "| px | network | workers | step ms | wait for data ms (median / max) | img/s needed | keeps up |",
            "|---:|---|---:|---:|---:|---:|---|",
        ]
        for k in r["keep_up"]:
            out.append(
                f"| {k['resolution']} | {k['network']} | {k['workers']} | {k['step_ms_median']} | "
                f"{k['wait_ms_median']} / {k['wait_ms_max']} | {k['images_per_s_needed']} | {k['keeps_up']} |"
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    d = Path(ap.parse_args().results)
    for fname, fn in (
        ("step_cost_cpu.json", step_tables),
        ("step_cost_sid_sim_cpu.json", step_tables),  # issue 15's rows, taken apart (see the file's note)
        ("step_cost_late_cpu.json", step_tables),  # the objectives added after step_cost_cpu.json (issues 14, 15)
        ("step_cost_sida_cpu.json", step_tables),
        ("step_cost_adm_dmd2_cpu.json", step_tables),  # issue 14: DMD2 with its GAN term on DMD2's ADM network
        ("sampling_cpu.json", sampling_table),
        ("toy_quality.json", toy_table),
        ("fm_quality_cpu.json", fm_quality_table),
        ("compile_cpu.json", compile_table),
        ("loader_cpu.json", loader_table),
        ("switches_cpu.json", switches_table),
    ):
        r = _load(d / fname)
        if r is not None:
            print(f"### {fname}\n")
            print("\n".join(fn(r)) + "\n")


if __name__ == "__main__":
    main()
