"""The CUDA runner: Triton attention (``verify_attention.py``) with torch's matmuls, and, when asked
(``LlamaModel.use_cuda_graphs``), decode and verification passes whose layers replay a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from specdec.cache import KVCache
from specdec.kernels.runner import TorchRunner

GRAPH_MAX_TOKENS = 16  # new tokens per row up to which a forward's layers replay a CUDA graph
_STEP_TENSORS = ("cos", "sin", "slots", "context_lens", "query_lens", "positions")


def cuda_capture(run):
    """run() to warm up (Triton compiles, the allocator and cuBLAS settle), then capture it in a CUDA graph;
    returns the graph's replay. Warm-up and capture share one side stream, as torch's recipe asks: on an
    H200 a capture on a stream of its own failed at 32 rows (a per-stream resource first made mid-capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    return graph.replay


class CudaRunner(TorchRunner):
    """capture(run) -> replay: how graphs are made (``cuda_capture``), or None for eager passes. The CPU tests
    build one with ``device="cpu"`` and a capture that replays by calling run again, which checks everything
    but the capture itself (bench/gpu_check.py checks that on a GPU)."""

    def __init__(self, device: str = "cuda", capture=None):
        super().__init__(device)
        self.capture = capture

    def layers(self, model, x, step, cache):
        # (span > T: some row continues a cache. A first pass, a short prompt's prefill, runs once: no graph)
        if (self.capture is None or type(cache) is not KVCache or x.shape[1] > GRAPH_MAX_TOKENS
                or step.span <= x.shape[1] or torch.is_grad_enabled()):
            return super().layers(model, x, step, cache)
        self.prepare(step, cache, x)
        graphs = cache.graphs.get(model)
        if graphs is None:
            graphs = cache.graphs[model] = LayerGraphs(model.model.layers, cache, self.capture)
        return graphs(x, step)


class LayerGraphs:
    """The decoder layers of one model over one contiguous KV cache, captured as a CUDA graph per shape
    (rows, new tokens) and replayed: a Llama-3-8B-shaped decode step is ~15 kernel launches per layer x 32
    layers from Python, which holds eager plain decode on an H200 at 18% of the HBM roofline at batch 1, 46%
    replayed (bench/RESULTS.md). A replay reads the step's tensors from static copies and the cache's fixed
    tensors, so a graph is valid for as long as its cache lives (it is kept in ``cache.graphs``).
    """

    def __init__(self, layers, cache, capture=cuda_capture):
        # the cache holds this object (cache.graphs): a weak reference back, so that no cycle keeps the cache's
        # memory and the graphs' alive past the generate() call that made them, until the cyclic GC runs
        self.layers, self.cache, self.capture = layers, weakref.ref(cache), capture
        self.max_len = cache.max_len
        self.graphs = {}  # (rows, new tokens) -> (static x, static step, replay, static output)

    def __call__(self, x, step):
        """x [batch, T, hidden] -> the layers' output, as ``for layer in layers: x = layer(x, step, cache)``"""
        rows, T = x.shape[:2]
        # A pass narrower than a graph already made rides in it, up to twice its width: the last rounds of a
        # generation ask fewer drafts (k + 1, k, ..., 1 new tokens), and each capture costs ~3 eager passes
        # (on the H200 at k = 4, up to five captures per 64-token call against plain's one). The extra queries
        # are padding; the bound keeps a one-token step from paying for nine columns at 64 rows.
        wider = [t for r, t in self.graphs if r == rows and T <= t <= 2 * T]
        if wider:
            static_x, static, replay, out = self.graphs[rows, min(wider)]
            self._fill(static_x, static, x, step)
            replay()
            return out[:, :T].clone()
        static_x = torch.empty_like(x)
        # span: the whole cache, a bound that holds for every replay (attention stops at each row's own
        # length; the kernel's splits over the rest of the cache find nothing to do)
        static = dataclasses.replace(step, span=self.max_len + 1, mask=None, row_ok=None,
                                     **{name: torch.empty_like(getattr(step, name)) for name in _STEP_TENSORS})
        self._fill(static_x, static, x, step)
        out = torch.empty_like(x)

        def run():
            y, cache = static_x, self.cache()
            for layer in self.layers:
                y = layer(y, static, cache)
            out.copy_(y)

        self.graphs[rows, T] = (static_x, static, self.capture(run), out)
        return out.clone()  # the capture ran the layers on this step's inputs (the warm-up did)

    def _fill(self, static_x, static, x, step) -> None:
        """Copy this pass's inputs into a graph's static tensors; columns past its T are padding (position -1,
        written to the cache's trash slot, masked in attention, their outputs never read)."""
        T = x.shape[1]
        static_x[:, :T].copy_(x)
        static_x[:, T:].zero_()
        for name in ("cos", "sin", "positions", "slots"):
            getattr(static, name)[:, :T].copy_(getattr(step, name))
        static.cos[:, T:].zero_()
        static.sin[:, T:].zero_()
        static.positions[:, T:] = -1
        static.slots[:, T:] = self.max_len  # the trash slot (KVCache.slots of position -1)
        static.context_lens.copy_(step.context_lens)
        static.query_lens.copy_(step.query_lens)
