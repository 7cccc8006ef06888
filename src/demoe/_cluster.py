"""A model object on a dask.distributed cluster: put on every worker once, never pickled into the task graph.

Imported only where a ``distributed.Client`` is active (it imports distributed).
The model travels as the bytes of a safetensors file (data, never pickled
code) in a worker plugin: the scheduler hands it to every worker, those that
join later included, and each worker process builds the model once
(:func:`demoe.checkpoint.register_model`); the chunk tasks name it by a hash
of its weights and metadata.
"""

from __future__ import annotations

import weakref

from distributed.diagnostics.plugin import WorkerPlugin

from . import checkpoint
from .model import DeMoE

_sent: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # client -> keys it registered


class ModelPlugin(WorkerPlugin):
    """Registers a model, sent as safetensors bytes, in every worker's process under ``key``."""

    idempotent = True  # registered again under the same name (the same bytes): nothing is sent

    def __init__(self, key: str, data: bytes):
        self.key, self.data = key, data

    def setup(self, worker):
        checkpoint.register_model(self.key, lambda: checkpoint.model_from_bytes(self.data, origin=self.key))

    def teardown(self, worker):
        checkpoint.unregister_model(self.key)


def share_model(client, model: DeMoE) -> str:
    """Put ``model`` on every worker of ``client``'s cluster (once per model and client); returns its key."""
    key = "demoe-model-" + checkpoint.model_digest(model)
    sent = _sent.setdefault(client, set())
    if key not in sent:
        client.register_plugin(ModelPlugin(key, checkpoint.model_bytes(model)), name=key)
        sent.add(key)
    return key
