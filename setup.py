"""Build: gRPC stubs from proto/ (grpcio-tools + mypy-protobuf) and the Cython modules in ext/.

Both are generated at build time and never committed. A missing Cython or compiler fails the build loudly:
the pure-Python twins are an explicit opt-out at run time (RESOLVER_NO_EXTENSIONS=1), never a silent fallback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
STUB_DIR = ROOT / "resolver" / "v1"


def generate_stubs() -> None:
    """Compile proto/resolver/v1/*.proto into resolver/v1 (pb2, pb2_grpc, .pyi) when stale."""
    from grpc_tools import protoc  # build requirement: fails loudly if absent

    protos = sorted((PROTO_ROOT / "resolver" / "v1").glob("*.proto"))
    newest = max(p.stat().st_mtime for p in protos)
    outputs = [STUB_DIR / (p.stem + suffix) for p in protos for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")]
    if all(o.exists() and o.stat().st_mtime >= newest for o in outputs):
        return
    include = Path(protoc.__file__).resolve().parent / "_proto"
    # google/rpc/*.proto ship with googleapis-common-protos (a grpcio-status dependency)
    import google.rpc.status_pb2 as rpc_status

    googleapis = Path(rpc_status.__file__).resolve().parents[2]
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"-I{googleapis}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
    ]
    if plugin.exists():
        args.append(f"--plugin=protoc-gen-mypy={plugin}")
    args += [str(p.relative_to(PROTO_ROOT)) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + ", ".join(map(str, protos)))
    (STUB_DIR / "__init__.py").touch()


def generate_phone_metadata() -> None:
    """Write resolver/_phonemeta.py (the fast phone path's tables) from the installed phonenumbers."""
    import runpy

    # by path: importing the resolver package here would import its runtime dependencies
    runpy.run_path(str(ROOT / "resolver" / "_phonemeta_gen.py"))["generate"](ROOT / "resolver" / "_phonemeta.py")


def require_toolchain() -> None:
    """Stop with one sentence, not a compiler traceback, when the machine cannot build the extensions.

    The build needs a C compiler and the Python headers, nothing else: no system library (the key hash calls
    the xxHash code of the `xxhash` wheel, see ext/_keys_c.pyx).
    """
    import shlex
    import shutil
    import sysconfig

    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(shlex.split(compiler)[0]) is None:
        raise SystemExit(f"resolver: building the compiled hot path needs a C compiler; {compiler.split()[0]!r} was "
                         "not found (install gcc or clang, or set CC)")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        raise SystemExit(f"resolver: building the compiled hot path needs the Python headers; {headers} is missing "
                         "(install your distribution's python3-dev package)")


def extensions() -> list[Extension]:
    from Cython.Build import cythonize  # build requirement: fails loudly if absent

    modules = [
        Extension(f"resolver.{pyx.stem}", [str(pyx.relative_to(ROOT))])
        for pyx in sorted((ROOT / "ext").glob("*.pyx"))
    ]
    return cythonize(
        modules,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        annotate=bool(os.environ.get("RESOLVER_CYTHON_ANNOTATE")),
    )


require_toolchain()
generate_stubs()
generate_phone_metadata()
setup(ext_modules=extensions())
