"""Embedding stage: decode → windows → RunInference (batched) → embedded windows, with dead letters.

The stage reuses the log-mel stage's planning and decoding (``transforms/features/compute.py``): work
units lie on the model's window grid (``transforms/audio/framing.py``) and decode only their range plus
a resampling margin. Each unit's windows stream, one element per window, into Beam's
``RunInference`` with :class:`EmbeddingModelHandler`, which batches them (min/max batch size),
loads the model once per worker process and shares it between the process's threads. A
recording's windows are never stacked: memory is bounded by the work unit and the batch.

Models (:func:`load_embedding_model`): OpenL3 from an official-layout weight file
(``transforms/features/openl3.py``), a TF SavedModel folder, or a TFLite file. Model files come from a
local path or an object-store URI given by the user (copied to a local temporary folder; SHA-256
checked when given); nothing is downloaded from anywhere else, and nothing is unpickled. A
SavedModel is a program: the op types of its graph are checked against an allow-list before it
is loaded (:func:`check_saved_model_ops`, on the launcher and again on the workers) unless the
user trusts the file (``trust_model_code``). TFLite files run on LiteRT with one interpreter per
thread, in the model's own batch unless a trial at load shows it may be resized.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from soundshard.schemas.embedding import EmbeddingBatch, EmbeddingConfig, EmbeddingInput
from soundshard.schemas.errors import ConfigError, DataError
from soundshard.schemas.outcomes import Stage
from soundshard.schemas.records import FileSummary, WorkUnit
from soundshard.transforms.audio.framing import FrameGrid
from soundshard.transforms.features.compute import (
    DEAD_LETTERS,
    LEVELS,
    NAMESPACE,
    SUMMARIES,
    ComputedWindows,
    DecodeUnitFn,
    count,
    dead_letter,
)
from soundshard.transforms.outcomes import progress

_LOG = logging.getLogger(__name__)
#: Rows of one EmbeddingBatch at most (consecutive windows of one unit are gathered up to this).
MAX_ROWS_PER_BATCH = 1024


# -- model files ----------------------------------------------------------------------------------


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def model_exists(uri: str) -> bool:
    """Whether a model file or folder exists (local or object store)."""
    if not _is_remote(uri):
        return os.path.exists(uri.removeprefix("file://"))
    fs, path = _fs(uri)
    return fs.exists(path)


def _files_under(uri: str) -> list[tuple[str, str]]:
    """``(relative path, full path)`` of every file of a model: itself, or the files of a folder."""
    if not _is_remote(uri):
        root = uri.removeprefix("file://")
        if os.path.isfile(root):
            return [(os.path.basename(root), root)]
        found = []
        for folder, _, names in os.walk(root):
            for name in names:
                full = os.path.join(folder, name)
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
        return sorted(found)
    fs, path = _fs(uri)
    if fs.isfile(path):
        return [(path.rsplit("/", 1)[-1], path)]
    found = [(p[len(path.rstrip("/")) + 1 :], p) for p in fs.find(path)]
    return sorted(found)


def _open(uri: str, full: str):
    if not _is_remote(uri):
        return open(full, "rb")
    fs, _ = _fs(uri)
    return fs.open(full, "rb")


def model_digest(uri: str) -> str:
    """SHA-256 of a model file, or of a folder's files (relative path, NUL, bytes, each in order).

    Raises:
        ConfigError: nothing at ``uri``.
    """
    files = _files_under(uri)
    if not files:
        raise ConfigError(f"model {uri!r} holds no files")
    digest = hashlib.sha256()
    single = len(files) == 1 and not _is_dir(uri)
    for relative, full in files:
        if not single:
            digest.update(relative.encode() + b"\0")
        with _open(uri, full) as f:
            for block in iter(lambda f=f: f.read(4 * 2**20), b""):
                digest.update(block)
    return digest.hexdigest()


def _is_dir(uri: str) -> bool:
    if not _is_remote(uri):
        return os.path.isdir(uri.removeprefix("file://"))
    fs, path = _fs(uri)
    return fs.isdir(path)


def check_model(config: EmbeddingConfig) -> EmbeddingConfig:
    """Checks that the model named by ``config`` exists (and matches its SHA-256) on the launcher.

    Returns:
        ``config`` with ``model_sha256`` filled in from the file, so the fingerprint names the
        model's content.

    Raises:
        ConfigError: no ``model_uri``, nothing there, a SHA-256 mismatch, an OpenL3 file
        named for another variant, or a SavedModel with ops outside the allow-lists
        (:func:`check_saved_model_ops`; skipped with ``trust_model_code``).
    """
    uri = config.model_uri
    expected = config.expected_weights_name
    if not uri:
        if config.model == "openl3":
            raise ConfigError(
                f"OpenL3 {config.input_repr}/{config.content_type} needs its weight file {expected}: "
                "pass --weights PATH_OR_URI (published by the openl3 project; never downloaded)"
            )
        raise ConfigError(
            f"model={config.model!r} needs model_uri (--embedding-model {config.model}:PATH_OR_URI)"
        )
    if not model_exists(uri):
        what = f"OpenL3 weight file (expected {expected})" if expected else f"{config.model} model"
        raise ConfigError(f"{what} not found: {uri!r}")
    if expected is not None:
        _check_openl3_name(uri, config)
    digest = model_digest(uri)
    if config.model_sha256 is not None and digest != config.model_sha256:
        raise ConfigError(f"model {uri!r} has SHA-256 {digest}, not the expected {config.model_sha256}")
    if config.model == "saved_model" and not config.trust_model_code:
        check_saved_model_ops(uri)
    return config.replace(model_sha256=digest)


def _check_openl3_name(uri: str, config: EmbeddingConfig) -> None:
    # All variants have the same layer shapes, so a file of another variant would load silently;
    # official file names say which variant they hold.
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith("openl3_audio_"):
        return
    stem = name.removesuffix(".h5")
    if stem != config.expected_weights_name.removesuffix(".h5"):
        raise ConfigError(
            f"weight file {uri!r} is named for another OpenL3 variant than "
            f"input_repr={config.input_repr!r}, content_type={config.content_type!r} "
            f"(expected {config.expected_weights_name})"
        )


# -- SavedModel op check ------------------------------------------------------------------------------
#
# A SavedModel is a program: its graph may hold any TensorFlow op, including ops that read and
# write files, list folders, run Python or print, and tf.saved_model.load / a signature call runs
# them. Before a SavedModel is loaded, its saved_model.pb is parsed (nothing is loaded or run) and
# every op type of every graph node and of every function in its library must be on the
# allow-list below, built deliberately from the ops that inference graphs of ordinary models use
# (and checked against the exports of Keras models, tf.saved_model.save and the project's own
# models in tests/beam/test_embed_models.py). Anything else (a new op, a custom op, an I/O op) is
# refused; ``trust_model_code`` skips the check for files the user trusts.

#: Op types allowed anywhere in an untrusted SavedModel: pure computation on tensors and the
#: model's own in-memory state.
SAVED_MODEL_INFERENCE_OPS = frozenset(
    {
        # graph plumbing, function calls and control flow (called functions are checked too)
        "Const", "Placeholder", "PlaceholderWithDefault", "Identity", "IdentityN", "NoOp",
        "StopGradient", "PreventGradient", "EnsureShape", "CheckNumerics", "CheckNumericsV2",
        "Assert", "Snapshot", "PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf",
        "While", "StatelessWhile", "Case", "StatelessCase", "Switch", "Merge", "Enter", "Exit",
        "NextIteration", "LoopCond", "ControlTrigger",
        # variables and in-memory resources of the model itself
        "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp",
        "AssignSubVariableOp", "VarIsInitializedOp", "VariableShape", "ResourceGather",
        "ResourceGatherNd", "VariableV2", "Assign", "IsVariableInitialized", "HashTableV2",
        "MutableHashTableV2", "MutableDenseHashTableV2", "InitializeTableV2", "LookupTableFindV2",
        "LookupTableImportV2", "LookupTableInsertV2", "LookupTableSizeV2",
        # arrays: shapes, slicing, joining, gathering, padding
        "Shape", "ShapeN", "Size", "Rank", "Reshape", "ExpandDims", "Squeeze", "Pack", "Unpack",
        "ConcatV2", "Concat", "ConcatOffset", "Split", "SplitV", "Slice", "StridedSlice",
        "TensorStridedSliceUpdate", "Tile", "Transpose", "ConjugateTranspose", "ReverseV2",
        "ReverseSequence", "Pad", "PadV2", "MirrorPad", "Fill", "ZerosLike", "OnesLike", "Range",
        "LinSpace", "Gather", "GatherV2", "GatherNd", "ScatterNd", "TensorScatterUpdate",
        "TensorScatterAdd", "TensorScatterSub", "TensorScatterMax", "TensorScatterMin",
        "BroadcastTo", "BroadcastArgs", "BroadcastGradientArgs", "Where", "Select", "SelectV2",
        "OneHot", "Cast", "Bitcast", "InvertPermutation", "SpaceToBatchND", "BatchToSpaceND",
        "SpaceToDepth", "DepthToSpace", "DynamicStitch", "ParallelDynamicStitch",
        "DynamicPartition", "Unique", "UniqueV2", "UniqueWithCounts", "MatrixBandPart",
        "MatrixDiagV3", "MatrixDiagPartV3", "MatrixSetDiagV3", "Diag", "DiagPart",
        "ExtractImagePatches", "Roll", "TopKV2", "ArgMax", "ArgMin", "Cumsum", "Cumprod",
        "CumulativeLogsumexp", "LowerBound", "UpperBound", "Bucketize",
        # lists and arrays of tensors (loops, RNNs)
        "EmptyTensorList", "TensorListReserve", "TensorListSetItem", "TensorListGetItem",
        "TensorListStack", "TensorListFromTensor", "TensorListLength", "TensorListPushBack",
        "TensorListPopBack", "TensorListElementShape", "TensorListConcatV2", "TensorListGather",
        "TensorListScatterIntoExistingList", "TensorListScatterV2", "TensorListResize",
        "TensorListSplit", "TensorArrayV3", "TensorArrayReadV3", "TensorArrayWriteV3",
        "TensorArrayGatherV3", "TensorArrayScatterV3", "TensorArraySizeV3",
        "TensorArrayConcatV3", "TensorArraySplitV3", "TensorArrayCloseV3",
        # element-wise maths and comparisons
        "Abs", "Neg", "Sign", "Reciprocal", "Inv", "Square", "Sqrt", "Rsqrt", "Exp", "Expm1",
        "Log", "Log1p", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Atan2", "Sinh", "Cosh",
        "Tanh", "Asinh", "Acosh", "Atanh", "Erf", "Erfc", "Erfinv", "Lgamma", "Digamma", "Floor",
        "Ceil", "Round", "Rint", "IsFinite", "IsInf", "IsNan", "Add", "AddV2", "AddN", "Sub",
        "Mul", "MulNoNan", "Div", "DivNoNan", "RealDiv", "FloorDiv", "FloorMod", "TruncateDiv",
        "TruncateMod", "Mod", "Pow", "Maximum", "Minimum", "SquaredDifference", "Xlogy", "Xdivy",
        "Xlog1py", "ClipByValue", "Equal", "NotEqual", "Less", "LessEqual", "Greater",
        "GreaterEqual", "ApproximateEqual", "LogicalAnd", "LogicalOr", "LogicalNot",
        "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Invert", "LeftShift", "RightShift",
        # reductions, linear algebra, complex numbers and FFTs (spectrogram front-ends)
        "Sum", "Prod", "Max", "Min", "Mean", "All", "Any", "EuclideanNorm", "SegmentSum",
        "SegmentMean", "SegmentMax", "SegmentMin", "UnsortedSegmentSum", "UnsortedSegmentMax",
        "UnsortedSegmentMin", "UnsortedSegmentProd", "MatMul", "BatchMatMul", "BatchMatMulV2",
        "BatchMatMulV3", "Einsum", "Cross", "MatrixInverse", "MatrixDeterminant", "Cholesky",
        "Qr", "Svd", "SelfAdjointEigV2", "MatrixSolve", "MatrixTriangularSolve",
        "LogMatrixDeterminant", "Real", "Imag", "Complex", "ComplexAbs", "Conj", "Angle", "FFT",
        "IFFT", "RFFT", "IRFFT", "FFT2D", "IFFT2D", "RFFT2D", "IRFFT2D", "AudioSpectrogram",
        "Mfcc",
        # neural-network layers
        "Conv2D", "Conv3D", "Conv", "DepthwiseConv2dNative", "Conv2DBackpropInput",
        "Conv3DBackpropInputV2", "DepthwiseConv2dNativeBackpropInput", "BiasAdd", "BiasAddV1",
        "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Sigmoid", "Softplus", "Softsign", "Softmax",
        "LogSoftmax", "MaxPool", "MaxPoolV2", "MaxPool3D", "AvgPool", "AvgPool3D",
        "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3",
        "BatchNormWithGlobalNormalization", "LRN", "Dilation2D", "ResizeBilinear",
        "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea", "ScaleAndTranslate",
        "CropAndResize", "_FusedConv2D", "_FusedMatMul", "_FusedBatchNormEx",
        "_FusedDepthwiseConv2dNative", "FakeQuantWithMinMaxArgs", "FakeQuantWithMinMaxVars",
        "FakeQuantWithMinMaxVarsPerChannel", "QuantizeAndDequantizeV2",
        "QuantizeAndDequantizeV4",
        # random numbers (inert, if unusual at inference)
        "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
        "StatelessRandomUniformV2", "StatelessRandomNormalV2", "StatelessTruncatedNormalV2",
        "StatelessRandomUniformIntV2", "StatelessRandomGetKeyCounter", "StatelessRandomGetAlg",
        "StatelessRandomGetKeyCounterAlg", "StatelessRandomUniform", "StatelessRandomNormal",
    }
)  # fmt: skip
#: Op types of checkpoints (reading and writing the variables' files): allowed only in the
#: graph nodes and functions reached from the MetaGraph's saver_def save/restore nodes, and
#: refused where a serving signature or any other function reaches them.
SAVED_MODEL_CHECKPOINT_OPS = frozenset(
    {
        "SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec", "Save",
        "SaveSlices", "Restore", "RestoreSlice", "StringJoin", "StaticRegexFullMatch",
        "DisableCopyOnRead",
    }
)  # fmt: skip
#: Never allowed (outside both lists; named here so that the tests keep them out): files and
#: folders, Python, printing, memory-mapped constants, datasets and readers, summaries, tables read
#: from files, remote calls, and embedded programs (XlaCallModule: StableHLO with host callbacks).
SAVED_MODEL_FORBIDDEN_OPS = frozenset(
    {
        "ReadFile", "WriteFile", "MatchingFiles", "MatchingFilesDataset", "PyFunc",
        "PyFuncStateless", "EagerPyFunc", "Print", "PrintV2", "ImmutableConst",
        "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "InitializeTableFromDataset",
        "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "SqlDataset", "LMDBDataset",
        "WholeFileReader", "WholeFileReaderV2", "TFRecordReaderV2", "TextLineReaderV2",
        "CreateSummaryFileWriter", "CreateSummaryDbWriter", "SummaryWriter", "WriteSummary",
        "WriteScalarSummary", "WriteAudioSummary", "DatasetToTFRecord", "SaveDataset",
        "SaveDatasetV2", "LoadDataset", "SnapshotDatasetV2", "DebugIdentityV3", "DumpTensor",
        "RpcClient", "RpcCall", "RemoteCall", "XlaCallModule", "FileSystemSetConfiguration",
    }
)  # fmt: skip


def _attr_functions(value) -> list[str]:
    """Names of the functions an AttrValue refers to (``f``, ``then_branch``, ``body`` ...)."""
    found = []
    refs = [value.func] if value.HasField("func") else []
    if value.HasField("list"):
        refs.extend(value.list.func)
    for ref in refs:
        found.append(ref.name)
        for inner in ref.attr.values():
            found.extend(_attr_functions(inner))
    return found


def _calls(node, functions) -> set[str]:
    """Functions a node calls: through function-valued attrs, or as its op (a call by name)."""
    called = {node.op} if node.op in functions else set()
    for value in node.attr.values():
        called.update(_attr_functions(value))
    return called


def _reach(roots: set[str], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def saved_model_refused_ops(meta_graph) -> dict[str, set[str]]:
    """Op types of a MetaGraph that the allow-lists refuse, by where they are.

    Checkpoint ops are allowed in the graph nodes the saver_def's save/restore nodes depend on
    and in the functions those call (transitively), as long as nothing else (a serving
    signature's node, an init op, a function of the object graph, any other function) reaches
    them.

    Args:
        meta_graph: ``tensorflow.core.protobuf.meta_graph_pb2.MetaGraphDef``.

    Returns:
        ``{"function NAME" or "the graph": {op type, ...}}``; empty when every op is allowed.
    """
    graph = meta_graph.graph_def
    functions = {f.signature.name: f for f in graph.library.function}
    nodes = {n.name: n for n in graph.node}

    def node_name(tensor: str) -> str:
        return tensor.lstrip("^").split(":")[0]

    inputs = {n.name: {node_name(t) for t in n.input} for n in graph.node}
    saver = meta_graph.saver_def
    saver_nodes = {node_name(t) for t in (saver.save_tensor_name, saver.restore_op_name) if t} & set(nodes)
    checkpoint_nodes = _reach(saver_nodes, inputs)
    checkpoint_nodes -= _reach(set(nodes) - checkpoint_nodes, inputs)
    calls = {name: set().union(*(_calls(n, functions) for n in f.node_def)) for name, f in functions.items()}
    from_checkpoint = _reach(
        set().union(*(_calls(nodes[name], functions) for name in checkpoint_nodes)), calls
    )
    other_roots = (
        (set(functions) - from_checkpoint)
        | set().union(*(_calls(n, functions) for n in graph.node if n.name not in checkpoint_nodes))
        | set(meta_graph.object_graph_def.concrete_functions)
    )
    checkpoint_functions = from_checkpoint - _reach(other_roots, calls)

    refused: dict[str, set[str]] = {}

    def check(where: str, ops, checkpoint: bool) -> None:
        allowed = SAVED_MODEL_INFERENCE_OPS | (SAVED_MODEL_CHECKPOINT_OPS if checkpoint else frozenset())
        bad = {op for op in ops if op not in allowed and op not in functions}
        if bad:
            refused.setdefault(where, set()).update(bad)

    for node in graph.node:
        check("the graph", [node.op], node.name in checkpoint_nodes)
    for name, function in functions.items():
        check(f"function {name}", [n.op for n in function.node_def], name in checkpoint_functions)
    return refused


def _read_saved_model(uri: str):
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    files = dict(_files_under(uri))
    proto = saved_model_pb2.SavedModel()
    try:
        if "saved_model.pb" in files:
            with _open(uri, files["saved_model.pb"]) as f:
                proto.ParseFromString(f.read())
        elif "saved_model.pbtxt" in files:
            with _open(uri, files["saved_model.pbtxt"]) as f:
                text_format.Parse(f.read().decode(), proto)
        else:
            raise ConfigError(f"saved_model {uri!r} is not a SavedModel folder (no saved_model.pb)")
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError) as exc:
        raise ConfigError(f"saved_model {uri!r}: saved_model.pb does not parse: {exc}") from exc
    return proto


def check_saved_model_ops(uri: str) -> None:
    """Refuses a SavedModel whose graph holds op types outside the allow-lists.

    Parses ``saved_model.pb`` (or ``.pbtxt``) only: nothing is loaded or run. Called on the
    launcher (:func:`check_model`) and again on each worker before ``tf.saved_model.load``,
    unless the config says ``trust_model_code``.

    Args:
        uri: SavedModel folder (local path or object-store URI).

    Raises:
        ConfigError: naming each refused op type and the function (or "the graph") it is in;
        or a folder without a parseable saved_model.pb.
    """
    refused: dict[str, set[str]] = {}
    for meta_graph in _read_saved_model(uri).meta_graphs:
        for where, ops in saved_model_refused_ops(meta_graph).items():
            refused.setdefault(where, set()).update(ops)
    if refused:
        found = "; ".join(f"{', '.join(sorted(ops))} (in {where})" for where, ops in sorted(refused.items()))
        raise ConfigError(
            f"SavedModel {uri!r} uses op types that an embedding model does not need and that may "
            f"touch files, processes or the network: {found}. Untrusted model files stay inert, so "
            "it is refused; pass --trust-model-code (trust_model_code = true) only if you trust this "
            "file: SavedModels are programs"
        )


@contextlib.contextmanager
def local_model(uri: str):
    """Yields a local path of the model at ``uri`` (a temporary copy of a remote one)."""
    if not _is_remote(uri):
        yield uri.removeprefix("file://")
        return
    folder = tempfile.mkdtemp(prefix="soundshard-model-")
    try:
        fs, path = _fs(uri)
        name = path.rstrip("/").rsplit("/", 1)[-1]
        local = os.path.join(folder, name)
        if fs.isdir(path):
            for relative, full in _files_under(uri):
                target = os.path.join(local, *relative.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get_file(full, target)
        else:
            fs.get_file(path, local)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- models -----------------------------------------------------------------------------------------


class EmbeddingModel:
    """A loaded embedding model: ``embed(windows [batch, window_samples]) → [batch, embedding_size]``.

    ``embed`` may be called from several threads at once: RunInference shares one loaded model
    between the threads of a worker process.
    """

    embedding_size: int

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """float32 ``[batch, embedding_size]`` of float32 windows ``[batch, window_samples]``."""
        raise NotImplementedError


class KerasEmbedder(EmbeddingModel):
    """A Keras model from windows to embeddings (OpenL3)."""

    def __init__(self, model, embedding_size: int):
        self.model = model
        self.embedding_size = embedding_size

    def embed(self, windows: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(windows), dtype=np.float32)


def _pick_output(outputs, selector, *, where: str):
    """One output of a call: by name or index; the only one when ``selector`` is None."""
    if isinstance(outputs, dict):
        names = sorted(outputs)
        if selector is None:
            if len(names) != 1:
                raise ConfigError(f"{where} has outputs {names}: choose one with output = NAME or INDEX")
            return outputs[names[0]]
        if isinstance(selector, int):
            if not 0 <= selector < len(names):
                raise ConfigError(f"output={selector} is out of range: {where} has outputs {names}")
            return outputs[names[selector]]
        if selector not in outputs:
            raise ConfigError(f"output={selector!r} is not an output of {where}; outputs: {names}")
        return outputs[selector]
    if isinstance(outputs, list | tuple):
        if selector is None:
            if len(outputs) != 1:
                raise ConfigError(f"{where} returns {len(outputs)} outputs: choose one with output = INDEX")
            return outputs[0]
        if not isinstance(selector, int) or not 0 <= selector < len(outputs):
            raise ConfigError(f"output={selector!r}: {where} returns {len(outputs)} outputs (use an index)")
        return outputs[selector]
    if selector not in (None, 0):
        raise ConfigError(f"output={selector!r}: {where} returns a single output")
    return outputs


def _as_embeddings(values: np.ndarray, *, n: int, size: int, where: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 1 and n == 1:
        values = values[None]
    if values.ndim != 2 or values.shape != (n, size):
        raise DataError(
            f"{where} returned shape {list(values.shape)} for {n} window(s); expected [{n}, {size}]",
            reason="bad_model_output",
        )
    return values


def _per_window(values: np.ndarray, *, size: int, where: str) -> np.ndarray:
    """One window's output as ``[size]``: frame-level outputs ``[n_frames, size]`` are averaged."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 2 and values.shape[-1] == size:
        return values.mean(axis=0)
    if values.size == size:
        return values.reshape(size)
    raise DataError(
        f"{where} returned shape {list(values.shape)} for one window; expected [{size}]",
        reason="bad_model_output",
    )


class SavedModelEmbedder(EmbeddingModel):
    """A TF SavedModel: a signature (or the object's ``__call__``) on windows.

    A model whose input is one waveform ``[n_samples]`` (as YAMNet's) is called once per window
    and a frame-level output ``[n_frames, embedding_size]`` is averaged over its frames; a
    model whose input is batched ``[batch, n_samples]`` is called once per batch.
    """

    def __init__(self, path: str, config: EmbeddingConfig):
        import tensorflow as tf

        self._tf = tf
        self.embedding_size = int(config.embedding_size)
        self._output = config.output
        self._where = f"SavedModel {config.model_uri!r}"
        loaded = tf.saved_model.load(path)
        # RunInference calls one loaded model from several threads at once; that needs no lock
        # here: a restored signature or function keeps no per-call state in Python (each call
        # runs in its own TF executor, variables are only read) and is never retraced.
        self._loaded = loaded  # keeps the variables alive
        signatures = getattr(loaded, "signatures", {}) or {}
        if config.signature in signatures:
            fn = signatures[config.signature]
            _, kwargs = fn.structured_input_signature
            if len(kwargs) != 1:
                raise ConfigError(
                    f"{self._where} signature {config.signature!r} takes inputs {sorted(kwargs)}"
                )
            ((self._input_name, spec),) = kwargs.items()
            self._fn = fn
        elif callable(loaded):
            self._fn, self._input_name = loaded, None
            specs = [
                s
                for c in getattr(loaded.__call__, "concrete_functions", [])
                for s in c.structured_input_signature[0]
                if hasattr(s, "shape")
            ]
            spec = specs[0] if specs else None
        else:
            raise ConfigError(
                f"{self._where} has no signature {config.signature!r} (signatures: {sorted(signatures)}) "
                "and is not callable"
            )
        self._batched = spec is None or spec.shape.rank is None or spec.shape.rank >= 2
        # Choose the output now, so a wrong or missing ``output`` fails at load, not per batch.
        concrete = [self._fn] if self._input_name else getattr(self._fn.__call__, "concrete_functions", [])
        structure = getattr(concrete[0], "structured_outputs", None) if concrete else None
        if structure is not None:
            _pick_output(structure, self._output, where=self._where)

    def _call(self, x):
        tensor = self._tf.constant(x)
        result = self._fn(**{self._input_name: tensor}) if self._input_name else self._fn(tensor)
        return _pick_output(result, self._output, where=self._where)

    def embed(self, windows: np.ndarray) -> np.ndarray:
        if self._batched:
            out = self._call(windows).numpy()
            return _as_embeddings(out, n=len(windows), size=self.embedding_size, where=self._where)
        rows = [
            _per_window(self._call(w).numpy(), size=self.embedding_size, where=self._where) for w in windows
        ]
        return np.stack(rows) if rows else np.zeros((0, self.embedding_size), np.float32)


#: Windows of the trial batch that decides whether a TFLite model whose batch dimension is dynamic
#: may be resized to Beam's batches: small, so the trial is quick, and more than two, so rows that
#: depend on the other rows of their batch show.
TFLITE_TRIAL_BATCH = 3
#: Seconds the trial may take (it loads, resizes and runs the model once in a child process).
TFLITE_TRIAL_TIMEOUT_S = 300

# Run by a child process (``python -c``): resizing the input of some TFLite models and running them
# kills the process (a segmentation fault in the runtime) where no except clause can catch it. One
# JSON line per stage, flushed, so what ran before a crash is still known. argv: model path, the
# shape of a call with the model's own batch (or null), the trial batch's shape (or null), the
# output's index among the output details.
_TFLITE_PROBE_SCRIPT = r"""
import json, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter

path, single, batch = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
output_index, inner = int(sys.argv[4]), sys.argv[5] == "inner"
options = {}
if inner:  # an intermediate tensor: kept after invoke, computed by the builtin kernels
    from ai_edge_litert.interpreter import OpResolverType

    options = {
        "experimental_preserve_all_tensors": True,
        "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    }
interpreter = Interpreter(model_path=path, **options)
interpreter.allocate_tensors()
index = interpreter.get_input_details()[0]["index"]
shape = list(interpreter.get_input_details()[0]["shape"])

def run(x):
    global shape
    if list(x.shape) != shape:
        interpreter.resize_tensor_input(index, list(x.shape), strict=True)
        interpreter.allocate_tensors()
        shape = list(x.shape)
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(output_index).copy()

def report(stage, ok, why=""):
    print(json.dumps({"stage": stage, "ok": bool(ok), "why": why}), flush=True)

rng = np.random.default_rng(0)
if single is not None:
    run((0.1 * rng.standard_normal(single)).astype(np.float32))
    report("single", True)
if batch is not None:
    x = (0.1 * rng.standard_normal(batch)).astype(np.float32)
    one_by_one = np.concatenate([run(row[None]).reshape(-1) for row in x])
    together = run(x).reshape(-1)
    if together.shape != one_by_one.shape:
        report("batch", False, f"gave {together.size} values, {one_by_one.size} one window at a time")
    else:
        scale = max(1.0, float(np.nanmax(np.abs(one_by_one), initial=0.0)))
        same = np.allclose(together, one_by_one, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)
        report("batch", same, "gave other values than one window at a time")
"""
#: Trial verdicts by (model SHA-256, shapes, output): one child process per model and process.
_TFLITE_PROBES: dict[tuple, dict[str, tuple[bool, str]]] = {}
_TFLITE_PROBES_LOCK = threading.Lock()


def _exit_text(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            return f"killed its process ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"killed its process (signal {-returncode})"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return f"failed ({lines[-1].strip() if lines else f'exit status {returncode}'})"


def _probe_tflite(
    path: str, *, key: tuple, single: list[int] | None, batch: list[int] | None, output: int, inner: bool
) -> dict[str, tuple[bool, str]]:
    """Runs the TFLite trial (``_TFLITE_PROBE_SCRIPT``) in a child process.

    Returns:
        ``{"single": (ok, why), "batch": (ok, why)}`` for the stages asked for (those whose shape
        is not None); a stage the child did not report (it crashed or hung) is not ok.
    """
    with _TFLITE_PROBES_LOCK:
        if key in _TFLITE_PROBES:
            return _TFLITE_PROBES[key]
    command = [sys.executable, "-c", _TFLITE_PROBE_SCRIPT, path, json.dumps(single), json.dumps(batch)]
    try:
        done = subprocess.run(
            [*command, str(output), "inner" if inner else "output"],
            capture_output=True,
            text=True,
            timeout=TFLITE_TRIAL_TIMEOUT_S,
            check=False,
        )
        stdout, how = done.stdout, _exit_text(done.returncode, done.stderr)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
        how = f"took more than {TFLITE_TRIAL_TIMEOUT_S} s"
    except OSError as exc:
        stdout, how = "", f"could not be started ({exc})"
    verdicts: dict[str, tuple[bool, str]] = {}
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            report = json.loads(line)
            verdicts[report["stage"]] = (bool(report["ok"]), str(report["why"]))
    for stage, shape in (("single", single), ("batch", batch)):
        if shape is not None and stage not in verdicts:
            verdicts[stage] = (False, how)
    with _TFLITE_PROBES_LOCK:
        _TFLITE_PROBES[key] = verdicts
    return verdicts


class TFLiteEmbedder(EmbeddingModel):
    """A TFLite model on windows (LiteRT's interpreter; the output chosen by name or by index into
    the output details, or an intermediate tensor by its name).

    An intermediate tensor (a BirdNET-style model's embedding is the layer before its class
    scores, not an output) is read after each call from an interpreter that keeps every tensor
    (``experimental_preserve_all_tensors``) and runs the builtin kernels without delegates (a
    delegate computes its part of the graph internally and leaves those tensors unwritten); int8
    tensors are dequantised with their own scale and zero point.

    How windows go in follows the input's shape signature:

    - ``[N, *window]``, a fixed batch of ``N``: ``N`` windows per call, the last call of a
      batch filled up with silence (those rows are dropped). The input is never resized.
    - ``[-1, *window]``, a dynamic batch (BirdNET 2.4: ``[-1, 144000]``, stored as ``[1,
      144000]``): a whole batch per call, resized to it, but only when a trial in a child
      process (:data:`TFLITE_TRIAL_BATCH` windows, at load) ran and gave the values of one
      window at a time: some models declare a dynamic batch yet crash the process or mix rows
      when resized. Otherwise the model's own batch (1), one window per call.
    - ``[n_samples]`` (one waveform, as YAMNet's): one window per call; a frame-level output
      ``[n_frames, embedding_size]`` is averaged over its frames.

    An interpreter must never be used by two threads at once, and RunInference shares one loaded
    model between a process's threads: each thread gets its own interpreter, created on its
    first call from the model's bytes (kept in memory), so threads run in parallel.

    Attributes:
        windows_per_call: Windows per interpreter call: ``None`` for any batch (resized to each),
            else the model's fixed batch.
    """

    windows_per_call: int | None

    def __init__(self, path: str, config: EmbeddingConfig):
        from ai_edge_litert.interpreter import Interpreter

        self._new_interpreter = Interpreter
        self.embedding_size = int(config.embedding_size)
        self._where = f"TFLite model {config.model_uri!r}"
        with open(path, "rb") as f:
            self._content = f.read()
        self._local = threading.local()
        self._inner = False
        try:
            interpreter = self._interpreter()
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"{self._where} cannot be loaded by LiteRT: {exc}") from exc
        inputs = interpreter.get_input_details()
        if len(inputs) != 1:
            raise ConfigError(f"{self._where} takes {len(inputs)} inputs; one (the waveform) is needed")
        self._input = inputs[0]
        dtype = np.dtype(self._input["dtype"])
        if dtype != np.float32:
            raise ConfigError(f"{self._where} takes {dtype.name} input; float32 waveforms are needed")
        outputs = interpreter.get_output_details()
        by_name = {d["name"]: k for k, d in enumerate(outputs)}
        selector = config.output
        if selector is None:
            if len(outputs) != 1:
                raise ConfigError(f"{self._where} has outputs {sorted(by_name)}: choose one with output")
            position = 0
        elif isinstance(selector, int):
            if not 0 <= selector < len(outputs):
                raise ConfigError(
                    f"output={selector} is out of range: {self._where} has {len(outputs)} outputs"
                )
            position = selector
        elif selector in by_name:
            position = by_name[selector]
        else:
            position = None
            inner = {d["name"]: d for d in interpreter.get_tensor_details()}
            if selector not in inner:
                candidates = [
                    f"{d['name']} {[int(n) for n in d['shape']]}"
                    for d in inner.values()
                    if len(d["shape"]) >= 2 and np.dtype(d["dtype"]) in (np.float32, np.int8)
                ]
                shown = "; ".join(candidates[-20:]) + (" ..." if len(candidates) > 20 else "")
                raise ConfigError(
                    f"output={selector!r} is neither an output nor a tensor of {self._where}; outputs: "
                    f"{sorted(by_name)}; tensors with a batch axis (last 20): {shown}"
                )
            self._inner = True
            self._local = threading.local()  # an interpreter that keeps every tensor, made anew
            detail = inner[selector]
        if position is not None:
            detail = outputs[position]
        self._output_index = int(detail["index"])
        self._quantization = _dequantization(detail)
        self._choose_layout(path, config=config, output_index=self._output_index)

    def _choose_layout(self, path: str, *, config: EmbeddingConfig, output_index: int) -> None:
        shape = [int(d) for d in self._input["shape"]]
        signature = [int(d) for d in self._input.get("shape_signature", shape)]
        n = config.window_samples
        cannot = (
            f"{self._where} takes input {shape} (shape signature {signature}); it cannot take "
            f"windows of {n} samples"
        )
        if len(signature) == 1:
            if signature[0] not in (-1, n):
                raise ConfigError(cannot)
            self._batch_axis, self._window_dims, call_shape = False, [n], [n]
            self.windows_per_call = 1
        elif len(signature) >= 2:
            window_dims = signature[1:]
            if -1 in window_dims:
                if len(window_dims) != 1:
                    raise ConfigError(cannot)
                window_dims = [n]
            elif math.prod(window_dims) != n:
                raise ConfigError(cannot)
            # The model's own batch: the signature's, or for a dynamic one what the file was
            # written with (1 for converted Keras/TF functions).
            own_batch = signature[0] if signature[0] > 0 else max(shape[0], 1)
            self._batch_axis, self._window_dims = True, window_dims
            call_shape = [own_batch, *window_dims]
            self.windows_per_call = own_batch
        else:
            raise ConfigError(cannot)
        single = call_shape if call_shape != shape else None
        trial = [TFLITE_TRIAL_BATCH, *self._window_dims] if self._batch_axis and signature[0] == -1 else None
        if single is None and trial is None:
            return  # nothing is resized: nothing to try
        key = (
            hashlib.sha256(self._content).hexdigest(),
            tuple(shape),
            tuple(call_shape),
            tuple(trial or ()),
            output_index,
            self._inner,
        )
        verdicts = _probe_tflite(
            path, key=key, single=single, batch=trial, output=output_index, inner=self._inner
        )
        if single is not None and not verdicts["single"][0]:
            raise ConfigError(f"{cannot}: resized to {call_shape}, a trial run {verdicts['single'][1]}")
        if trial is None:
            return
        ok, why = verdicts["batch"]
        if ok:
            self.windows_per_call = None
            return
        per_call = "one window per call" if call_shape[0] == 1 else f"{call_shape[0]} windows per call"
        _LOG.warning(
            "%s: its batch dimension is dynamic, but a trial batch of %d windows %s; calling it with "
            "its own batch (%s)",
            self._where,
            TFLITE_TRIAL_BATCH,
            why,
            per_call,
        )

    def _interpreter(self):
        """This thread's interpreter (created on the thread's first call)."""
        local = self._local
        interpreter = getattr(local, "interpreter", None)
        if interpreter is None:
            options = {}
            if self._inner:
                from ai_edge_litert.interpreter import OpResolverType

                options = {
                    "experimental_preserve_all_tensors": True,
                    "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                }
            with warnings.catch_warnings():  # LiteRT warns that keeping every tensor costs memory
                warnings.simplefilter("ignore", UserWarning)
                interpreter = self._new_interpreter(model_content=self._content, **options)
            interpreter.allocate_tensors()
            local.interpreter = interpreter
            local.shape = tuple(int(d) for d in interpreter.get_input_details()[0]["shape"])
        return interpreter

    def _run(self, x: np.ndarray) -> np.ndarray:
        interpreter = self._interpreter()
        local, index = self._local, self._input["index"]
        if local.shape != x.shape:
            # Only to shapes the signature allows (strict) and the trial at load ran.
            interpreter.resize_tensor_input(index, list(x.shape), strict=True)
            interpreter.allocate_tensors()
            local.shape = x.shape
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        values = interpreter.get_tensor(self._output_index).copy()
        if self._quantization is not None:
            scale, zero_point = self._quantization
            values = (values.astype(np.float32) - zero_point) * scale
        return values

    def _rows(self, values: np.ndarray, *, n_call: int, n_keep: int) -> np.ndarray:
        """The first ``n_keep`` rows ``[n_keep, embedding_size]`` of a call's output."""
        values = np.asarray(values, dtype=np.float32)
        size = self.embedding_size
        if values.ndim == 1 and n_call == 1:
            values = values[None]
        if values.ndim < 2 or values.shape[0] != n_call:
            raise DataError(
                f"{self._where} returned shape {list(values.shape)} for {n_call} window(s); "
                f"expected [{n_call}, {size}]",
                reason="bad_model_output",
            )
        if values.ndim == 2 and values.shape[1] == size:
            return values[:n_keep]
        return np.stack([_per_window(v, size=size, where=self._where) for v in values[:n_keep]])

    def embed(self, windows: np.ndarray) -> np.ndarray:
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        n = len(windows)
        if n == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        if not self._batch_axis:
            rows = [_per_window(self._run(w), size=self.embedding_size, where=self._where) for w in windows]
            return np.stack(rows)
        if self.windows_per_call is None:
            out = self._run(windows.reshape(n, *self._window_dims))
            return self._rows(out, n_call=n, n_keep=n)
        per_call = self.windows_per_call
        parts = []
        for start in range(0, n, per_call):
            chunk = windows[start : start + per_call]
            if len(chunk) < per_call:  # a fixed batch: fill it up with silence, drop those rows
                chunk = np.concatenate(
                    [chunk, np.zeros((per_call - len(chunk), *chunk.shape[1:]), np.float32)]
                )
            out = self._run(np.ascontiguousarray(chunk.reshape(per_call, *self._window_dims)))
            parts.append(self._rows(out, n_call=per_call, n_keep=min(per_call, n - start)))
        return np.concatenate(parts)


def _dequantization(detail: dict) -> tuple[float, int] | None:
    """``(scale, zero_point)`` of an integer tensor of a TFLite model, or ``None`` for a float one.

    Raises:
        ConfigError: an integer tensor without quantisation parameters (not an embedding).
    """
    if np.dtype(detail["dtype"]) == np.float32:
        return None
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if not scale:
        raise ConfigError(
            f"tensor {detail['name']!r} is {np.dtype(detail['dtype']).name} without a quantisation scale; "
            "an embedding must be float or quantised"
        )
    return float(scale), int(zero_point)


def _verify_digest(path: str, config: EmbeddingConfig) -> None:
    if config.model_sha256 is None:
        return
    digest = model_digest(path)
    if digest != config.model_sha256:
        raise ConfigError(
            f"model {config.model_uri!r} has SHA-256 {digest}, not the expected {config.model_sha256}"
        )


def load_embedding_model(config: EmbeddingConfig) -> EmbeddingModel:
    """Loads the model of ``config`` (its file copied locally first when remote).

    Raises:
        ConfigError: missing file, SHA-256 mismatch, a file that does not fit the config, a
            SavedModel with ops outside the allow-lists (unless ``trust_model_code``).
    """
    if not config.model_uri or not model_exists(config.model_uri):
        check_model(config)  # raises, naming the expected file
    with local_model(config.model_uri) as path:
        _verify_digest(path, config)
        if config.model == "openl3":
            from soundshard.transforms.features import openl3

            return KerasEmbedder(openl3.load_openl3(config, path), int(config.embedding_size))
        if config.model == "saved_model":
            if not os.path.isdir(path):
                raise ConfigError(f"saved_model {config.model_uri!r} is not a SavedModel folder")
            if not config.trust_model_code:
                # again here: the worker loads its own copy, and may be given a config that no
                # launcher checked
                check_saved_model_ops(path)
            return SavedModelEmbedder(path, config)
        return TFLiteEmbedder(path, config)


def embed_waveform(
    y: np.ndarray,
    *,
    sample_rate_hz: int,
    config: EmbeddingConfig,
    model: EmbeddingModel,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of one in-memory signal, as ``openl3.get_audio_embedding`` returns them.

    Resamples (soxr, ``config.resample_quality``) to the model's rate, frames on the model's
    grid and embeds ``batch_size`` windows at a time (windows are views; only a batch is ever
    copied).

    Args:
        y: float32 ``[n_samples]`` (or ``[n_samples, n_channels]``, mixed down).
        sample_rate_hz: Rate of ``y``.
        config: Embedding configuration.
        model: A loaded model.
        batch_size: Windows per model call.

    Returns:
        ``(embeddings, timestamps_s)``: float32 ``[n_windows, embedding_size]`` and float64
        ``[n_windows]``, openl3's timestamps (``k * hop_s``: window centres when centred).
    """
    import soxr

    y = np.asarray(y, dtype=np.float32)
    if y.ndim == 2:
        y = y.mean(axis=1) if config.channel is None else y[:, config.channel]
    if sample_rate_hz != config.sample_rate_hz:
        y = soxr.resample(y, sample_rate_hz, config.sample_rate_hz, quality=config.resample_quality)
        y = y.astype(np.float32, copy=False)
    grid = FrameGrid.from_config(config)
    frames = grid.frames(y)
    rows = [
        model.embed(np.ascontiguousarray(frames[k : k + batch_size]))
        for k in range(0, len(frames), batch_size)
    ]
    embeddings = np.concatenate(rows) if rows else np.zeros((0, model.embedding_size), np.float32)
    return embeddings, np.arange(len(frames)) * grid.hop_s


# -- RunInference -------------------------------------------------------------------------------


class EmbeddingModelHandler(ModelHandler[EmbeddingInput, PredictionResult, EmbeddingModel]):
    """RunInference handler: batches of :class:`EmbeddingInput` windows → embeddings.

    Beam's TensorFlow handler imports tensorflow_hub at module level and takes tensors, not our
    windows; this one stacks a batch's windows (one copy, ``[batch, window_samples]``), calls
    the model once and returns one ``PredictionResult(window, embedding [embedding_size])`` per
    window. RunInference loads the model once per worker process (``load_model``) and shares it
    between the process's threads, which call it at the same time (every :class:`EmbeddingModel`
    allows that: TFLite models keep one interpreter per thread).

    Args:
        config: Embedding configuration (model file, window grid).
        min_batch_size: Smallest batch Beam forms (the last one of a bundle can be smaller).
        max_batch_size: Largest batch. With ``min_batch_size < max_batch_size`` Beam adapts the
            size between them to its timing.
        large_model: Load one copy of the model per machine and share it between worker
            processes (Beam's ``large_model``): for models near the memory of a machine.
        loader: Replaces :func:`load_embedding_model` (tests).
    """

    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        min_batch_size: int = 16,
        max_batch_size: int = 16,
        large_model: bool = False,
        loader=None,
    ):
        if min_batch_size < 1 or max_batch_size < min_batch_size:
            raise ConfigError(f"batch sizes min={min_batch_size}, max={max_batch_size}: need 1 <= min <= max")
        super().__init__(
            min_batch_size=min_batch_size, max_batch_size=max_batch_size, large_model=large_model
        )
        self._config = config
        self._loader = loader
        self._min_batch_size = min_batch_size
        self._max_batch_size = max_batch_size

    def load_model(self) -> EmbeddingModel:
        """Loads the model (once per worker process; Beam shares it between threads)."""
        return (self._loader or load_embedding_model)(self._config)

    def run_inference(
        self,
        batch: Sequence[EmbeddingInput],
        model: EmbeddingModel,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        """Embeds a batch of windows; one result per window, in order."""
        if not batch:
            return []
        windows = np.stack([e.samples for e in batch]).astype(np.float32, copy=False)
        embeddings = model.embed(windows)
        if embeddings.shape != (len(batch), model.embedding_size):
            raise DataError(
                f"model returned shape {list(embeddings.shape)} for {len(batch)} windows",
                reason="bad_model_output",
            )
        return [PredictionResult(e, embeddings[i]) for i, e in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[EmbeddingInput]) -> int:
        return sum(e.samples.nbytes for e in batch)

    def get_metrics_namespace(self) -> str:
        return f"{NAMESPACE}_inference"

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._min_batch_size, "max_batch_size": self._max_batch_size}

    def share_model_across_processes(self) -> bool:
        return self._large_model


# -- DoFns --------------------------------------------------------------------------------------------


class _WindowsFn(DecodeUnitFn):
    """Decodes one work unit and emits its windows, one :class:`EmbeddingInput` each (streamed)."""

    def __init__(self, config: EmbeddingConfig, levels=None, storage=None):
        super().__init__(FrameGrid.from_config(config), levels=levels, storage=storage)

    def process_audio(self, unit: WorkUnit, audio, span, where: str):
        grid: FrameGrid = self._grid
        frames = grid.frames(
            audio.samples,
            first_window=unit.first_window,
            n_windows=unit.n_windows,
            y_offset=0 if span is None else span.output_offset,
            total_samples=unit.output_samples,
        )
        count("work_units_decoded")
        for offset, frame in enumerate(frames):
            yield EmbeddingInput(unit, unit.first_window + offset, frame, silent=not frame.any())


@dataclasses.dataclass
class _Run:
    """Consecutive embedded windows of one unit, gathered before they are written."""

    unit: WorkUnit
    first: int
    rows: list
    silent: list


class _CollectFn(beam.DoFn):
    """Embedded windows → EmbeddingBatches of consecutive windows of one unit, and summaries.

    A summary covers the windows of one batch (its share of the recording's duration), so the
    run's figures add up whatever the batching; a window with non-finite values is a dead letter
    (stage ``embed``).
    """

    def __init__(self, config: EmbeddingConfig):
        self._config = config
        self._grid = FrameGrid.from_config(config)

    def start_bundle(self):
        self._run: _Run | None = None

    def process(self, result: PredictionResult):
        window: EmbeddingInput = result.example
        embedding = np.asarray(result.inference, dtype=np.float32)
        unit = window.unit
        run = self._run
        if run is not None and not _continues(run, window):
            yield from self._flush()
            run = None
        if not np.isfinite(embedding).all():
            yield from self._flush()
            where = f"{unit.source.uri} (window {window.index} of {unit.total_windows})"
            exc = DataError(f"{where}: embedding contains non-finite values", reason="non_finite_embedding")
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, dead_letter(unit.source, Stage.EMBED, exc))
            return
        if run is None:
            run = self._run = _Run(unit, window.index, [], [])
        run.rows.append(embedding)
        run.silent.append(window.silent)

    def finish_bundle(self):
        for tag_value in self._flush():
            if isinstance(tag_value, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(
                    tag_value.tag, WindowedValue(tag_value.value, MIN_TIMESTAMP, [GlobalWindow()])
                )
            else:
                yield WindowedValue(tag_value, MIN_TIMESTAMP, [GlobalWindow()])

    def _flush(self):
        run, self._run = self._run, None
        if run is None or not run.rows:
            return
        unit, item, grid = run.unit, run.unit.source, self._grid
        n = len(run.rows)
        starts, ends = grid.window_bounds_s(run.first, n)
        duration_s = grid.share_s(
            run.first, n, total_windows=unit.total_windows, total_samples=unit.output_samples
        )
        last_of_file = run.first + n == unit.total_windows
        silent = all(run.silent)
        if last_of_file:
            count("files_processed")
        count("windows", n)
        count("audio_ms", round(duration_s * 1000))
        progress(files=int(last_of_file), windows=n)
        yield EmbeddingBatch(
            item,
            np.stack(run.rows),
            starts,
            ends,
            first_window_index=run.first,
            unit_first_window=unit.first_window,
        )
        yield beam.pvalue.TaggedOutput(
            SUMMARIES,
            FileSummary.of_unit(unit, n_windows=n, duration_s=duration_s, silent=silent),
        )


def _continues(run: _Run, window: EmbeddingInput) -> bool:
    """Whether ``window`` is the next window of ``run``'s unit (and the run has room for it)."""
    same_unit = (run.unit.source.clip_id, run.unit.unit_index) == (
        window.unit.source.clip_id,
        window.unit.unit_index,
    )
    return same_unit and window.index == run.first + len(run.rows) and len(run.rows) < MAX_ROWS_PER_BATCH


def inference_dead_letters(failure) -> Iterable:
    """Dead letters (stage ``embed``) for a batch that failed in RunInference: one per unit."""
    batch, error = failure
    error_type, message = error_parts(error)
    by_unit: dict[tuple[str, int], list[EmbeddingInput]] = {}
    for window in batch:
        by_unit.setdefault((window.unit.source.clip_id, window.unit.unit_index), []).append(window)
    for windows in by_unit.values():
        unit = windows[0].unit
        first, last = windows[0].index, windows[-1].index
        where = f"{unit.source.uri} (windows {first}..{last} of {unit.total_windows})"
        exc = DataError(f"{where}: inference failed: {error_type}: {message}", reason="inference_error")
        count("windows_failed", len(windows))
        yield dead_letter(unit.source, Stage.EMBED, exc)


def error_parts(error) -> tuple[str, str]:
    """``(error type, message)`` of a RunInference failure (an exception or an exc_info-like tuple)."""
    if isinstance(error, BaseException):
        return type(error).__name__, str(error)
    if isinstance(error, tuple) and error:
        kind = error[0]
        name = kind.__name__ if isinstance(kind, type) else str(kind)
        return name, str(error[1]) if len(error) > 1 else ""
    return "Exception", str(error)


class ComputeEmbeddings(beam.PTransform[beam.PCollection[WorkUnit], ComputedWindows]):
    """WorkUnits → EmbeddingBatches, dead letters (``decode`` and ``embed`` stages), per-unit
    summaries and (with ``levels``) sound levels, through RunInference: :class:`ComputedWindows`.

    Args:
        config: Embedding configuration (validated; its model file checked by the launcher).
        min_batch_size, max_batch_size, large_model: See :class:`EmbeddingModelHandler`.
        model_handler: Replaces the handler built from the other arguments (tests).
        levels: What the levels stage measures (a ``levels`` output of UnitLevels), or ``None``.
        storage: The run's storage settings (resolved on the launcher), or ``None``: defaults.
    """

    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        min_batch_size: int = 16,
        max_batch_size: int = 16,
        large_model: bool = False,
        model_handler: ModelHandler | None = None,
        levels=None,
        storage=None,
    ):
        super().__init__()
        self._config = config
        self._levels = levels
        self._storage = storage
        self._handler = model_handler or EmbeddingModelHandler(
            config, min_batch_size=min_batch_size, max_batch_size=max_batch_size, large_model=large_model
        )

    def expand(self, units: beam.PCollection[WorkUnit]):
        framed = units | "DecodeAndFrame" >> beam.ParDo(
            _WindowsFn(self._config, levels=self._levels, storage=self._storage)
        ).with_outputs(DEAD_LETTERS, LEVELS, main="windows")
        inferred, failures = (
            framed.windows | "RunInference" >> RunInference(self._handler).with_exception_handling()
        )
        collected = inferred | "CollectEmbeddings" >> beam.ParDo(_CollectFn(self._config)).with_outputs(
            DEAD_LETTERS, SUMMARIES, main="windows"
        )
        failed = failures.failed_inferences | "InferenceDeadLetters" >> beam.FlatMap(inference_dead_letters)
        dead_letters = (
            framed[DEAD_LETTERS],
            collected[DEAD_LETTERS],
            failed,
        ) | "EmbeddingDeadLetters" >> beam.Flatten()
        return ComputedWindows(
            windows=collected.windows,
            dead_letters=dead_letters,
            summaries=collected[SUMMARIES],
            levels=framed[LEVELS],
        )
