"""The one part of embedwatch's build that pyproject.toml cannot declare: its C extensions.

Both are optional: without a C compiler the install goes on and embedwatch runs their pure-Python
and numpy versions (same outcome; about 2 µs more per b64 event without ``embedwatch._b64scan``,
about 0.7 µs more per 384-d event without ``embedwatch._rowsums``, whose loops are built for the
build's baseline instruction set and, on x86-64, for AVX2 too, taken when the CPU has it).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "embedwatch._b64scan",
            sources=["service/embedwatch/_b64scan.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
        Extension(
            "embedwatch._rowsums",
            sources=["service/embedwatch/_rowsums.c"],
            # No fused multiply-adds (GCC contracts a * b + c by default where the target has them, as
            # arm64 does): the loops' sums are specified to the bit, and the tests hold them to it.
            extra_compile_args=["-O2", "-std=gnu11", "-ffp-contract=off", "-Wall", "-Wextra",
                                "-Werror=implicit-function-declaration"],
            optional=True,
        ),
    ]
)
