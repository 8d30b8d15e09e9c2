"""L7FP fast path: policy IR, the kernel/Envoy split, C synthesis, BCC agent."""
