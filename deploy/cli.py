"""The ``softflow`` command.

    softflow train EXPERIMENT.yaml [key=value ...] [--run-dir DIR] [--address ADDR]
    softflow train --resume RUN_DIR [key=value ...]     (only the keys of deploy/run/resumes.py's RESUMABLE)
    softflow evaluate RUN_DIR_OR_CHECKPOINT [--episodes N]
    softflow bench learner [--batch-sizes 256,1024,4096] [--compile none,default] [--updates N] [--repeats N]
                           [--device auto|cpu|cuda] [--quick]
    softflow bench runtime [EXPERIMENT.yaml [key=value ...]] [--seconds S]
    softflow bench rllib [--env ENV] [--seconds S] [--batch-size B] [--updates-per-step R]
    softflow bench serve [EXPERIMENT.yaml | RUN_DIR | CHECKPOINT] [--seconds S] [--rounds R] [--clients 1,8,64]
                         [--fuzz N] [...]
    softflow bench act [--candidates N] [--repeats N] [--quick]
    softflow bench gradients [--env ENV] [--env-steps N] [--batch-size B] [--plot PNG]
    softflow sweep SWEEP.yaml [key=value ...] [--sweep-dir DIR] [--address ADDR]
    softflow sweep --resume SWEEP_DIR [--address ADDR]
    softflow report RUN_OR_SWEEP_DIR... [--out DIR] [--reps N] [--seed S]
    softflow serve RUN_DIR_OR_CHECKPOINT [--port P] [--host H] [--token-file F] [--tls-cert C --tls-key K]
                   [--insecure] [--max-request-work N] [...]
    softflow act [--address HOST:PORT] [--obs JSON] [--candidates N] [--deterministic] [--seed S] [--token-file F]

Bad input ends with one line on stderr naming what is wrong, and exit code 2; a run that cannot go on (its learner
died) ends with one line saying how to resume it, and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from softflow.deploy import arguments as checked
from softflow.deploy.arguments import OneLineParser
from softflow.deploy.config import ConfigError, RunStopped

USAGE_ERROR = 2


def _train(args: argparse.Namespace) -> int:
    from softflow.deploy.config import load_experiment
    from softflow.deploy.run import resumes
    from softflow.deploy.run.driver import check_fresh_run_dir, default_run_dir, train
    from softflow.deploy.run.failures import check_env
    from softflow.deploy.run.storage import ray_temp_warning

    if args.resume:
        run_dir = Path(args.resume)
        overrides = [args.experiment, *args.overrides] if args.experiment else args.overrides
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no run there (no config.yaml); give the directory of a run that "
                              f"wrote a checkpoint")
        resumes.check_overrides(run_dir, overrides)
        config = load_experiment(run_dir / "config.yaml", overrides)
    elif args.experiment is None:
        raise ConfigError("give an experiment file (e.g. cluster/experiments/inverted-pendulum.yaml) "
                          "or --resume RUN_DIR")
    else:
        config = load_experiment(args.experiment, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
        check_fresh_run_dir(run_dir)
        check_env(config)
    warning = ray_temp_warning(run_dir)
    if warning:
        print(warning, file=sys.stderr)
    verb = "resuming" if args.resume else "training"
    print(f"softflow: {verb} '{config.name}' ({config.algorithm.name} on {config.env.id}); run directory {run_dir}")
    summary = train(config, run_dir, progress=not args.no_progress, address=args.address, resume=bool(args.resume))
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from softflow.actors.rollout import EnvError
    from softflow.deploy.policies import evaluate_policy

    try:
        result = evaluate_policy(args.path, args.episodes, args.seed)
    except EnvError as exc:
        raise RunStopped(f"{exc}; no evaluation was written") from None
    print(json.dumps(result, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"softflow.deploy.bench.{args.what}")
    print(json.dumps(module.from_args(args), indent=2))
    return 0


# softflow bench WHAT: what each benchmark measures, and its own flags (name, argparse keywords).
BENCHMARKS: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "learner": ("the five algorithms' update costs over a bare CleanRL SAC and over SAC, eager and compiled, and "
                "where an update's time goes", [
                    ("--batch-sizes", {"type": checked.integer_list(ge=1), "default": "256,1024,4096",
                                       "help": "batch sizes of the SAC ratios"}),
                    ("--compile", {"type": checked.choice_list(["none", "default", "reduce-overhead"]),
                                   "default": "none,default",
                                   "help": "compile modes to time (none, default, reduce-overhead)"}),
                    ("--updates", {"type": checked.count, "default": 30,
                                   "help": "timed updates per case, in --repeats blocks of a multiple of 6"}),
                    ("--repeats", {"type": checked.count, "default": 5,
                                   "help": "alternating rounds; the median is reported"}),
                    ("--device", {"default": "auto", "choices": ["auto", "cpu", "cuda"]}),
                    ("--quick", {"action": "store_true", "help": "1 round of 6 updates, batch 256, eager only"})]),
    "runtime": ("the Ray runtime's costs against the same loops alone, for an experiment file", [
        ("experiment", {"nargs": "?", "default": "cluster/experiments/inverted-pendulum.yaml",
                        "help": "the experiment to measure (default: the Quickstart experiment)"}),
        ("overrides", {"nargs": "*", "help": "key=value overrides of the experiment"}),
        ("--seconds", {"type": checked.seconds, "default": 10.0, "help": "seconds per timed loop"})]),
    "rllib": ("softflow's SAC against RLlib's SAC for the same wall time", [
        ("--env", {"type": checked.env_id, "default": "HalfCheetah-v5"}),
        ("--seconds", {"type": checked.seconds, "default": 120.0, "help": "seconds per library"}),
        ("--batch-size", {"type": checked.count, "default": 256}),
        ("--updates-per-step", {"type": checked.number(gt=0), "default": 1.0, "help": "the UTD ratio of both"})]),
    "serve": ("the gRPC policy server's latency and throughput, batched and unbatched, and a fuzz run", [
        ("experiment", {"nargs": "?", "default": "cluster/experiments/inverted-pendulum.yaml",
                        "help": "an experiment to train briefly and serve, or a run directory or checkpoint"}),
        ("overrides", {"nargs": "*", "help": "key=value overrides of the experiment"}),
        ("--seconds", {"type": checked.seconds, "default": 2.0,
                       "help": "seconds per round of each load level and mode"}),
        ("--clients", {"type": checked.integer_list(ge=1), "default": "1,8,64",
                       "help": "concurrent clients per load level"}),
        ("--connections", {"type": checked.count, "default": 1, "help": "connections the clients share"}),
        ("--rounds", {"type": checked.count, "default": 9, "help": "alternating rounds per load level"}),
        ("--fuzz", {"type": checked.integer(ge=0), "default": 10_000, "help": "fuzzed requests (0: none)"}),
        ("--max-batch-wait-ms", {"type": checked.number(ge=0), "default": None,
                                 "help": "the batched server's wait (default: softflow serve's)"})]),
    "act": ("time per action of SAC, FLAME, the 10-step flow and SAC Flow, best of --candidates", [
        ("--candidates", {"type": checked.count, "default": 32, "help": "best-of-N candidates per state"}),
        ("--repeats", {"type": checked.count, "default": 5, "help": "timed blocks; the median is reported"}),
        ("--quick", {"action": "store_true", "help": "a short run for tests"})]),
    "gradients": ("SAC Flow's actor-gradient norms over training for K = 4, 7, 10 and the naive, gated and decoded "
                  "velocities", [
                      ("--env", {"type": checked.env_id, "default": "HalfCheetah-v5"}),
                      ("--env-steps", {"type": checked.integer(gt=1000), "default": 5000,
                                       "help": "env steps per run (1000 random)"}),
                      ("--batch-size", {"type": checked.count, "default": 256}),
                      ("--plot", {"type": checked.new_file, "default": None,
                                  "help": "write the figure to this PNG"})]),
}


def _serve(args: argparse.Namespace) -> int:
    from softflow.deploy.serve.server import options_from_args, serve_forever

    serve_forever(args.path, options_from_args(args), args.torch_threads)
    return 0


def _act(args: argparse.Namespace) -> int:
    from softflow.deploy.serve.client import act_command

    try:
        print(json.dumps(act_command(args), indent=2))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from softflow.deploy.sweep.tune import run_sweep

    if args.resume is None and args.sweep is None:
        raise ConfigError("give a sweep file (e.g. cluster/sweeps/seeds.yaml) or --resume SWEEP_DIR")
    if args.resume is not None and args.sweep is not None:
        raise ConfigError(f"--resume {args.resume}: give the sweep directory alone (it holds its sweep.yaml), not "
                          f"also {args.sweep}")
    if args.resume is not None and args.sweep_dir is not None:
        raise ConfigError("--resume continues the sweep in its own directory; leave --sweep-dir out")
    run_sweep(args.sweep, args.overrides, sweep_dir=args.sweep_dir, address=args.address, resume=args.resume)
    return 0


def _report(args: argparse.Namespace) -> int:
    from datetime import datetime

    from softflow.deploy.sweep.compare import report

    if args.out:
        out = Path(args.out)
    elif len(args.paths) == 1 and Path(args.paths[0]).is_dir():
        out = Path(args.paths[0]) / "report"
    else:
        out = Path("runs") / f"report-{datetime.now():%Y%m%d-%H%M%S}"
    report(args.paths, out, reps=args.reps, seed=args.seed)
    return 0


# The types of the serve and act flags (declared in deploy/serve/), by dest.
SERVE_FLAGS = {"port": checked.port, "token_file": checked.existing_file, "tls_cert": checked.existing_file,
               "tls_key": checked.existing_file, "max_batch_rows": checked.count,
               "max_batch_wait_ms": checked.number(ge=0), "max_request_rows": checked.count,
               "max_candidates": checked.count, "max_request_work": checked.count,
               "max_batch_work": checked.count, "max_message_bytes": checked.count,
               "max_concurrent_rpcs": checked.count, "reload_interval": checked.number(ge=0),
               "torch_threads": checked.integer(ge=0)}
ACT_FLAGS = {"address": checked.address, "candidates": checked.integer(ge=0),
             "seed": checked.integer(ge=0, le=2**64 - 1), "token_file": checked.existing_file,
             "tls_cert": checked.existing_file, "timeout": checked.seconds}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="softflow", description="Flow-matching policies for max-entropy RL.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an experiment")
    train.add_argument("experiment", nargs="?", help="experiment YAML, e.g. cluster/experiments/lqr-isfm.yaml")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. algorithm.q_lr=1e-3")
    train.add_argument("--run-dir", help="run directory (default <storage>/<name>-<time>, storage being the "
                                         "experiment's storage or runs/)")
    train.add_argument("--no-progress", action="store_true", help="no live progress display")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    train.add_argument("--address", help="Ray cluster to join ('auto' or host:port; RAY_ADDRESS works too); "
                                         "default: start Ray on this machine")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a trained policy (JSON on stdout)")
    evaluate.add_argument("path", help="a run directory or a checkpoint file")
    evaluate.add_argument("--episodes", type=checked.count, default=10, help="deterministic evaluation episodes")
    evaluate.add_argument("--seed", type=checked.seed, default=20_000, help="seed of the first episode")
    evaluate.set_defaults(func=_evaluate)

    bench = commands.add_parser("bench", help="benchmarks (JSON on stdout)")
    benchmarks = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, (purpose, flags) in BENCHMARKS.items():
        sub = benchmarks.add_parser(name, help=purpose, description=purpose)
        for flag, keywords in flags:
            sub.add_argument(flag, **keywords)
        sub.set_defaults(func=_bench)

    sweep = commands.add_parser("sweep", help="run a Ray Tune sweep of an experiment (cluster/sweeps/)")
    sweep.add_argument("sweep", nargs="?", help="sweep YAML, e.g. cluster/sweeps/actor-scaling.yaml")
    sweep.add_argument("overrides", nargs="*",
                       help="key=value: 'space.KEY={grid: [..]}' sets a key's search space, a sweep field "
                            "(num_samples=4) sets it, anything else overrides the experiment of every trial")
    sweep.add_argument("--sweep-dir", type=checked.directory, help="sweep directory (default runs/<name>-<time>)")
    sweep.add_argument("--address", help="Ray cluster to join ('auto' or host:port; RAY_ADDRESS works too); "
                                         "default: start Ray on this machine")
    sweep.add_argument("--resume", metavar="SWEEP_DIR", type=checked.existing_directory,
                       help="finish an interrupted sweep: its unfinished and failed trials continue from their last "
                            "checkpoint, finished ones are kept")
    sweep.set_defaults(func=_sweep)

    compare = commands.add_parser("report", help="compare runs by (algorithm, task): IQM with 95%% CIs, curves, "
                                                 "performance profile (report.md, report.csv, PNGs)")
    compare.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR", type=checked.existing_directory,
                         help="run directories or directories of runs")
    compare.add_argument("--out", type=checked.directory,
                         help="output directory (default: PATH/report for one directory, else runs/report-<time>)")
    compare.add_argument("--reps", type=checked.integer(ge=100), default=2000, help="bootstrap resamples")
    compare.add_argument("--seed", type=checked.seed, default=0, help="bootstrap seed")
    compare.set_defaults(func=_report)

    from softflow.deploy.serve.client import add_act_arguments
    from softflow.deploy.serve.server import add_serve_arguments

    serve = commands.add_parser("serve", help="serve a trained policy over gRPC (softflow.v1.PolicyService)")
    add_serve_arguments(serve)
    checked.constrain(serve, SERVE_FLAGS)
    serve.set_defaults(func=_serve)

    act = commands.add_parser("act", help="ask a policy server for actions (JSON on stdout)")
    add_act_arguments(act)
    checked.constrain(act, ACT_FLAGS)
    act.set_defaults(func=_act)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ConfigError as exc:
        print(f"softflow: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except RunStopped as exc:
        print(f"softflow: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("softflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
