"""Generates the gRPC stubs from proto/ whenever the package is built (wheel or editable).

The stubs are build outputs (dvd/v1/, git-ignored), never edited by hand.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    (ROOT / "dvd" / "v1" / "__init__.py").write_text('"""Generated gRPC stubs (do not edit)."""\n')


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


if __name__ == "__main__":  # setuptools runs this file as __main__; `make proto` imports it
    # Generate before setup() so package discovery sees dvd/v1 (wheels, not only editable).
    generate_stubs()
    setup(cmdclass={"build_py": BuildPyWithStubs})
