"""`edgeslim` command line: the same CompressedModel YAML as `kubectl apply`, run locally.

Exit codes: 0 the result passed the gate, 3 the gate rejected it, 2 bad input
(one line naming the field or file at fault), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from edgeslim import __version__
from edgeslim.api.errors import format_validation_error
from edgeslim.api.policy import CompressionPolicy, apply_policy
from edgeslim.api.spec import CompressedModel
from edgeslim.errors import BadInput, OutputModelFailed, StorageUnavailable
from edgeslim.redact import redact
from edgeslim.serving.limits import SETTINGS as SERVE_LIMITS
from edgeslim.serving.limits import env_default
from edgeslim.spec_file import parse as parse_yaml
from edgeslim.spec_file import read_spec_document, read_text

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_REJECTED = 0, 1, 2, 3
POLICY_HELP = (
    "CompressionPolicy YAML whose defaults the spec inherits (merged as the operator "
    "does: the spec's own keys win)"
)


def load_spec(path: Path, policy: Path | None = None) -> CompressedModel:
    # Size, encoding, nesting and alias expansion are bounded before pydantic walks it.
    doc = read_spec_document(path)
    if policy is not None:
        doc = apply_policy(doc, load_policy(policy))
    try:
        return CompressedModel.model_validate(doc)
    except ValidationError as exc:
        message = format_validation_error(exc)
        if policy is None and ("evaluation" in message or "pipeline and optimize" in message):
            message += " (or give --policy with the CompressionPolicy that supplies it)"
        raise BadInput(f"{path}: {message}") from exc


def load_policy(path: Path) -> CompressionPolicy:
    """A CompressionPolicy file, read with the same bounds as a spec."""
    docs = [d for d in parse_yaml(read_text(path), str(path)) if d is not None]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise BadInput(f"{path}: expected exactly one CompressionPolicy mapping")
    try:
        return CompressionPolicy.model_validate(docs[0])
    except ValidationError as exc:
        raise BadInput(f"{path}: {format_validation_error(exc)}") from exc


def load_spec_from_env(name: str) -> CompressedModel:
    """The spec as JSON in an environment variable: how the operator hands it to a Job."""
    text = os.environ.get(name)
    if not text:
        raise BadInput(f"environment variable {name} holding the spec is not set")
    try:
        return CompressedModel.model_validate_json(text)
    except ValidationError as exc:
        raise BadInput(f"{name}: {format_validation_error(exc)}") from exc


def for_target(obj: CompressedModel, name: str | None) -> CompressedModel:
    """The spec of one spec.targets entry (`CompressedModelSpec.for_target`), as the
    operator gives it to that target's Job: its recipe, its spec hash and artifact
    folder. A spec with one target means it; with several, --target says which."""
    names = [t.name for t in obj.spec.targets or []]
    if name is None and len(names) > 1:
        raise BadInput(f"spec.targets names {', '.join(names)}: choose one with --target")
    name = name if name is not None else (names[0] if names else None)
    if name is None:
        return obj
    if name not in names:
        raise BadInput(f"--target {name}: spec.targets names {', '.join(names) or 'no targets'}")
    return obj.model_copy(update={"spec": obj.spec.for_target(name)})


def existing_dir(value: str) -> Path:
    """argparse type for --workdir: a missing folder is a usage error (exit 2), not a
    traceback from deep inside tempfile."""
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is not an existing folder")
    return path


def cmd_compress(args: argparse.Namespace) -> int:
    from edgeslim.clitable import LineProgress, RichProgress, console, print_result
    from edgeslim.compressor.pipeline import compress, write_termination_message

    if (args.spec is None) == (args.spec_env is None):
        raise BadInput("give a spec file or --spec-env NAME, not both or neither")
    obj = load_spec(args.spec, args.policy) if args.spec else load_spec_from_env(args.spec_env)
    obj = for_target(obj, args.target)
    if args.plan or args.candidate is not None:
        return _fanout_step(args, obj)
    bars = console.is_terminal or args.quiet
    with (
        tempfile.TemporaryDirectory(prefix="edgeslim-", dir=args.workdir) as tmp,
        RichProgress(quiet=args.quiet) if bars else LineProgress() as progress,
    ):
        if args.pick:
            from edgeslim.compressor import optimize_fanout

            run = optimize_fanout.pick
        else:
            run = compress
        outcome = run(
            obj,
            output=args.output,
            workdir=Path(tmp),
            progress=progress,
            log=progress.log,
            reuse=not args.force,
        )
    write_termination_message(outcome)
    pictures = _pareto_pictures(outcome)
    if not args.quiet:
        print_result(outcome)
        for line in pictures:
            console.print(line, highlight=False, soft_wrap=True)
    else:
        console.print(outcome.manifest_uri)
    return EXIT_OK if outcome.result.gate.passed else EXIT_REJECTED


def candidate_index(value: str | None) -> int:
    """--candidate N, or a bare --candidate in an Indexed Job: JOB_COMPLETION_INDEX."""
    text = value if value is not None else os.environ.get("JOB_COMPLETION_INDEX", "")
    if not re.fullmatch(r"[0-9]{1,6}", text.strip()):
        source = "--candidate" if value is not None else "JOB_COMPLETION_INDEX"
        raise BadInput(f"{source} {text!r}: expected a candidate index (0, 1, ...)")
    return int(text)


def _fanout_step(args: argparse.Namespace, obj: CompressedModel) -> int:
    """--plan or --candidate: one step of a search fanned out over processes (Jobs)."""
    from edgeslim.clitable import LineProgress, RichProgress, console
    from edgeslim.compressor import optimize_fanout

    bars = console.is_terminal or args.quiet
    with (
        tempfile.TemporaryDirectory(prefix="edgeslim-", dir=args.workdir) as tmp,
        RichProgress(quiet=args.quiet) if bars else LineProgress() as progress,
    ):
        log = progress.log
        common = {"output": args.output, "workdir": Path(tmp), "log": log, "progress": progress}
        if args.plan:
            plan, uri = optimize_fanout.write_plan(obj, **common)
            optimize_fanout.write_plan_message(plan, uri)
            console.print(
                f"{uri} ({len(plan.recipes)} candidates)", highlight=False, soft_wrap=True
            )
            return EXIT_OK
        n = candidate_index(None if args.candidate == "" else args.candidate)
        record, uri, skipped = optimize_fanout.evaluate_one(obj, n, **common)
    verdict = "passed" if record.figures.passed else "failed"
    line = f"{uri} {verdict}{' (already stored)' if skipped else ''}"
    console.print(line, highlight=False, soft_wrap=True)  # one line: scripts read it
    return EXIT_OK


def _pareto_pictures(outcome) -> list[str]:
    """pareto.png / pareto.svg beside an optimize search's manifest; what happened, in words."""
    from edgeslim.compressor import optimize_plot

    if not outcome.result.candidates:
        return []
    if not optimize_plot.available():
        return ["pareto plot skipped: matplotlib is missing (pip install 'edgeslim[plot]')"]
    return [
        f"pareto plot {uri}" for uri in optimize_plot.write(outcome.result, outcome.manifest_uri)
    ]


def cmd_validate(args: argparse.Namespace) -> int:
    obj = load_spec(args.spec, args.policy)
    pipeline = obj.spec.pipeline or []
    what = (
        f"optimize for {obj.spec.optimize.objective.value}"
        if obj.spec.optimize
        else f"{len(pipeline)} steps ({', '.join(s.type for s in pipeline)})"
    )
    print(f"{obj.metadata.name}: valid, spec hash {obj.spec.spec_hash()}, {what}")
    return EXIT_OK


def cmd_crd(args: argparse.Namespace) -> int:
    from edgeslim.api import crd

    text = crd.render_crd()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    if args.policy_output is not None:
        args.policy_output.parent.mkdir(parents=True, exist_ok=True)
        args.policy_output.write_text(crd.render_policy_crd())
    if args.chart is not None:
        for template, render in (
            (crd.HELM_TEMPLATE, crd.render_helm_crd),
            (crd.POLICY_HELM_TEMPLATE, crd.render_policy_helm_crd),
        ):
            (args.chart / template).parent.mkdir(parents=True, exist_ok=True)
            (args.chart / template).write_text(render())
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    # Imported here: the serving stack (onnxruntime, uvicorn) is an extra of its own.
    from edgeslim.serving.limits import ServingLimits
    from edgeslim.serving.server import ServeOptions, serve

    if args.threads < 0 or not 0 < args.port < 65536:
        raise BadInput("--threads must be >= 0, --port in 1..65535")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        raise BadInput(
            f"--name {args.name!r}: use letters, digits, '.', '_' and '-' "
            "(it is a path segment of /v2/models/{name})"
        )
    if args.sha256 and not re.fullmatch(r"(sha256:)?[0-9a-fA-F]{64}", args.sha256.strip()):
        raise BadInput(f"--sha256 {args.sha256!r}: expected 64 hexadecimal characters")
    if args.next_part_url:
        from edgeslim.serving.chain import NextPart

        # Checked here, so a malformed URL is exit 2 before anything listens.
        NextPart(
            args.next_part_url, args.name, timeout=args.next_part_timeout, max_response_bytes=1
        )
    if args.shadow_url:
        from edgeslim.serving.shadow import parse_urls

        parse_urls(args.shadow_url)  # exit 2 before anything listens
    if not 0 < args.shadow_sample_rate <= 1:
        raise BadInput(f"--shadow-sample-rate {args.shadow_sample_rate}: must be in (0, 1]")
    return serve(
        ServeOptions(
            model=args.model,
            name=args.name,
            host=args.host,
            port=args.port,
            sha256=args.sha256,
            threads=args.threads,
            limits=ServingLimits(**{s.field: getattr(args, s.field) for s in SERVE_LIMITS}),
            graceful_timeout=args.graceful_timeout,
            workdir=args.workdir,
            log_level=args.log_level,
            next_part_url=args.next_part_url or None,
            next_part_timeout=args.next_part_timeout,
            shadow_url=args.shadow_url or None,
            shadow_sample_rate=args.shadow_sample_rate,
        )
    )


def cmd_split(args: argparse.Namespace) -> int:
    """`edgeslim split`: the model cut into parts that run one after another (model parallelism)."""
    from edgeslim.api.split import SplitCheck
    from edgeslim.compressor import split as splitting
    from edgeslim.compressor.datasets import load as load_dataset
    from edgeslim.compressor.model_io import load_model

    if args.parts < 1:
        raise BadInput(f"--parts {args.parts}: a model is split into 1 or more parts")
    if args.max_part_bytes is not None and args.max_part_bytes < 1:
        raise BadInput(f"--max-part-bytes {args.max_part_bytes}: must be a positive byte count")
    if not args.model.is_file():
        raise BadInput(f"{args.model}: no such model file")
    model = load_model(args.model, str(args.model))
    result = splitting.split(
        model, args.parts, max_part_bytes=args.max_part_bytes, source_file=args.model.name
    )
    if args.check is not None:
        data = load_dataset(args.check, model, str(args.check)).head(splitting.CHECK_SAMPLES)
        feeds = [data.batch(i, i + 1) for i in range(len(data))]
        source = str(args.check)
    else:
        feeds, source = [splitting.synthetic_feed(model)], "synthetic"
    diff, samples = splitting.compare_chain(model, result.parts, feeds)
    check = SplitCheck(
        source=source,
        samples=samples,
        max_abs_diff=diff,
        tolerance=splitting.CHECK_TOLERANCE,
        passed=diff <= splitting.CHECK_TOLERANCE,
    )
    plan = result.plan.model_copy(update={"check": check})
    args.output.mkdir(parents=True, exist_ok=True)
    for part, record in zip(result.parts, plan.parts, strict=True):
        (args.output / record.file).write_bytes(part.SerializeToString())
    (args.output / "split.json").write_text(
        plan.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n"
    )
    for part in plan.parts:
        print(
            f"{args.output / part.file}: {part.nodes} nodes, {part.parameter_bytes} parameter "
            f"bytes, ~{part.estimated_peak_bytes} bytes peak, "
            f"{len(part.inputs)} inputs -> {len(part.outputs)} outputs"
        )
    for cut in plan.cuts:
        names = ", ".join(t.name for t in cut.tensors)
        print(f"cut after part {cut.after}: {cut.bytes} bytes per sample ({names})")
    verdict = "ok" if check.passed else f"over the {check.tolerance} tolerance"
    print(f"chain vs whole model on {samples} samples ({source}): max |diff| {diff:.3g}, {verdict}")
    if not check.passed:
        raise OutputModelFailed(
            f"the chain of parts differs from the whole model by {diff:.3g} "
            f"(tolerance {check.tolerance}); {args.output / 'split.json'} records it"
        )
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    from edgeslim.operator.credentials import without_kubernetes_client

    without_kubernetes_client()  # ~31 MB the operator never uses; before kopf is imported
    from edgeslim.operator.main import run

    return run(namespaces=args.namespace, verbose=args.verbose)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeslim", description="Compress ML models for edge fleets.")
    p.add_argument("--version", action="version", version=f"edgeslim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="run a CompressedModel spec locally")
    c.add_argument(
        "spec", type=Path, nargs="?", help="CompressedModel YAML (the same file kubectl applies)"
    )
    c.add_argument(
        "--spec-env", metavar="NAME", help="read the spec as JSON from this environment variable"
    )
    c.add_argument("--output", help="output location; overrides spec.output.uri")
    c.add_argument("--policy", type=Path, default=None, help=POLICY_HELP)
    c.add_argument(
        "--target",
        metavar="NAME",
        help="compress for this spec.targets entry (its recipe, spec hash and folder)",
    )
    c.add_argument(
        "--workdir", type=existing_dir, default=None, help="scratch folder (default: system temp)"
    )
    c.add_argument("--quiet", action="store_true", help="no progress bars or table")
    c.add_argument(
        "--force",
        action="store_true",
        help="recompute even when a result for this spec hash is already stored",
    )
    fan = c.add_mutually_exclusive_group()  # spec.optimize over separate processes (Jobs)
    fan.add_argument(
        "--plan",
        action="store_true",
        help="optimize: write the candidates that can run independently (plan.json)",
    )
    fan.add_argument(
        "--candidate",
        nargs="?",
        const="",
        metavar="N",
        help="optimize: evaluate candidate N of the plan into candidates/N/ (skipped when "
        "stored); without N, JOB_COMPLETION_INDEX (an Indexed Job)",
    )
    fan.add_argument(
        "--pick",
        action="store_true",
        help="optimize: finish the search with the stored candidates and write the winner",
    )
    c.set_defaults(func=cmd_compress)

    v = sub.add_parser("validate", help="check a spec without running it")
    v.add_argument("spec", type=Path)
    v.add_argument("--policy", type=Path, default=None, help=POLICY_HELP)
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("crd", help="print the CompressedModel CRD generated from the spec models")
    d.add_argument("--output", type=Path, default=None, help="write it to this file instead")
    d.add_argument(
        "--policy-output",
        type=Path,
        default=None,
        help="also write the CompressionPolicy CRD to this file",
    )
    d.add_argument(
        "--chart", type=Path, default=None, help="also write both CRDs into this Helm chart"
    )
    d.set_defaults(func=cmd_crd)

    s = sub.add_parser("serve", help="serve an ONNX model over the Open Inference Protocol v2")
    s.add_argument("--model", required=True, help="model URI: s3://bucket/key, file:// or a path")
    s.add_argument("--name", required=True, help="model name in /v2/models/{name}")
    s.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    s.add_argument("--port", type=int, default=8080, help="default 8080, as in KServe")
    s.add_argument(
        "--sha256", help="expected sha256 of the model; the server stays unready on a mismatch"
    )
    s.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads (default 0: the CPUs this container "
        "may use, from its cgroup quota and affinity)",
    )
    for setting in SERVE_LIMITS:  # what a client may cost the server (README: Serving)
        s.add_argument(
            f"--{setting.flag}",
            type=type(setting.default),
            default=env_default(setting),
            help=f"{setting.help} (default {setting.default}; env {setting.env})",
        )
    s.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    s.add_argument(
        "--workdir", type=existing_dir, default=None, help="where s3:// models are downloaded"
    )
    s.add_argument(
        "--next-part-url",
        default=os.environ.get("EDGESLIM_NEXT_PART_URL"),
        help="serve one part of a split model (edgeslim split): send its outputs to the next "
        "part at http://host:port[/v2/models/NAME] and answer with what comes back; ready "
        "only while the next part is (env EDGESLIM_NEXT_PART_URL)",
    )
    s.add_argument(
        "--next-part-timeout",
        type=float,
        default=os.environ.get("EDGESLIM_NEXT_PART_TIMEOUT", "30"),
        help="seconds to wait on the next part (default 30; env EDGESLIM_NEXT_PART_TIMEOUT)",
    )
    s.add_argument(
        "--shadow-url",
        default=None,
        help="a canary: also send a sample of requests to these stable servers "
        "(http://host:port[,...]) in the background and count how often the answers agree "
        "(edgeslim_serving_shadow_* metrics); the client always gets this server's answer",
    )
    s.add_argument(
        "--shadow-sample-rate",
        type=float,
        default=0.1,
        help="share of requests compared with a stable server (default 0.1)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)

    sp = sub.add_parser(
        "split",
        help="cut an ONNX model into parts that run one after another on separate devices",
    )
    sp.add_argument("model", type=Path, help="the ONNX model file")
    sp.add_argument("--parts", type=int, required=True, help="how many parts (1 or more)")
    sp.add_argument(
        "--max-part-bytes",
        type=int,
        default=None,
        help="a budget of parameter bytes per part (default: balance the parts)",
    )
    sp.add_argument(
        "--output", type=Path, required=True, help="folder for part-N.onnx and split.json"
    )
    sp.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="DATASET.npz",
        help="compare the chain with the whole model on this dataset "
        "(default: one synthetic sample)",
    )
    sp.set_defaults(func=cmd_split)

    o = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    o.add_argument(
        "--namespace",
        action="append",
        help="watch only this namespace (repeatable; "
        "default: EDGESLIM_NAMESPACE, else cluster-wide)",
    )
    o.add_argument("--verbose", action="store_true", help="kopf's verbose logging")
    o.set_defaults(func=cmd_operator)
    return p


def one_line(text: str, limit: int = 2000) -> str:
    """A message as one line of bounded length: scripts and log collectors read line by line,
    and a parser quoting a hostile file must not flood the terminal."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BadInput as exc:
        print(f"edgeslim: error: {one_line(redact(str(exc)))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StorageUnavailable as exc:
        print(f"edgeslim: storage unavailable: {redact(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except OutputModelFailed as exc:
        # Ours, but already located (the step chain is named): one line, no traceback.
        print(f"edgeslim: error: {one_line(redact(str(exc)))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception:
        # Our bug or the environment's: keep the traceback (it is what a bug
        # report needs) but never with the credentials it may quote.
        import traceback

        sys.stderr.write(redact(traceback.format_exc()))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
