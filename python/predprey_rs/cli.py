"""The ``predprey`` command: one sub-command per job, each registered in ``_commands()`` as
name -> (help, add_args(parser), run(args) -> exit status)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- gpu-check


def add_gpu_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.add_argument("--adapter", metavar="WORDS", help="only adapters whose description holds all these words (e.g. 'vulkan')")
    p.add_argument("--quick", action="store_true", help="skip the largest conformance shapes and shorten the bandwidth test")
    p.add_argument("--seed", type=int, help="seed of the random matrices and inputs (default: fresh)")
    p.add_argument("--in-process", action="store_true",
                   help="check every adapter in this process (default: one fresh process per adapter and kernel)")


def _gpu_check_one(gpu, bench, adapter, info: dict, subgroups: bool, rng, quick: bool) -> dict:
    row = {k: info[k] for k in ("device", "backend", "vendor", "adapter_type")}
    row["variant"] = "subgroup" if subgroups else "workgroup"
    ctx = None
    t0 = time.perf_counter()
    try:
        ctx = gpu._open(adapter, info, subgroups=subgroups)
        row["variant"] = ctx.variant
        _err(f"[{info['backend']}: {info['device']}, {ctx.variant}] conformance ...")
        conf = bench.conformance(ctx, rng, quick=quick, log=_err)
        row.update(max_rel_err=conf["max_rel_err"], max_rel_err_int8=conf["max_rel_err_int8"], cases=conf["cases"],
                   failures=conf["failures"])
        cpu = info["adapter_type"] == "CPU"
        _err(f"[{info['backend']}: {info['device']}, {ctx.variant}] bandwidth ...")
        copy = bench.copy_bandwidth(ctx, (64 if cpu or quick else 512) << 20, trials=3)
        shape = (4096, 4096) if cpu or quick else (8192, 8192)
        kern = bench.kernel_bandwidth(ctx, rng, shape=shape, copies=2 if cpu or quick else 8, trials=3)
        kern8 = bench.kernel_bandwidth(ctx, rng, shape=shape, copies=2 if cpu or quick else 8, trials=3, int8=True)
        row.update(gbps=kern["gbps"], gbps_int8=kern8["gbps"], copy_gbps=copy["gbps"],
                   pct_of_copy=100 * kern["gbps"] / copy["gbps"], pct_of_copy_int8=100 * kern8["gbps"] / copy["gbps"],
                   timer=kern["timer"], bench_shape=list(shape))
        row["passed"] = not conf["failures"]
    except Exception as e:  # any failure of this adapter is a row, not a crash of the check
        row.update(passed=False, error=f"{type(e).__name__}: {e}")
    finally:
        if ctx is not None:
            try:
                ctx.device.destroy()
            except Exception:
                pass
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _table(rows: list[dict]) -> str:
    head = ("adapter", "backend", "type", "kernel", "max rel err", "int8 vs cpu", "result", "GB/s", "int8 GB/s",
            "copy GB/s", "% copy", "int8 % copy")
    body = []
    for r in rows:
        ok = "pass" if r.get("passed") else "FAIL"
        body.append((
            r["device"][:40], r["backend"], r["adapter_type"], r["variant"],
            f"{r['max_rel_err']:.2e}" if "max_rel_err" in r else "-",
            f"{r['max_rel_err_int8']:.2e}" if "max_rel_err_int8" in r else "-", ok,
            f"{r['gbps']:.1f}" if "gbps" in r else "-", f"{r['gbps_int8']:.1f}" if "gbps_int8" in r else "-",
            f"{r['copy_gbps']:.1f}" if "copy_gbps" in r else "-",
            f"{r['pct_of_copy']:.0f}%" if "pct_of_copy" in r else "-",
            f"{r['pct_of_copy_int8']:.0f}%" if "pct_of_copy_int8" in r else "-",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(b, widths)) for b in body]
    for r in rows:
        for f in r.get("failures", [])[:5]:
            lines.append(f"  FAIL {r['device']} ({r['backend']}, {r['variant']}): {f}")
        if "error" in r:
            lines.append(f"  FAIL {r['device']} ({r['backend']}, {r['variant']}): {r['error']}")
    return "\n".join(lines)


def _gpu_check_child(spec: str) -> None:
    """Child side of _gpu_check_isolated: check one adapter (chosen by its description) with one
    kernel variant and print the row as JSON on the last line of stdout."""
    import numpy as np

    from . import _gpubench, gpu

    want = json.loads(spec)
    info = a = None
    for cand in gpu._enumerate():
        d = gpu._describe(cand)
        if all(d[k] == want["info"][k] for k in ("backend", "device", "vendor", "adapter_type", "description")):
            a, info = cand, d
            break
    if a is None:
        row = {k: want["info"][k] for k in ("device", "backend", "vendor", "adapter_type")}
        row.update(variant="subgroup" if want["subgroups"] else "workgroup", passed=False,
                   error="the adapter was not found again in a fresh process")
    else:
        row = _gpu_check_one(gpu, _gpubench, a, info, want["subgroups"], np.random.default_rng(want["seed"]),
                             want["quick"])
    print(json.dumps(row), flush=True)


def _gpu_check_isolated(info: dict, subgroups: bool, seed: int, quick: bool) -> dict:
    """_gpu_check_one in a fresh Python process: a device lost or a driver left in a bad state on
    one backend (seen: OpenGL "Parent device is lost" after the Vulkan rows on an NVIDIA H100)
    cannot poison the next row; a crash of the child is a failed row."""
    spec = json.dumps({"info": info, "subgroups": subgroups, "seed": seed, "quick": quick})
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from predprey_rs.cli import _gpu_check_child; _gpu_check_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, spec], stdout=subprocess.PIPE, env=env, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    row = {k: info[k] for k in ("device", "backend", "vendor", "adapter_type")}
    row.update(variant="subgroup" if subgroups else "workgroup", passed=False,
               error=f"the check's process exited with status {proc.returncode} and no result")
    return row


def cmd_gpu_check(args: argparse.Namespace) -> int:
    """Every adapter wgpu sees on every backend: conformance vs the CPU oracle and bandwidth.
    Adapters with subgroups are checked with both kernels. Exit 1 if any adapter fails. Each
    (adapter, kernel) row runs in its own process (--in-process: all in this one)."""
    import numpy as np

    from . import GpuUnavailableError, _gpubench, gpu

    try:
        adapters = gpu._enumerate()
    except GpuUnavailableError as e:
        _err(f"predprey gpu-check: {e}")
        return 1
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % (1 << 31))
    rng = np.random.default_rng(seed)
    rows = []
    for a in adapters:
        info = gpu._describe(a)
        if args.adapter and not all(w in gpu._haystack(info) for w in args.adapter.lower().split()):
            continue
        for sg in ([True, False] if info["subgroups"] else [False]):
            if args.in_process:
                rows.append(_gpu_check_one(gpu, _gpubench, a, info, sg, rng, args.quick))
            else:
                rows.append(_gpu_check_isolated(info, sg, seed + len(rows), args.quick))
    ok = bool(rows) and all(r.get("passed") for r in rows)
    if args.json:
        print(json.dumps({"ok": ok, "seed": seed, "adapters": rows}, indent=1))
    elif rows:
        print(_table(rows))
        print(f"seed {seed}: {'all adapters pass' if ok else 'FAILED'}")
    if not rows:
        _err("predprey gpu-check: wgpu found no adapter" + (f" matching {args.adapter!r}" if args.adapter else "")
             + " on any backend (tried Vulkan, Metal, D3D12, OpenGL)")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------- registry


def _commands() -> dict[str, Command]:
    table: dict[str, Command] = {}
    try:
        from ._cli_checkpoint import COMMANDS as checkpoint_commands

        table.update(checkpoint_commands)
    except ImportError:  # pragma: no cover - a partial install without the checkpoint tools
        pass
    table["gpu-check"] = (
        "run the GPU kernels on every adapter wgpu sees (Vulkan, Metal, D3D12, GL) against the "
        "CPU oracle, measure bandwidth, print a portability table",
        add_gpu_check_args,
        cmd_gpu_check,
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="predprey", description="Predator-Prey weight compression tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add_args, run) in _commands().items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_args(sp)
        sp.set_defaults(_run=run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
