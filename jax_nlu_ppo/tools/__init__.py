"""Development tools: the benchmark, the op profile, the memory plan and run reports."""
