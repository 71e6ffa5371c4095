


def announce_cpu() -> str:
    """Print (and return) which kind of CPU this benchmark runs on: its numbers depend on it (bf16 kernels are
    native on AVX512-BF16 / AMX and emulated on AVX2-only CPUs, and `dtype: auto` follows)."""
    from deployments.engine.checkpoint import cpu_kind

    kind = cpu_kind()
    print(f"CPU: {kind}", flush=True)
    return kind
