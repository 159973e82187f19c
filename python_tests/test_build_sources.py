"""The compiled core's one list of files, csrc/sources.txt, read by setup.py (the extension),
CMakeLists.txt (the C++ kernel tests) and the Makefile (rebuild dependencies): every source and
header under csrc/ is in it, each entry matches files of its part, and the build files read the
list instead of keeping their own. These check the source tree; nothing is built."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES_TXT = os.path.join(ROOT, "csrc", "sources.txt")
# part -> the suffixes its files have
PARTS = {"ops": (".cpp",), "cuda": (".cu",), "ext": (".cpp",), "test": (".cpp",),
         "header": (".h", ".cuh")}


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def _entries():
    """(line number, part, pattern) of every entry of csrc/sources.txt."""
    out = []
    for number, line in enumerate(_read(SOURCES_TXT).splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if fields:
            assert len(fields) == 2, f"csrc/sources.txt:{number}: want '<part> <path or glob>', got {line!r}"
            out.append((number, fields[0], fields[1]))
    return out


def _files(part=None):
    return {path for _, p, pattern in _entries() if part in (None, p)
            for path in glob.glob(pattern, root_dir=ROOT)}


def test_every_source_and_header_under_csrc_is_listed():
    on_disk = {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
               for d, _, files in os.walk(os.path.join(ROOT, "csrc")) for f in files
               if f.endswith((".cpp", ".cu", ".h", ".cuh"))}
    assert "csrc/bindings.cpp" in on_disk
    missing = sorted(on_disk - _files())
    assert not missing, (f"in csrc/ but in no entry of csrc/sources.txt, so neither setup.py nor "
                         f"CMake compiles it: {missing} (a CUDA kernel is named <op>_cuda.cu)")


def test_every_entry_matches_files_of_its_part():
    for number, part, pattern in _entries():
        assert part in PARTS, f"csrc/sources.txt:{number}: unknown part {part!r} (one of {sorted(PARTS)})"
        assert "**" not in pattern, f"csrc/sources.txt:{number}: CMake's file(GLOB) has no '**'"
        matches = glob.glob(pattern, root_dir=ROOT)
        assert matches, f"csrc/sources.txt:{number}: {pattern!r} matches no file"
        wrong = [m for m in matches if not m.endswith(PARTS[part])]
        assert not wrong, f"csrc/sources.txt:{number}: {wrong} are not {PARTS[part]} files"


def test_no_two_sources_compile_to_the_same_object():
    # setuptools names an object after its source without the suffix: ops/x.cpp and ops/x.cu
    # would both be ops/x.o.
    stems = {}
    for path in _files("ops") | _files("ext") | _files("cuda"):
        stems.setdefault(os.path.splitext(path)[0], []).append(path)
    assert not [p for p in stems.values() if len(p) > 1]


def test_each_cuda_kernel_is_registered_by_its_op():
    for cu in sorted(_files("cuda")):
        assert cu.endswith("_cuda.cu"), cu
        cpp = cu[:-len("_cuda.cu")] + ".cpp"
        assert cpp in _files("ops"), f"{cu}: no {cpp} that checks the arguments and registers it"
        name = os.path.basename(cu)[:-len(".cu")]
        assert re.search(rf"\b{name}\(", _read(cpp)), f"{cpp} does not declare {name}"
        assert re.search(rf"\bvoid {name}\(", _read(cu)), f"{cu} does not define {name}"


def test_the_build_files_read_the_list():
    setup_py, cmake, makefile = _read("setup.py"), _read("CMakeLists.txt"), _read("Makefile")
    assert '"sources.txt"' in setup_py and "read_sources(" in setup_py
    assert not re.findall(r"csrc/\S+\.(?:cpp|cu)\b", setup_py), "setup.py lists sources itself"
    assert re.search(r'file\(STRINGS "\$\{_amaml_sources_txt\}"', cmake)
    assert "add_executable(amaml_kernels_test ${_amaml_test_sources})" in cmake
    assert re.search(r"^SOURCES := .*csrc/sources\.txt", makefile, re.M)
    # the sdist ships what setup.py reads: the list and every file of csrc/
    assert re.search(r"^graft csrc$", _read("MANIFEST.in"), re.M)
