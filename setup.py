"""The one part of embedwatch's build that pyproject.toml cannot declare: its C extension.

``embedwatch._b64scan`` is optional: without a C compiler the install goes on and the decoder runs
its pure-Python b64 pass (same outcome, about 2 µs more per b64 event).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "embedwatch._b64scan",
            sources=["service/embedwatch/_b64scan.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
            optional=True,
        )
    ]
)
