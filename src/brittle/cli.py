"""The `brittle` command. Exit codes: 0 pass, 1 a gate failed, 2 bad usage or input, 3 internal error."""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
import warnings
from pathlib import Path

from ._progress import Progress
from ._version import __version__
from .errors import BrittleError, UsageError, command_line

EXIT_PASS, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brittle", description="Audit a trained classifier for the ways it fails.")
    p.add_argument("--version", action="version", version=f"brittle {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("audit", help="run checks on a model and data, write report.json/html and junit.xml")
    _model_and_data(a)
    a.add_argument("--train-data", help="the training set, for checks that need it")
    a.add_argument("--checks", help="comma-separated check ids to run (default: all); see `brittle checks`")
    a.add_argument("--seed", type=int, help="run seed (default 0)")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--resume", action="store_true", help="continue an interrupted audit in --out")
    a.add_argument("--overwrite", action="store_true", help="replace an earlier audit in --out")
    a.add_argument("--backend", choices=["local", "process", "ray"], default="local",
                   help="where sharded work runs: in this process (default), a local process pool, or Ray")
    a.add_argument("--workers", type=int, help="processes (process) or CPUs of the local Ray cluster (ray)")
    a.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local one)")
    _common(a)

    r = sub.add_parser("report", help="render report.html and junit.xml again from DIR/report.json")
    r.add_argument("dir")
    _common(r)

    d = sub.add_parser("demo", help="train a small MNIST CNN with a planted backdoor and audit it")
    d.add_argument("--out", default="brittle-demo", help="output folder (default ./brittle-demo)")
    d.add_argument("--workers", type=int, default=None, help="processes the audit's shards run on (default: 2, or "
                   "1 on a single-CPU machine; 1 runs everything in this process)")
    _common(d)

    c = sub.add_parser("checks", help="list the available checks, their needs and gateable metrics")
    _common(c)

    k = sub.add_parser("calibrate", help="fit a temperature on labelled held-out data and write the scaled model "
                                         "(TorchScript)")
    _model_and_data(k)
    k.add_argument("--out", required=True, help="the calibrated model file to write (TorchScript, e.g. calibrated.ts)")
    _common(k)

    e = sub.add_parser("estimate", help="estimate accuracy on unlabelled data, with an interval and warnings")
    _model_args(e)
    e.add_argument("--data", required=True, help="labelled validation data the estimators are fitted on")
    e.add_argument("--target", required=True, help="the unlabelled inputs (labels, if present, only give the true accuracy "
                                                        "beside the estimate)")
    e.add_argument("--other-model", action="append", default=[],
                   help="another model file of the same classes and input domain (repeat for more): "
                        "adds agreement-based estimates")
    e.add_argument("--out", help="write the result as JSON here")
    e.add_argument("--json", action="store_true", help="print the JSON result instead of the summary")
    _common(e)

    u = sub.add_parser("unlearn-check", help="did unlearning work? compare the model with models retrained without "
                       "the forget set")
    _model_args(u)
    u.add_argument("--forget", required=True, help="the examples the model was asked to forget (labelled)")
    u.add_argument("--retain", required=True, help="the rest of the training set (labelled): the retrained models' data")
    u.add_argument("--data", required=True, help="labelled held-out data the model never trained on")
    u.add_argument("--train-fn", required=True, help="'package.module:function' called as fn(x, y, seed=...), "
                   "returning a trained model that takes the inputs as this one does")
    u.add_argument("--reference-models", type=int, default=4, help="models retrained without the forget set (default 4)")
    u.add_argument("--reference-cache", help="a folder that keeps the retrained models (their logits) by what determines "
                   "them, so that checking another model against the same forget set does not retrain")
    u.add_argument("--alpha", type=float, default=0.05, help="significance level of the tests (default 0.05)")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--out", help="write the result as JSON here")
    u.add_argument("--json", action="store_true", help="print the JSON result instead of the summary")
    _common(u)

    t = sub.add_parser("attribute", help="trace predictions back to the training examples that drive them (TRAK)")
    _model_and_data(t)
    t.add_argument("--train-data", required=True, help="the labelled training set")
    t.add_argument("--out", required=True, help="output folder: attribution.json, scores.npy, features (resumable)")
    t.add_argument("--other-model", action="append", default=[],
                   help="another model or checkpoint of the same classes for the ensemble (repeat for more)")
    t.add_argument("--targets", type=int, default=100, help="explain the first N examples of --data (default 100)")
    t.add_argument("--proj-dim", type=int, help="project gradients to this many numbers (default: exact gradients "
                                                "for Linear-only models, 2048 otherwise)")
    t.add_argument("--ridge", type=float, default=3.0, help="lambda relative to the kernel's mean eigenvalue (> 0)")
    t.add_argument("--evaluate-lds", action="store_true",
                   help="retrain on random half subsets with --train-fn and report the linear datamodeling score")
    t.add_argument("--train-fn", help="package.module:function, called as fn(x, y, seed=...) -> trained nn.Module")
    t.add_argument("--subsets", type=int, default=50, help="half subsets for --evaluate-lds (default 50)")
    t.add_argument("--seeds", type=int, default=2, help="retraining seeds per subset (default 2)")
    _common(t)

    r = sub.add_parser("train", help="train a model from a factory: standard, PGD, TRADES, IBP or noise training")
    r.add_argument("--model", required=True, help="the factory, package.module:function (called with --factory-kwargs)")
    r.add_argument("--factory-kwargs", help="JSON object of keyword arguments for the factory")
    r.add_argument("--data", required=True, help="the labelled training data (.npz, .pt, .csv, image folder)")
    r.add_argument("--out", required=True, help="output folder: weights.pt, model.json, checkpoint.pt")
    r.add_argument("--method", choices=["standard", "pgd", "trades", "ibp", "noise"], default="standard")
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--eps", type=float, default=0.1, help="Linf radius for pgd, trades and ibp (input units)")
    r.add_argument("--steps", type=int, default=7, help="attack steps for pgd and trades")
    r.add_argument("--beta", type=float, default=6.0, help="TRADES weight of the robustness term")
    r.add_argument("--sigma", type=float, default=0.25, help="noise level for noise training")
    r.add_argument("--ramp-epochs", type=int, default=0, help="epochs to ramp eps up (default: a third, pgd/trades/ibp)")
    r.add_argument("--bounds", help="input bounds 'low,high' (default 0,1), e.g. --bounds -5,15")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _common(r)

    cp = sub.add_parser("compare", help="what changed between two audits (exit 1: a regression gate failed)")
    cp.add_argument("baseline", help="the baseline audit: its --out folder or report.json")
    cp.add_argument("candidate", help="the candidate audit: its --out folder or report.json")
    cp.add_argument("--gate", action="append", default=[], help="a regression gate, e.g. "
                    "'adversarial.robust_accuracy >= baseline - 0.01' (repeatable; added to the candidate's "
                    "compare_gates and those of --config)")
    cp.add_argument("--config", help="a TOML file whose compare_gates are applied too (e.g. the audit.toml)")
    cp.add_argument("--out", help="write compare.json and compare.html to this folder")
    cp.add_argument("--json", action="store_true", help="print the JSON result instead of the summary")
    _common(cp)

    df = sub.add_parser("diff", help="how two models differ: where they disagree and which training examples one "
                        "relies on that the other does not (ModelDiff)")
    _model_args(df)
    df.add_argument("--other-model", required=True, help="the model to compare with (same classes and input domain)")
    df.add_argument("--ensemble", nargs="+", default=[], metavar="MODEL",
                    help="more trainings of the model's recipe (other seeds): attributions are averaged over them and, "
                    "with at least 5 per side, the counterfactual test takes the models as its unit")
    df.add_argument("--other-ensemble", nargs="+", default=[], metavar="MODEL",
                    help="more trainings of the other model's recipe, the same way")
    df.add_argument("--data", required=True, help="labelled audit data both models are compared on")
    df.add_argument("--train-data", required=True, help="the labelled training set both are attributed to")
    df.add_argument("--targets", type=int, default=300, help="audit points attributed (default 300)")
    df.add_argument("--directions", type=int, default=3, help="distinguishing directions per model (default 3)")
    df.add_argument("--top", type=int, default=20, help="training examples listed per direction (default 20)")
    df.add_argument("--max-train", type=int, default=20000, help="training examples attributed to (default 20000)")
    df.add_argument("--proj-dim", type=int, help="gradient projection (default: exact for Linear-only models, "
                    "else 2048)")
    df.add_argument("--seed", type=int, default=0)
    df.add_argument("--out", required=True, help="write diff.json and diff.html to this folder")
    df.add_argument("--json", action="store_true", help="print the JSON result instead of the summary")
    _common(df)

    m = sub.add_parser("monitor", help="two-sample drift tests of a new batch against reference data (exit 1: drift)")
    _model_args(m)
    m.add_argument("--reference", required=True, help="data the model was validated on (labels not needed)")
    m.add_argument("--batch", required=True, help="the new inputs")
    m.add_argument("--alpha", type=float, default=0.05, help="false-alarm rate of the alert (default 0.05)")
    m.add_argument("--out", help="write the result as JSON here")
    m.add_argument("--json", action="store_true", help="print the JSON result instead of the summary")
    _common(m)
    return p


def _model_and_data(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--data", required=True, help=".npz (x, y), .pt, .csv (with --label-column) or an image folder")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="TorchScript file, torch.export .pt2, .onnx, or package.module:factory (with --weights)")
    p.add_argument("--weights", help="state dict (.pt, read with weights_only=True) or .safetensors for a factory")
    p.add_argument("--factory-kwargs", help="JSON object of keyword arguments for the factory")
    p.add_argument("--config", help="audit.toml: checks, options, gates, model bounds and normalisation")
    p.add_argument("--label-column", help="label column of CSV data")
    p.add_argument("--bounds", help="input bounds 'low,high' (default 0,1), e.g. --bounds -5,15 for tabular features")
    p.add_argument("--mean", help="per-channel normalisation mean, e.g. 0.4914,0.4822,0.4465 (applied inside the model)")
    p.add_argument("--std", help="per-channel normalisation std")
    p.add_argument("--device", help="where the model runs: auto (default: CUDA, else MPS, else CPU), cpu, cuda, "
                                    "cuda:N or mps")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for internal errors")


def _config_from_args(args):
    from .config import load_config
    from .loading.models import parse_floats

    cfg = load_config(args.config)
    model = cfg.model.model_dump()
    model.update({k: v for k, v in {
        "weights": args.weights,
        "bounds": parse_floats(args.bounds, "bounds"),
        "mean": parse_floats(args.mean, "mean"),
        "std": parse_floats(args.std, "std"),
        "device": getattr(args, "device", None),
    }.items() if v is not None})
    if args.bounds is not None and len(model["bounds"]) != 2:
        raise UsageError(f"The '--bounds' option needs two numbers 'low,high'; got {args.bounds!r}.")
    if args.factory_kwargs:
        try:
            model["factory_kwargs"] = json.loads(args.factory_kwargs)
        except json.JSONDecodeError as exc:
            raise UsageError(f"The '--factory-kwargs' option must be a JSON object; {exc}.") from None
    from .loading.models import ModelSpec, _looks_like_factory

    if _looks_like_factory(args.model):
        model["factory"], model["path"] = args.model, None
    else:
        model["path"], model["factory"] = args.model, None
    update = {"model": ModelSpec(**model)}
    if getattr(args, "checks", None):
        update["checks"] = [c.strip() for c in args.checks.split(",") if c.strip()]
    if getattr(args, "seed", None) is not None:
        update["seed"] = args.seed
    if args.label_column:
        update["data"] = cfg.data.model_copy(update={"label_column": args.label_column})
    return cfg.model_copy(update=update)


def _cmd_audit(args, progress: Progress) -> int:
    from .report import render_summary
    from .runner import audit

    cfg = _config_from_args(args)
    result = audit(None, args.data, train_data=args.train_data, config=cfg, out=args.out, resume=args.resume,
                   overwrite=args.overwrite, progress=progress, backend=args.backend, workers=args.workers,
                   address=args.address)
    if not args.quiet:
        print(render_summary(result, args.out))
    return result.exit_code


def _cmd_report(args, progress: Progress) -> int:
    from .report import rerender

    path = rerender(Path(args.dir))
    if not args.quiet:
        print(path)
    return EXIT_PASS


def _cmd_demo(args, progress: Progress) -> int:
    from .demo import run_demo
    from .report import render_summary

    result = run_demo(args.out, progress=progress, workers=args.workers)
    if not args.quiet:
        print(render_summary(result, f"{args.out}/report"))
        print(f"The demo's inputs (TorchScript model, .npz data, audit.toml) are in {args.out}/inputs; "
              f"audit them yourself with:\n  brittle audit --model {args.out}/inputs/demo_cnn.ts --data "
              f"{args.out}/inputs/test.npz --train-data {args.out}/inputs/train.npz --config "
              f"{args.out}/inputs/audit.toml --backend process --workers 2 --out my-audit")
    # The demo shows a model that fails its gates on purpose; the command itself succeeded.
    return EXIT_INTERNAL if result.verdict == "error" else EXIT_PASS


def _cmd_calibrate(args, progress: Progress) -> int:
    from .calibrate import calibrate

    fit = calibrate(None, args.data, args.out, config=_config_from_args(args))
    if not args.quiet:
        print(f"temperature {fit.temperature:.4f} fitted on {fit.n} examples of {args.data}: ECE {fit.ece_before:.4f} -> "
              f"{fit.ece_after:.4f}, NLL {fit.nll_before:.4f} -> {fit.nll_after:.4f}\nwrote {fit.path} (audit it on "
              "other data than it was fitted on)")
    return EXIT_PASS


def _cmd_compare(args, progress: Progress) -> int:
    from .compare import compare
    from .config import load_config

    gates = (load_config(args.config).compare_gates if args.config else []) + args.gate
    result = compare(args.baseline, args.candidate, gates=gates)  # the candidate's own compare_gates too
    if args.out:
        result.save(args.out)
    if not args.quiet:
        print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
        if args.out:
            print(f"compare: {Path(args.out) / 'compare.html'} (json: {Path(args.out) / 'compare.json'})")
    return result.exit_code


def _cmd_diff(args, progress: Progress) -> int:
    from ._atomic import write_text
    from .model_diff import diff
    from .report.diff_page import render_diff_page

    cfg = _config_from_args(args)
    result = diff(None, args.other_model, args.data, args.train_data, ensemble=args.ensemble,
                  other_ensemble=args.other_ensemble, targets=args.targets,
                  directions=args.directions, top=args.top, max_train=args.max_train, proj_dim=args.proj_dim,
                  seed=args.seed, config=cfg, progress=progress)
    out = Path(args.out)
    write_text(out / "diff.json", json.dumps(result.to_json(), indent=2))
    write_text(out / "diff.html", render_diff_page(result))
    if not args.quiet:
        print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
        print(f"diff: {out / 'diff.html'} (json: {out / 'diff.json'})")
    return EXIT_PASS


def _cmd_monitor(args, progress: Progress) -> int:
    from .drift import monitor

    result = monitor(None, args.reference, args.batch, alpha=args.alpha, config=_config_from_args(args))
    _emit(result.to_json(), result.summary(), args)
    return EXIT_GATE_FAILED if result.drift else EXIT_PASS


def _cmd_estimate(args, progress: Progress) -> int:
    from .label_free import estimate

    result = estimate(None, args.data, args.target, other_models=args.other_model, config=_config_from_args(args))
    _emit(result.to_json(), result.summary(), args)
    return EXIT_PASS


def _cmd_unlearn_check(args, progress: Progress) -> int:
    from .unlearning import unlearn_check

    result = unlearn_check(None, args.forget, args.retain, args.data, train_fn=args.train_fn,
                           reference_models=args.reference_models, seed=args.seed, alpha=args.alpha,
                           config=_config_from_args(args), progress=progress, reference_cache=args.reference_cache)
    _emit(result.to_json(), result.summary(), args)
    # As for audit: 0 the claim holds (forgotten), 1 it does not or cannot be shown.
    return EXIT_PASS if result.verdict == "forgotten" else EXIT_GATE_FAILED


def _emit(payload: dict, summary: str, args) -> None:
    """A command's result: the JSON written to --out when given; printed, unless --quiet, as the summary a person
    reads (or as the JSON with --json)."""
    text = json.dumps(payload, indent=2)
    if args.out:
        from ._atomic import write_text

        write_text(Path(args.out), text)
    if not args.quiet:
        print(text if args.json else summary + (f"\n(JSON: {args.out})" if args.out else ""))


def _cmd_attribute(args, progress: Progress) -> int:
    import io

    import numpy as np

    from ._atomic import write_bytes, write_text
    from .attribution import attribute, evaluate_lds

    if args.evaluate_lds and not args.train_fn:
        raise UsageError("--evaluate-lds retrains the model: give --train-fn package.module:function, called as "
                         "fn(x, y, seed=...) and returning the trained nn.Module.")
    if args.targets < 1:
        raise UsageError(f"The '--targets' option must be >= 1; got {args.targets}.")
    cfg = _config_from_args(args)
    out = Path(args.out)
    result = attribute(None, args.train_data, args.data, other_models=args.other_model, targets=args.targets,
                       proj_dim=args.proj_dim, ridge=args.ridge, store=out / "features", progress=progress, config=cfg)
    summary = result.summary()
    if args.evaluate_lds:
        from .loading.models import import_callable
        from .prepare import prepare_data, prepare_model

        train_fn = import_callable(args.train_fn, "train function", "it must train and return an nn.Module")
        adapter = prepare_model(None, cfg)
        train = prepare_data(args.train_data, adapter, cfg, role="train_data")
        test = prepare_data(args.data, adapter, cfg, role="data").subset(np.arange(len(result.scores)))
        lds = evaluate_lds(result.scores, train_fn, train.x, train.y, test.x, test.y, subsets=args.subsets,
                           seeds=args.seeds, progress=progress)
        summary["lds"] = {k: v for k, v in lds.items() if k != "per_target"}
    buf = io.BytesIO()
    np.save(buf, result.scores.astype(np.float32))
    write_bytes(out / "scores.npy", buf.getvalue())
    write_text(out / "attribution.json", json.dumps(summary, indent=2))
    if not args.quiet:
        first = summary["targets"][0]
        print(f"attributed {len(result.scores)} targets to {len(result.train_positions)} training examples "
              f"({'exact gradients' if result.exact else f'projected to {result.dim}'}, lambda "
              f"{result.lambdas[0]:.3g}); e.g. data #{first['target']}: top proponents {first['proponents'][:3]}, "
              f"top opponents {first['opponents'][:3]}")
        if "lds" in summary:
            print(f"linear datamodeling score {summary['lds']['lds']:.3f} +/- {summary['lds']['stderr']:.3f} "
                  f"({args.subsets} subsets x {args.seeds} seeds)")
        print(f"wrote {out / 'attribution.json'} and {out / 'scores.npy'} (rows: targets, columns: training examples)")
    return EXIT_PASS


def _cmd_train(args, progress: Progress) -> int:
    from .loading.models import parse_floats
    from .training import TrainConfig, train

    try:
        kwargs = json.loads(args.factory_kwargs) if args.factory_kwargs else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"The '--factory-kwargs' option must be a JSON object; {exc}.") from None
    bounds = parse_floats(args.bounds, "bounds") if args.bounds else [0.0, 1.0]
    if len(bounds) != 2:
        raise UsageError(f"The '--bounds' option needs two numbers 'low,high'; got {args.bounds!r}.")
    cfg = TrainConfig(method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, eps=args.eps,
                      steps=args.steps, beta=args.beta, sigma=args.sigma, ramp_epochs=args.ramp_epochs,
                      bounds=(bounds[0], bounds[1]), seed=args.seed)
    result = train(args.model, args.data, out=args.out, factory_kwargs=kwargs, config=cfg, resume=args.resume,
                   progress=progress)
    if not args.quiet:
        last = result.history[-1] if result.history else {}
        print(f"{args.method} training: {result.epochs_run} epochs, last loss {last.get('loss', float('nan')):.4f}, "
              f"training accuracy {last.get('train_accuracy', float('nan')):.3f}\nwrote {result.weights}; audit it "
              f"with: brittle audit --model {args.model} --weights {result.weights} --data TEST --out AUDIT")
    return EXIT_PASS


def _cmd_checks(args, progress: Progress) -> int:
    from .checks import REGISTRY, available_checks

    for cid in available_checks():
        cls = REGISTRY[cid]
        needs = [n for n, v in vars(cls.needs).items() if v] if hasattr(cls.needs, "__dict__") else []
        print(f"{cid:<14} {cls.title}  needs={','.join(needs) or '-'}  metrics={','.join(cls.metrics) or '-'}")
    return EXIT_PASS


# Options whose value may start with a minus sign; argparse would take "-5,15" for an option.
_SIGNED_VALUES = ("--bounds", "--mean", "--std")


def _join_signed_values(argv: list[str]) -> list[str]:
    """`--bounds -5,15` as `--bounds=-5,15`, which is what the user meant."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _SIGNED_VALUES and i + 1 < len(argv) and re.match(r"^-\.?\d", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_join_signed_values(list(sys.argv[1:] if argv is None else argv)))
    progress = Progress.for_terminal(quiet=args.quiet)
    # Only the CLI decides what reaches the terminal; torch's deprecation notes are not the user's problem.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    handlers = {"audit": _cmd_audit, "report": _cmd_report, "demo": _cmd_demo, "checks": _cmd_checks,
                "calibrate": _cmd_calibrate, "monitor": _cmd_monitor, "compare": _cmd_compare,
                "estimate": _cmd_estimate, "attribute": _cmd_attribute, "unlearn-check": _cmd_unlearn_check,
                "train": _cmd_train, "diff": _cmd_diff}
    try:
        with command_line():
            return handlers[args.command](args, progress)
    except BrittleError as exc:
        print(f"brittle: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("brittle: interrupted; finished work is kept, continue with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: say so plainly, keep the traceback for a bug report
        if args.debug:
            traceback.print_exc()
        else:
            print(f"brittle: internal error: {type(exc).__name__}: {exc}\n(run again with --debug for the traceback "
                  "and report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
