"""ldpruner.compiler: trace a UNet into an fx graph of operators and describe it as an OperatorGraph.

One subject per module; the public surface is listed below and resolves lazily, so importing ``ldpruner.compiler``
does not load torch. Imports the base layer only.

    tracer          trace_unet → TracedUNet (the fx graph, its inputs and the decisions it was traced under)
    diffusers_call  call_diffusers_unet (the flat-input call the tracer traces, run eagerly)
    signature       UNetSignature, unet_input_names, unet_example_inputs, controlnet_residuals, adapter_features
    operators       Granularity, parse_granularity, is_operator
    graph           build_operator_graph → OperatorGraph of Operators, each with its removal Action
    structure       build_structure (the OperatorGraph's networkx view: data, skip and residual edges)
    removal         stand_in, swapped (an operator replaced in place by what its removal computes)
    taps            FeatureTaps, match_taps, tapped (each operator group's output as a graph output)
    verify          verify_graph        passmanager   Pass, PassManager, PassResult
"""

from __future__ import annotations

from ldpruner.base.lazy import lazy_exports

__all__ = [
    "Action",
    "Decision",
    "FeatureTaps",
    "Granularity",
    "Operator",
    "OperatorGraph",
    "Pass",
    "PassManager",
    "PassResult",
    "TracedUNet",
    "UNetSignature",
    "adapter_features",
    "build_operator_graph",
    "call_diffusers_unet",
    "controlnet_residuals",
    "is_operator",
    "match_taps",
    "parse_granularity",
    "stand_in",
    "swapped",
    "tapped",
    "trace_unet",
    "unet_example_inputs",
    "unet_input_names",
    "verify_graph",
]

_WHERE = {
    "Decision": "tracer", "TracedUNet": "tracer", "trace_unet": "tracer",
    "call_diffusers_unet": "diffusers_call",
    "UNetSignature": "signature", "adapter_features": "signature", "controlnet_residuals": "signature",
    "unet_example_inputs": "signature", "unet_input_names": "signature",
    "Granularity": "operators", "is_operator": "operators", "parse_granularity": "operators",
    "Action": "graph", "Operator": "graph", "OperatorGraph": "graph", "build_operator_graph": "graph",
    "stand_in": "removal", "swapped": "removal",
    "FeatureTaps": "taps", "match_taps": "taps", "tapped": "taps",
    "verify_graph": "verify",
    "Pass": "passmanager", "PassManager": "passmanager", "PassResult": "passmanager",
}

__getattr__ = lazy_exports(__name__, _WHERE)
