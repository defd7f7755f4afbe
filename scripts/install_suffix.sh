#!/usr/bin/env bash
# Makes vLLM's `suffix` speculative method runnable in .venv, for the
# benchmark's `suffix` baseline (not needed by vllm-lookahead itself).
#
# vLLM's suffix method imports arctic_inference.suffix_decoding. PyPI has
# arctic-inference only as source distributions; the whole package builds CUDA
# kernels and registers a vLLM plugin that patches vLLM (pinned to 0.26), which
# would also load into every vLLM process here. So this builds only its
# suffix-tree extension (C++, nanobind, CMake) from the checked sdist and
# installs arctic_inference.suffix_decoding without the plugin.
source "$(dirname "$0")/env.sh"

VERSION=0.3.0
SDIST_SHA256=7f22e3e1b1071c6061c0d6951be17c0fb50b08d06d6e543144c8f52faba60a36
NANOBIND=2.9.2

if "$PY" -c "from arctic_inference.suffix_decoding import SuffixDecodingCache" 2>/dev/null; then
  log "arctic_inference.suffix_decoding is installed"
  exit 0
fi
command -v cmake >/dev/null || { log "cmake is needed (apt install cmake)"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sdist="$work/arctic_inference-$VERSION.tar.gz"
log "fetching arctic-inference $VERSION (source)"
"$PY" - "$VERSION" "$sdist" <<'EOF'
import re, sys, urllib.request
version, out = sys.argv[1], sys.argv[2]
index = urllib.request.urlopen("https://pypi.org/simple/arctic-inference/", timeout=60).read().decode()
url = re.search(rf'href="([^"#]*arctic_inference-{re.escape(version)}\.tar\.gz)', index).group(1)
urllib.request.urlretrieve(url, out)
EOF
echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet - || { log "sdist hash mismatch"; exit 1; }
tar xzf "$sdist" -C "$work"
src="$work/arctic_inference-$VERSION"

log "building its suffix tree (C++)"
"$PY" -m pip install -q "nanobind==$NANOBIND"
cmake -S "$src/csrc/suffix_decoding" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$PY" >/dev/null
cmake --build "$work/build" -j "$(nproc)" >/dev/null

site="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
dest="$site/arctic_inference"
mkdir -p "$dest/suffix_decoding"
cp "$src/arctic_inference/__init__.py" "$dest/"
cp "$src/arctic_inference/suffix_decoding/__init__.py" \
   "$src/arctic_inference/suffix_decoding/cache.py" "$dest/suffix_decoding/"
cp "$work"/build/_C*.so "$dest/suffix_decoding/"
"$PY" -c "from arctic_inference.suffix_decoding import SuffixDecodingCache"
log "installed arctic_inference.suffix_decoding into $dest"
