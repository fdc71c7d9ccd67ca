"""Benchmarks that print JSON figures; `medfed bench ...` runs them."""

if __name__ != "medfed.bench":  # the folder is installed only as medfed.bench
    raise ImportError(
        f"this folder is the package medfed.bench: import medfed.bench, not {__name__}"
    )
