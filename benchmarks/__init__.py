"""ldpruner's benchmarks: latency, memory, analysis cost and offline quality metrics (``benchmarks.metrics``).

The bench stage imports these; nothing in the product (ldpruner, compiler, passes, runtime, zoo) imports them.
"""
