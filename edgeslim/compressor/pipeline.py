"""fetch -> load -> [simplify|prune|distill|quantize]* -> evaluate -> gate -> export -> push.

The one entry point both the CLI and the in-cluster compressor Job call.
Every dataset is fetched and checked against the model before the first step
runs, so a bad spec fails in seconds, not after an hour of distillation, and
nothing is written to the output until the result is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from edgeslim import __version__, storage
from edgeslim.api.result import (
    CompressionResult,
    EvaluationFigures,
    GateVerdict,
    InputIdentity,
    LatencyFigures,
    MemoryFigures,
    ModelFigures,
    StepRecord,
    inputs_id,
)
from edgeslim.api.spec import CompressedModel, Evaluation
from edgeslim.api.termination import TerminationMessage
from edgeslim.compressor import channel_map, datasets, evaluate, graph, model_io, steps
from edgeslim.compressor.datasets import Dataset
from edgeslim.errors import BadInput, OutputModelFailed

MODEL_FILE = "model.onnx"
# A rejected artifact is kept for inspection under a name no deployer looks for.
REJECTED_MODEL_FILE = "model.rejected.onnx"
MANIFEST_FILE = "manifest.json"
# A manifest is a few KiB; anything far bigger at that name is not ours to parse.
MANIFEST_MAX_BYTES = 4 * 1024 * 1024


@dataclass
class Outcome:
    result: CompressionResult
    model_uri: str
    manifest_uri: str


class Workspace:
    """The inputs of one run, each fetched once into a scratch folder.

    Every fetch is a copy hashed while it is written (local files too), and
    only the copy is read afterwards, so the bytes a pin was checked against
    are the bytes that are used. A URI is fetched once however often it is
    used, but a pin given with any later use is checked again against that
    copy: an unpinned use first must not let a pinned use skip its check.
    Each dataset is read once however many steps (and the pre-flight) bind it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, storage.Fetched] = {}
        self.fields: dict[str, str] = {}
        """URI -> the spec field that first named it (recorded in the manifest)."""
        self.sidecars: dict[str, list[str]] = {}
        self.arrays: dict[str, dict[str, np.ndarray]] = {}

    def fetched(
        self, uri: str, sha256: str | None, what: str, field: str | None = None
    ) -> storage.Fetched:
        got = self.files.get(uri)
        if got is None:
            got = storage.fetch_verified(
                uri, self.root / f"fetch-{len(self.files)}", sha256=sha256, what=what
            )
            self.files[uri], self.fields[uri] = got, field or what
        else:
            storage.verify_sha256(got, sha256, what)
        return got

    def fetch(self, uri: str, sha256: str | None, what: str, field: str | None = None) -> Path:
        return self.fetched(uri, sha256, what, field).path

    def model_file(self, uri: str, sha256: str | None, what: str, field: str | None = None) -> Path:
        """A model's scratch copy, with its external-data files fetched next to it.

        A pin names one file's sha256 and so cannot vouch for external-data
        files (weights the .onnx points at): a pinned model that has any is
        refused rather than run partly unverified. Unpinned, they are fetched
        from beside the model into the copy's folder, and only that is read.
        """
        path = self.fetch(uri, sha256, what, field)
        if uri not in self.sidecars:
            self.sidecars[uri] = _external_data(path, uri)
        locations = self.sidecars[uri]
        if not locations:
            return path
        shown = ", ".join(locations[:3]) + (", ..." if len(locations) > 3 else "")
        if sha256 is not None:
            raise BadInput(
                f"{what} {uri}: keeps weights in external data files ({shown}) that its "
                "sha256 pin cannot cover; a pinned model must be one self-contained file "
                "(onnx.save(model, path, save_as_external_data=False), for models under "
                "2 GiB), or remove the pin"
            )
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        for location in locations:
            target = path.parent / location
            if (
                PurePosixPath(location).is_absolute()
                or ".." in PurePosixPath(location).parts
                or "\\" in location
                or target == path
            ):
                raise BadInput(
                    f"{what} {uri}: external data {location!r} points outside the model's folder"
                )
            sidecar = storage.join(base, location)
            if sidecar not in self.files:
                self.files[sidecar] = storage.fetch_verified(
                    sidecar, target.parent, what=f"{what} external data"
                )
                self.fields[sidecar] = f"{field or what} external data {location}"
        return path

    def identities(self) -> list[InputIdentity]:
        """The content identity of every file fetched so far, for the manifest."""
        return [
            InputIdentity(
                field=self.fields[uri],
                uri=uri,
                sha256=got.sha256,
                size_bytes=got.size_bytes,
                etag=got.etag,
                version_id=got.version_id,
            )
            for uri, got in self.files.items()
        ]

    def dataset(self, uri: str, sha256: str | None, model: onnx.ModelProto) -> Dataset:
        path = self.fetch(uri, sha256, "dataset")  # checks this use's pin, cached or not
        if uri not in self.arrays:
            self.arrays[uri] = datasets.read(path, uri)
        return datasets.bind(self.arrays[uri], model, uri)

    def model(
        self,
        uri: str,
        sha256: str | None,
        example_from: str | None = None,
        allow_model_code: bool = False,
    ) -> onnx.ModelProto:
        path = self.model_file(uri, sha256, "model")
        example = (
            model_io.read_npz_example(self.files[example_from].path, example_from)
            if example_from
            else None
        )
        return model_io.load_model(path, uri, example, allow_model_code=allow_model_code)


def _external_data(path: Path, where: str) -> list[str]:
    """Locations of the external-data files an ONNX file refers to (none for other formats)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if model_io.sniff(path, where) != "onnx":
        return []
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError):
        return []  # not ONNX at all: load_model says so in its own words
    found: set[str] = set()
    for g in graph.iter_graphs(proto.graph):
        tensors = list(g.initializer)
        for node in g.node:
            for attr in node.attribute:
                tensors.extend([attr.t] if attr.HasField("t") else [])
                tensors.extend(attr.tensors)
        found.update(ExternalDataInfo(t).location for t in tensors if uses_external_data(t))
    return sorted(found)


def _datasets_in(obj: CompressedModel) -> list[tuple[str, str | None, str]]:
    """(uri, sha256, field) of every dataset the spec names, evaluation first."""
    ev = obj.spec.evaluation
    found = [(ev.dataset, ev.dataset_sha256, "evaluation.dataset")]
    opt = obj.spec.optimize
    if opt is not None and opt.train_dataset:
        found.append((opt.train_dataset, opt.train_dataset_sha256, "optimize.trainDataset"))
    for i, step in enumerate(obj.spec.pipeline or []):
        cfg = step.config
        if step.type == "distill":
            found.append((cfg.dataset, cfg.dataset_sha256, f"pipeline[{i}].distill.dataset"))
        if step.type in ("quantize", "prune") and cfg.calibration_dataset:
            found.append(
                (cfg.calibration_dataset, None, f"pipeline[{i}].{step.type}.calibrationDataset")
            )
    return found


@dataclass
class Fetched:
    """A spec's inputs fetched into scratch with every pin checked, and where its result goes."""

    obj: CompressedModel
    prefix: str
    namespace: str
    spec_hash: str
    ws: Workspace
    source_path: Path
    ev_path: Path
    inputs: list[InputIdentity]


@dataclass
class Loaded:
    """The source loaded and every dataset checked against it: what steps and candidates run on."""

    source: onnx.ModelProto
    source_fig: ModelFigures
    eval_data: Dataset
    step_ctx: steps.StepContext


def compress(
    obj: CompressedModel,
    *,
    output: str | None,
    workdir: Path,
    progress: steps.Progress | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    reuse: bool = True,
) -> Outcome:
    """Run the spec's pipeline and write its result under storage.result_prefix
    (<output>/<namespace>/<name>/<spec-hash>/<inputs-id>/; namespace `default`
    without one; inputs-id a digest of the bytes of every input).

    With `reuse`, a complete result already stored there for the same input
    bytes is returned as it is: a retried Job or a rerun never recomputes it,
    and an artifact that pods may be serving is never replaced by different
    bytes. Inputs with new content at the same URIs are computed again.
    """
    progress = progress or steps.NullProgress()
    f = fetch_inputs(obj, output=output, workdir=workdir, log=log)
    if reuse and (done := stored_result(f, log)) is not None:
        return done
    ld = load_inputs(f, progress)
    spec, source, ctx = obj.spec, ld.source, ld.step_ctx
    if spec.optimize is not None:  # a search over recipes instead of one pipeline
        from edgeslim.compressor import optimize

        return optimize.run(optimize.run_of(f, ld), ld.eval_data, log)
    model, current = source, graph.figures(source.SerializeToString(), source)
    records: list[StepRecord] = []
    for i, entry in enumerate(spec.pipeline):
        log(f"step {i + 1}/{len(spec.pipeline)}: {entry.type}")
        try:
            model, record = steps.run_recorded(entry, model, current, ctx)
        except BadInput as exc:
            raise BadInput(f"pipeline[{i}].{entry.type}: {exc}") from exc
        records.append(record)
        current = record.after
    return _finish(obj, f, ld, model, records, progress, log)


def fetch_inputs(
    obj: CompressedModel, *, output: str | None, workdir: Path, log: Callable[[str], None]
) -> Fetched:
    """Fetch every input and check every pin: the first thing any run of a spec does."""
    spec = obj.spec
    output_uri = output or (spec.output.uri if spec.output else None)
    if not output_uri:
        raise BadInput("output: no output location; set spec.output.uri or pass --output")
    spec_hash = spec.spec_hash()
    namespace = obj.metadata.namespace or storage.DEFAULT_NAMESPACE
    storage.result_prefix(output_uri, namespace, obj.metadata.name, spec_hash)  # validates
    ws = Workspace(workdir)

    # Every input is fetched, and every pin checked, before anything else: a
    # stored result is reused only for the same content of every input (the
    # spec hash names URIs, and a URI can be given new bytes).
    log(f"fetching {spec.source.uri}")
    source_path = ws.model_file(spec.source.uri, spec.source.sha256, "source model", "source")
    ev_path = ws.fetch(
        spec.evaluation.dataset,
        spec.evaluation.dataset_sha256,
        "evaluation dataset",
        "evaluation.dataset",
    )
    for uri, sha, field in _datasets_in(obj):
        ws.fetch(uri, sha, field)
    for i, step in enumerate(spec.pipeline or []):
        if step.type == "distill" and step.config.student is not None:
            student = step.config.student
            field = f"pipeline[{i}].distill.student"
            ws.model_file(student.uri, student.sha256, field, field)
    inputs = ws.identities()
    # The result's folder is named by the inputs' content too: new bytes at the
    # same URIs never overwrite the artifact the old bytes made (pods may serve it).
    prefix = storage.result_prefix(
        output_uri, namespace, obj.metadata.name, spec_hash, inputs_id(inputs)
    )
    return Fetched(obj, prefix, namespace, spec_hash, ws, source_path, ev_path, inputs)


def stored_result(f: Fetched, log: Callable[[str], None]) -> Outcome | None:
    """The complete result already stored for this spec and these input bytes, if any."""
    name = f.obj.metadata.name
    found = _stored_result(f.prefix, name, f.namespace, f.spec_hash, f.inputs, f.ws, log)
    if found is not None:
        return found
    # Results stored before the inputs named their folder lie in the spec hash's
    # folder itself; one computed from these same bytes is still this run's.
    legacy = f.prefix.rstrip("/").rsplit("/", 1)[0] + "/"
    return _stored_result(legacy, name, f.namespace, f.spec_hash, f.inputs, f.ws, log)


def load_inputs(f: Fetched, progress: steps.Progress) -> Loaded:
    """Load the source and check every dataset against it before any step spends time."""
    obj, ws, source_path, ev_path, workdir = f.obj, f.ws, f.source_path, f.ev_path, f.ws.root
    spec = obj.spec
    source = model_io.load_model(
        source_path,
        f"source model {spec.source.uri}",
        model_io.read_npz_example(ev_path, spec.evaluation.dataset),
        allow_model_code=spec.source.allow_model_code,
    )
    graph.constants_to_initializers(source)
    # Pre-flight: every dataset must fit the model before any step spends time.
    for uri, sha, field in _datasets_in(obj):
        try:
            ws.dataset(uri, sha, source)
        except BadInput as exc:
            raise BadInput(f"{field}: {exc}") from exc
    eval_data = ws.dataset(spec.evaluation.dataset, spec.evaluation.dataset_sha256, source).head(
        spec.evaluation.samples
    )

    # Distillation students whose own spec opts in to running their (TorchScript) code.
    model_code_ok = {
        s.config.student.uri
        for s in spec.pipeline or []
        if s.type == "distill" and s.config.student and s.config.student.allow_model_code
    }
    ctx = steps.StepContext(
        source=source,
        workdir=workdir,
        load_dataset=ws.dataset,
        load_model=lambda uri, sha: ws.model(
            uri, sha, spec.evaluation.dataset, allow_model_code=uri in model_code_ok
        ),
        evaluation_dataset=spec.evaluation.dataset,
        train_datasets=[s.config.dataset for s in spec.pipeline or [] if s.type == "distill"]
        + ([spec.optimize.train_dataset] if spec.optimize and spec.optimize.train_dataset else []),
        progress=progress,
    )
    source_bytes = source_path.read_bytes()
    # Sizes and sha of the file as given; parameters of the loaded graph (for a
    # TorchScript source, the ONNX it was converted to).
    source_fig = graph.figures(source_bytes, source, uri=spec.source.uri)
    return Loaded(source, source_fig, eval_data, ctx)


def _finish(
    obj: CompressedModel,
    f: Fetched,
    ld: Loaded,
    model: onnx.ModelProto,
    records: list[StepRecord],
    progress: steps.Progress,
    log: Callable[[str], None],
) -> Outcome:
    """Measure the pipeline's model against the gate and write it with its manifest."""
    spec, prefix, workdir = obj.spec, f.prefix, f.ws.root
    source, eval_data = ld.source, ld.eval_data
    source_fig, namespace, spec_hash, inputs = ld.source_fig, f.namespace, f.spec_hash, f.inputs
    log("evaluating")
    model = channel_map.without(model)  # pruning's provenance is not part of the artifact
    result_bytes = model.SerializeToString()
    ev_fig, lat_fig, mem_fig, notes = _measure(
        spec.evaluation, source, model, eval_data, workdir, progress, spec.source.uri, records
    )
    for note in notes:
        log(note)
    passed = ev_fig.drop <= spec.evaluation.max_metric_drop
    gate = GateVerdict(
        passed=passed,
        max_metric_drop=spec.evaluation.max_metric_drop,
        reason=_gate_reason(ev_fig, spec.evaluation.max_metric_drop, passed),
    )
    model_uri = storage.join(prefix, MODEL_FILE if passed else REJECTED_MODEL_FILE)
    manifest_uri = storage.join(prefix, MANIFEST_FILE)
    artifact = graph.figures(result_bytes, model, uri=model_uri)
    split_spec = spec.deployment.split if spec.deployment else None
    split_out = None
    if passed and split_spec is not None:
        from edgeslim.compressor.split_artifact import split_artifact

        log("splitting the artifact into parts (deployment.split)")
        split_out = split_artifact(model, split_spec, eval_data, model_uri)
    result = CompressionResult(
        name=obj.metadata.name,
        namespace=namespace,
        spec_hash=spec_hash,
        source=source_fig,
        artifact=artifact,
        steps=records,
        evaluation=ev_fig,
        latency=lat_fig,
        memory=mem_fig,
        compression_ratio=round(source_fig.size_bytes / artifact.size_bytes, 4),
        download_ratio=round(source_fig.gzip_size_bytes / artifact.gzip_size_bytes, 4),
        gate=gate,
        versions=_versions(),
        inputs=inputs,
        notes=notes,
        split=split_out.record if split_out else None,
    )
    log(f"writing {prefix}")
    # The model goes first and the manifest last: a manifest's presence means a complete result.
    storage.put_bytes(result_bytes, model_uri)
    for blob, uri in split_out.files if split_out else []:
        storage.put_bytes(blob, uri)
    storage.put_bytes(
        json.dumps(result.wire(), indent=2).encode(), manifest_uri, "application/json"
    )
    return Outcome(result=result, model_uri=model_uri, manifest_uri=manifest_uri)


def _stored_result(
    prefix: str,
    name: str,
    namespace: str,
    spec_hash: str,
    inputs: list[InputIdentity],
    ws: Workspace,
    log: Callable[[str], None],
) -> Outcome | None:
    """The result already written under `prefix`, if it is this run's and intact.

    Anything else (unreadable, another object's, computed from other input
    bytes, artifact elsewhere or damaged) is computed again, into this
    prefix only, and the reason is logged.
    """
    manifest_uri = storage.join(prefix, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        return None
    try:
        result = CompressionResult.model_validate_json(
            storage.read_bytes(manifest_uri, max_bytes=MANIFEST_MAX_BYTES, what="stored manifest")
        )
        why = reuse_mismatch(result, name, namespace, spec_hash, prefix, inputs)
        if why is None:
            ws.fetch(result.artifact.uri, result.artifact.sha256, "stored artifact")
    except (BadInput, ValueError) as exc:
        why = f"is unreadable or damaged: {exc}"
    if why is not None:
        log(f"recomputing: the stored result under {prefix} {why}")
        return None
    log(f"reusing the stored result for spec hash {result.spec_hash} ({manifest_uri})")
    return Outcome(result=result, model_uri=result.artifact.uri, manifest_uri=manifest_uri)


def reuse_mismatch(
    stored: CompressionResult,
    name: str,
    namespace: str,
    spec_hash: str,
    prefix: str,
    inputs: list[InputIdentity],
) -> str | None:
    """Why a stored manifest is not this run's result (None: it is).

    It must name this object and spec hash, its artifact must be the file
    this prefix holds for its verdict (compared after parsing: no `..`, no
    other bucket), and it must have been computed from the same bytes of
    every input that this run fetched.
    """
    if (stored.name, stored.namespace, stored.spec_hash) != (name, namespace, spec_hash):
        return (
            f"belongs to {stored.namespace}/{stored.name} spec hash {stored.spec_hash}, "
            f"not {namespace}/{name} {spec_hash}"
        )
    expected = storage.join(prefix, MODEL_FILE if stored.gate.passed else REJECTED_MODEL_FILE)
    uri = stored.artifact.uri
    try:
        same_file = storage.parse(uri) == storage.parse(expected)
    except BadInput:
        same_file = False
    if not (same_file and storage.within(uri, prefix)):
        return f"names artifact {uri}, not its own {expected}"
    if not stored.inputs:
        return "does not record the content of its inputs"
    if stored.search is not None and not stored.search.complete:
        return "is the best so far of a search that was stopped before it finished"
    before = {(i.uri, i.sha256) for i in stored.inputs}
    now = {(i.uri, i.sha256) for i in inputs}
    if before != now:
        changed = [i.field for i in inputs if (i.uri, i.sha256) not in before]
        return f"was computed from other input content ({', '.join(changed) or 'other inputs'})"
    return None


def _measure(
    cfg: Evaluation,
    source: onnx.ModelProto,
    result: onnx.ModelProto,
    data: Dataset,
    workdir: Path,
    progress: steps.Progress,
    source_uri: str,
    records: list[StepRecord],
) -> tuple[EvaluationFigures, LatencyFigures, MemoryFigures, list[str]]:
    """Both models on the evaluation data; notes say what was done differently (batch 1).

    The source is the user's: what it fails on is BadInput naming it. The
    compressed model is ours: what it fails on names the steps that made it.
    """
    notes: list[str] = []
    src_sess = evaluate.session(source, where=source_uri)
    src_out = evaluate.run_batched(
        src_sess, data, progress=progress, label="evaluate source", where=source_uri, notes=notes
    )
    with _output_model_errors(records):
        out_sess = evaluate.session(result)
        out_out = evaluate.run_batched(
            out_sess, data, progress=progress, label="evaluate compressed", notes=notes
        )
    ev_fig = evaluate.evaluation_figures(cfg, data, src_out, out_out)
    with progress.task("latency", total=2) as bar:
        src_lat = evaluate.latency(src_sess, data, cfg.latency_runs)
        bar.advance()
        with _output_model_errors(records):
            out_lat = evaluate.latency(out_sess, data, cfg.latency_runs)
        bar.advance()
    paths = workdir / "source.onnx", workdir / "compressed.onnx"
    onnx.save(source, paths[0])
    onnx.save(result, paths[1])
    mem = evaluate.memory_figures(paths[0], paths[1], data, workdir)
    return ev_fig, evaluate.latency_figures(src_lat, out_lat), mem, notes


@contextmanager
def _output_model_errors(records: list[StepRecord]) -> Iterator[None]:
    """onnxruntime refusing the pipeline's output: one line naming the steps that made it."""
    try:
        yield
    except evaluate.runtime_errors() as exc:
        chain = " -> ".join(["source", *(r.type for r in records)])
        text = str(exc).strip()
        raise OutputModelFailed(
            f"the compressed model ({chain}) fails in onnxruntime, though its source runs: "
            f"{text.splitlines()[0] if text else type(exc).__name__}; a bug in edgeslim or "
            "one of these steps, not in the input"
        ) from exc


def _gate_reason(ev: EvaluationFigures, limit: float, passed: bool) -> str:
    change = f"{ev.metric} {ev.baseline:.4f} -> {ev.compressed:.4f} (drop {ev.drop:+.4f})"
    if passed:
        return f"{change} is within maxMetricDrop {limit:g}"
    return f"{change} exceeds maxMetricDrop {limit:g}: rejected, not deployable"


def _versions() -> dict[str, str]:
    import importlib.metadata

    import numpy
    import onnxruntime
    import onnxslim

    # From the package metadata: importing torch only to read its version cost a
    # quantize-only run ~500 MB of memory and 2 s (the metadata has no local build tag).
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {
        "edgeslim": __version__,
        "torch": torch_version,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxslim": onnxslim.__version__,
        "numpy": numpy.__version__,
    }


def write_termination_message(outcome: Outcome) -> Path | None:
    """The compact result for the operator, through the pod's termination-message file."""
    path = os.environ.get("EDGESLIM_TERMINATION_LOG")
    if not path:
        default = Path("/dev/termination-log")
        if not default.exists():
            return None
        path = str(default)
    message = TerminationMessage.from_result(outcome.result, outcome.manifest_uri)
    Path(path).write_bytes(message.text().encode())
    return Path(path)
