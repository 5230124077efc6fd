"""Stage 2, in Ray Data's actor pool: the model file's ONNX Runtime session, built as the service builds its
own (graph optimisation ALL, the CPU EP, or CUDA with the CPU behind it), and the service's postprocessing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from modelcard import EMBEDDING, INPUT, LOGITS, ModelCard
from modelcard.outputs import l2_normalize, top_k_indices
from providers import CPU, CUDA, probe_cuda, quiet_ort

from .decode import OK

CLASSIFY, EMBED, BOTH = "classify", "embed", "both"
TASKS = (CLASSIFY, EMBED, BOTH)


@dataclass(frozen=True)
class ModelOptions:
    """What every actor needs to build its session and answer: the task, k, and the session's resources."""

    task: str = BOTH
    top_k: int = 5
    normalize: bool = False
    threads: int = 0  # ORT intra-op threads; 0: ORT's default, one per physical core (the service's default)
    gpu: bool = False  # the CUDA EP first (with the CPU behind it), where the probe finds it can start


def session_options(threads: int) -> ort.SessionOptions:
    """The service's session options (service/core/request/inference.py): its threads, every graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def open_session(model: bytes | str, options: ModelOptions) -> ort.InferenceSession:
    """A session over the model file (path or bytes) on the CPU EP, or on CUDA then CPU with `options.gpu`."""
    chain: list[str] = [CPU]
    if options.gpu:
        probe = probe_cuda()
        if probe.available:
            chain = [CUDA, CPU]
    with quiet_ort(chain[0] != CPU):
        return ort.InferenceSession(model, session_options(options.threads), providers=chain)


def read_card(session: ort.InferenceSession) -> ModelCard:
    """The model card the export wrote into the file, as the service reads it."""
    return ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)


class Predictor:
    """One actor's model: decoded batches in, the service's answers (top-k, embedding) out, errors passed on."""

    def __init__(self, model: list[Any], options: ModelOptions) -> None:
        import ray  # the actor runs under Ray; imported here so the module loads without it

        # The model's bytes come through Ray's object store (a one-item list: Ray resolves only top-level
        # references), so workers on other nodes need no copy of the file.
        blob = ray.get(model[0]) if isinstance(model[0], ray.ObjectRef) else model[0]
        self.session = open_session(blob, options)
        self.card = read_card(self.session)
        self.options = options
        self.providers = self.session.get_providers()
        self.node = ray.get_runtime_context().get_node_id()
        self.host = os.uname().nodename
        want = []
        if options.task in (CLASSIFY, BOTH):
            want.append(LOGITS)
        if options.task in (EMBED, BOTH):
            want.append(EMBEDDING)
        self.outputs = want

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """The rows whose decode succeeded go through the session as one batch; the rest keep their error."""
        n = len(batch["path"])
        ok = np.asarray([s == OK for s in batch["status"]], dtype=bool)
        out: dict[str, Any] = {key: batch[key] for key in ("path", "status", "error_code", "error")}
        results: dict[str, np.ndarray] = {}
        if ok.any():
            answers = self.session.run(self.outputs, {INPUT: batch["tensor"][ok]})
            results = dict(zip(self.outputs, answers, strict=True))
        if LOGITS in self.outputs:
            k = min(self.options.top_k, self.card.num_classes)
            indices = np.zeros((n, k), dtype=np.int64)
            scores = np.zeros((n, k), dtype=np.float32)
            if results:
                indices[ok], scores[ok] = top_k_indices(results[LOGITS], k)
            out.update(indices=indices, scores=scores)  # labels: the driver maps them from the same card
        if EMBEDDING in self.outputs:
            embedding = np.zeros((n, self.card.embedding_dim), dtype=np.float32)
            if results:
                emb = results[EMBEDDING]
                embedding[ok] = l2_normalize(emb) if self.options.normalize else emb
            out["embedding"] = embedding
        # Where the work ran, so the job's record shows each node's share (and which EP served it).
        out["node"] = np.full(n, self.node, dtype=object)
        out["decode_node"] = batch["decode_node"]
        out["provider"] = np.full(n, self.providers[0], dtype=object)
        return out
