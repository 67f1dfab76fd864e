"""Build the ROBE-Z custom-op library into the tfcompress package.

    python custom_ops/build.py            # builds tfcompress/_robe_ops-tf<version>-<hash>.so unless it is current
    python custom_ops/build.py --force    # rebuild even if current

The library name carries the TensorFlow version and a hash of the sources and flags, so a TensorFlow upgrade or an
edited kernel never loads a stale binary: `tfcompress.fused_ops` looks for exactly that name and, when it is absent,
calls `build()` from this file (build on first use). Sources compile in parallel (g++ -O3, TensorFlow's own
compile and link flags from tf.sysconfig); the CUDA kernels join only when TensorFlow is a CUDA build and nvcc is on
PATH (or $NVCC).
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = SOURCE_DIR.parent / "tfcompress"
LIBRARY_PREFIX = "_robe_ops"

HEADERS = ("robe_hash.h", "robe_hash_avx2.h", "robe_functor.h", "robe_cpu_functors.h", "robe_gpu_kernels.cu.h",
           "robe_bag_functor.h", "robe_bag_gpu_kernels.cu.h")
CPU_SOURCES = ("robe_ops.cc", "robe_kernels.cc", "robe_cpu_functors.cc", "robe_bag_ops.cc", "robe_bag_kernels.cc")
GPU_SOURCES = ("robe_kernels.cu.cc", "robe_bag_kernels.cu.cc")
CXX_FLAGS = ("-O3", "-shared", "-fPIC", "-Wall", "-Wno-sign-compare", "-Wno-unused-function")


class BuildError(RuntimeError):
    """The library could not be built; the message says which step failed and why."""


def _tensorflow():
    import tensorflow as tf

    return tf


def cuda_enabled():
    """Compile the GPU kernels only for a CUDA build of TensorFlow on a machine with nvcc."""
    return bool(_tensorflow().test.is_built_with_cuda()) and _nvcc() is not None


def _nvcc():
    return os.environ.get("NVCC") or shutil.which("nvcc")


def _cuda_home():
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, nvcc's parent directory, or /usr/local/cuda*."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if _nvcc():
        candidates.append(str(Path(_nvcc()).resolve().parent.parent))
    candidates += ["/usr/local/cuda", *sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))]
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home)
    return None


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _flags(with_cuda):
    tf = _tensorflow()
    compile_flags = list(tf.sysconfig.get_compile_flags()) + ["-I" + str(SOURCE_DIR)]
    link_flags = list(tf.sysconfig.get_link_flags())
    if with_cuda:
        compile_flags.append("-DGOOGLE_CUDA=1")
        home = _cuda_home()
        if home is not None:
            compile_flags.append("-I" + str(home / "include"))
            link_flags += ["-L" + str(home / "lib64"), "-lcudart"]
        else:
            link_flags.append("-lcudart")
    return compile_flags, link_flags


def hashed_files():
    """The files whose contents name the library: the listed headers and sources, then any other header or source in
    custom_ops/ (so a file added to the build but not to these lists still rebuilds the library), then this script."""
    listed = HEADERS + CPU_SOURCES + GPU_SOURCES
    others = sorted({path.name for pattern in ("*.h", "*.cc") for path in SOURCE_DIR.glob(pattern)} - set(listed))
    return listed + tuple(others) + ("build.py",)


def source_hash(with_cuda=None):
    """sha256 over every source, this script, and the flags: part of the library's file name."""
    with_cuda = cuda_enabled() if with_cuda is None else with_cuda
    digest = hashlib.sha256()
    for name in hashed_files():
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    compile_flags, link_flags = _flags(with_cuda)
    digest.update(" ".join(CXX_FLAGS + tuple(compile_flags) + tuple(link_flags)).encode())
    return digest.hexdigest()[:16]


def library_name(tf_version=None, digest=None):
    """_robe_ops-tf<TF version>-<source hash>.so"""
    tf_version = tf_version or _tensorflow().__version__
    return f"{LIBRARY_PREFIX}-tf{tf_version}-{digest or source_hash()}.so"


def library_path(output_dir=PACKAGE_DIR):
    return Path(output_dir) / library_name()


def _run_all(commands):
    """Run compiler commands in parallel; raise BuildError with the first failure's output."""
    processes = [
        (command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for command in commands
    ]
    failures = []
    for command, process in processes:
        output, _ = process.communicate()
        if process.returncode != 0:
            failures.append(f"$ {' '.join(command)}\n{output[-4000:]}")
    if failures:
        raise BuildError("compiling the ROBE-Z ops failed:\n" + "\n".join(failures))


def build(output_dir=PACKAGE_DIR, force=False, verbose=False):
    """Compile and link the op library; returns its path. Raises BuildError when no compiler or a step fails.

    Args:
        output_dir: where the library lands (the package directory by default).
        force: rebuild even if a library with the current name exists.
        verbose: print the compiler commands.
    """
    with_cuda = cuda_enabled()
    target = Path(output_dir) / library_name(digest=source_hash(with_cuda))
    if target.exists() and not force:
        return target
    cxx = _compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (looked for $CXX, g++, c++)")
    compile_flags, link_flags = _flags(with_cuda)
    with tempfile.TemporaryDirectory(prefix="robe_ops_build_") as work:
        objects, commands = [], []
        for name in CPU_SOURCES:
            obj = os.path.join(work, name + ".o")
            commands.append([cxx, *CXX_FLAGS, "-c", str(SOURCE_DIR / name), "-o", obj, *compile_flags])
            objects.append(obj)
        if with_cuda:
            for name in GPU_SOURCES:
                obj = os.path.join(work, name + ".o")
                commands.append([
                    _nvcc(), "-O3", "-std=c++17", "-c", "-x", "cu", str(SOURCE_DIR / name), "-o", obj,
                    "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", *compile_flags,
                ])
                objects.append(obj)
        for command in commands:
            if verbose:
                print("$", " ".join(command), flush=True)
        _run_all(commands)
        # Link to a private name, then rename: a concurrent build or load never sees a half-written file.
        partial = os.path.join(work, "lib.so")
        _run_all([[cxx, "-shared", "-fPIC", *objects, "-o", partial, *link_flags]])
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        staged = Path(output_dir) / f".{target.name}.{os.getpid()}.tmp"
        shutil.copyfile(partial, staged)
        os.replace(staged, target)
    _remove_stale(target)
    return target


def _remove_stale(current):
    """Delete libraries built from older sources or another TF version (they can never load again)."""
    for old in current.parent.glob(f"{LIBRARY_PREFIX}-*.so"):
        if old != current:
            try:
                old.unlink()
            except OSError:
                pass  # another process may have it open or removed it already; harmless


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(PACKAGE_DIR), help="where the library lands (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the library is current")
    parser.add_argument("--quiet", action="store_true", help="print only the library path")
    args = parser.parse_args(argv)
    try:
        path = build(args.output_dir, force=args.force, verbose=not args.quiet)
    except BuildError as error:
        print(error, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
