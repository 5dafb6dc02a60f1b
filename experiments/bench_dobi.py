"""Time Dobi-SVD's stage-1 training pass (one window: forward + backward through the activation-truncated model)
and its selection forward on a model, to size a CPU preset (``conf/experiment/table1_dobi.yaml``).

    python -m experiments.bench_dobi                         # SmolLM2-135M, L = 640, ratio 0.2, 3 passes
    python -m experiments.bench_dobi --seqlen 640 --model gemma3_270m

Prints wall and CPU seconds per training pass and per selection forward, the machine's load average and the torch
threads, and the hours a run of ``windows x epochs`` passes (+ selection) would take at the CPU-time rate (one thread
alone: wall = CPU time; on a loaded machine the wall time says little, the CPU time is what the work costs).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from hydra import compose, initialize_config_dir

from saes.engine.allocators.dobi_train import DobiTraining, train_positions
from saes.engine.layout import layout_for, plan_ranks
from saes.inputs import data as data_mod
from saes.inputs.models import load_model
from saes.runs.job import model_spec

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--seqlen", type=int, default=640)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--passes", type=int, default=3,
                    help="training steps of one window (at least 3: warm-up, timed, timed + selection)")
    ap.add_argument("--windows", type=int, default=32, help="windows of the run to estimate")
    ap.add_argument("--epochs", type=int, default=8, help="epochs of the run to estimate")
    ap.add_argument("--select", type=int, default=4, help="selection windows x evaluations of the run to estimate")
    args = ap.parse_args()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={args.model}"])
    loaded = load_model(model_spec(cfg.model))
    model, layout = loaded.model, layout_for(loaded.model)
    ids = data_mod.calibration_ids(loaded.tokenizer, cfg.calib.source, args.passes + 1, args.seqlen, 0)
    uniform = plan_ranks(model, layout, args.ratio)
    names = list(uniform)
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for p in names}
    total = sum(m * n for m, n in shapes.values())
    budget = sum(r * sum(shapes[p]) for p, r in uniform.items())
    rho0 = torch.tensor([uniform[p] / min(shapes[p]) for p in names], dtype=torch.float64)
    stamps: list[tuple[float, float]] = []
    settings = DobiTraining(accum=1, epochs=1, select_every=args.passes)
    t0 = (time.perf_counter(), time.process_time())
    out = train_positions(model, names, shapes, {p: 1.0 for p in names}, rho0, budget / total, ids[:args.passes],
                          ids[args.passes:], settings, torch.device("cpu"), torch.float32, None, {},
                          on_step=lambda step: stamps.append((time.perf_counter(), time.process_time())))
    for kind, which in (("wall", 0), ("CPU", 1)):
        steps = [b[which] - a[which] for a, b in zip([t0, *stamps[:-1]], stamps)]
        # the first step warms up; the last includes one selection forward: the difference is its cost
        middle = steps[1:-1] or steps[:1]
        per_pass = sum(middle) / len(middle)
        select = max(0.0, steps[-1] - per_pass)
        print(f"{kind} seconds per step: {[round(s, 1) for s in steps]}; training pass {per_pass:.1f} s, selection "
              f"forward {select:.1f} s")
    passes = args.windows * args.epochs
    print(f"model {args.model}, L = {args.seqlen}, ratio {args.ratio}; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()}")
    print(f"kept {out['history'][-1]['kept']:.5f}, lambda {out['lam']:.4g}")
    print(f"a run of {passes} passes + {args.select} selection forwards x {max(1, passes // 32)} evaluations: "
          f"{(passes * per_pass + args.select * max(1, passes // 32) * select) / 3600:.2f} h at the CPU-time rate")


if __name__ == "__main__":
    main()
