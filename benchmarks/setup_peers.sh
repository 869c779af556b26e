#!/usr/bin/env bash
# make bench-peers: sets up the engines `edgevl bench --reference llama.cpp openvino` compares against, each in
# its own folder under ~/.cache/edgevl/peers/ ($EDGEVL_CACHE/peers), never in the project's .venv. Idempotent:
# a peer whose ready.json matches this script's pins is skipped; every step reuses what is already there.
#
#   llama.cpp  the llama.cpp vendored by the PyPI sdist of llama-cpp-python (pinned below), built from source
#              with cmake: CPU only, Release, -DGGML_NATIVE=ON, tools llama-mtmd-cli, llama-quantize, llama-bench;
#              plus a venv for its converter (convert_hf_to_gguf.py) with the transformers 4.x it pins
#   openvino   a venv with openvino, openvino-genai, openvino-tokenizers, optimum-intel, nncf and transformers
#              4.x (optimum-intel refuses to export Qwen2-VL with transformers 5)
#
# Everything comes from PyPI. torch is pinned to the release whose CPU build this project installs
# (torch==2.13.0, see the Makefile), so pip does not pull a multi-GB CUDA build. PyPI's torchvision is a
# CUDA build whose operators fail to register against the CPU torch, breaking `import transformers`;
# optimum-intel lists it but its Qwen2-VL export does not use it, so it is removed after the install.
#
# Environment: PYTHON (python3, 3.10+), PEERS ("llama.cpp openvino"), JOBS (compile jobs: nproc). The build
# runs under `nice`. ~10 minutes on 2 cores, ~3 GB of downloads; models are converted later, on first use
# by `edgevl bench`, and cached beside the tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PEERS=${PEERS:-llama.cpp openvino}
JOBS=${JOBS:-$(nproc)}
ROOT=${EDGEVL_CACHE:-$HOME/.cache/edgevl}/peers

LLAMA_CPP_PYTHON=0.3.36
LLAMA_CONVERT_PKGS=(torch==2.13.0 transformers==4.57.6 "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0"
                    "protobuf>=4.21.0,<5.0.0" safetensors pyyaml)
OPENVINO_PKGS=(torch==2.13.0 torchvision==0.28.0 openvino==2026.4.1 openvino-genai==2026.4.1.0
               openvino-tokenizers==2026.4.1.0 optimum-intel==2.2.0 optimum==2.3.0 nncf==3.4.0
               transformers==4.57.6 pillow)

log() { echo "[bench-peers] $*" >&2; }

# is_ready FOLDER PINS: ready.json exists and was written for these pins
is_ready() { [ -f "$1/ready.json" ] && "$PYTHON" -c "import json,sys; sys.exit(json.load(open('$1/ready.json')).get('pins') != sys.argv[1])" "$2"; }

# write_ready FOLDER PINS PEER VENV_PYTHON PACKAGES -- KEY=PATH... : ready.json with paths and versions, last
write_ready() {
    local dir=$1 pins=$2 peer=$3 py=$4 pkgs=$5; shift 5
    "$py" - "$dir" "$pins" "$peer" "$pkgs" "$@" <<'EOF'
import json, sys
from importlib.metadata import version, PackageNotFoundError
folder, pins, peer, pkgs, *rest = sys.argv[1:]
extra = dict(kv.split("=", 1) for kv in rest if kv.startswith("version:"))
paths = dict(kv.split("=", 1) for kv in rest if not kv.startswith("version:"))
versions = {k.removeprefix("version:"): v for k, v in extra.items()}
for name in pkgs.split():
    try:
        versions[name] = version(name)
    except PackageNotFoundError:
        pass
build = paths.pop("build", None)
info = {"peer": peer, "pins": pins, "paths": paths, "versions": versions, "build": build}
with open(f"{folder}/ready.json", "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info, indent=1))
EOF
}

setup_llama_cpp() {
    local dir=$ROOT/llama.cpp pins="llama-cpp-python==$LLAMA_CPP_PYTHON ${LLAMA_CONVERT_PKGS[*]}"
    if is_ready "$dir" "$pins"; then log "llama.cpp: ready ($dir)"; return; fi
    mkdir -p "$dir/src"
    local sdist=$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz
    local src=$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
    if [ ! -f "$sdist" ]; then
        log "llama.cpp: downloading the llama-cpp-python $LLAMA_CPP_PYTHON sdist (it vendors llama.cpp)"
        "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$dir/src"
    fi
    [ -f "$src/CMakeLists.txt" ] || tar -xzf "$sdist" -C "$dir/src"
    local gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
    log "llama.cpp: building llama-mtmd-cli, llama-quantize, llama-bench (CPU, GGML_NATIVE=ON, nice, $JOBS jobs)"
    nice -n 19 cmake -S "$src" -B "$dir/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DBUILD_SHARED_LIBS=OFF > "$dir/cmake-configure.log"
    nice -n 19 cmake --build "$dir/build" -j "$JOBS" --target llama-mtmd-cli llama-quantize llama-bench \
        > "$dir/cmake-build.log" || { tail -20 "$dir/cmake-build.log" >&2; exit 1; }
    [ -x "$dir/venv/bin/python" ] || "$PYTHON" -m venv "$dir/venv"
    log "llama.cpp: converter environment ($dir/venv)"
    nice "$dir/venv/bin/python" -m pip install --quiet "${LLAMA_CONVERT_PKGS[@]}"
    local commit tool_version compiler
    commit=$(git -C "$src" rev-parse HEAD 2>/dev/null || echo unknown)
    tool_version=$("$dir/build/bin/llama-mtmd-cli" --version 2>&1 | sed -n 's/^version: //p' | head -1)
    compiler=$("$dir/build/bin/llama-mtmd-cli" --version 2>&1 | sed -n 's/^built with //p' | head -1)
    write_ready "$dir" "$pins" llama.cpp "$dir/venv/bin/python" "torch transformers numpy gguf" \
        "python=$dir/venv/bin/python" "source=$src" "mtmd_cli=$dir/build/bin/llama-mtmd-cli" \
        "quantize=$dir/build/bin/llama-quantize" "bench=$dir/build/bin/llama-bench" \
        "build=cmake Release, CPU only, -DGGML_NATIVE=ON, $compiler" \
        "version:llama.cpp commit=$commit" "version:llama.cpp=$tool_version" \
        "version:llama-cpp-python sdist=$LLAMA_CPP_PYTHON" > /dev/null
    log "llama.cpp: ready (commit $commit)"
}

setup_openvino() {
    local dir=$ROOT/openvino pins="${OPENVINO_PKGS[*]}"
    if is_ready "$dir" "$pins"; then log "openvino: ready ($dir)"; return; fi
    mkdir -p "$dir"
    [ -x "$dir/venv/bin/python" ] || "$PYTHON" -m venv "$dir/venv"
    log "openvino: environment ($dir/venv)"
    nice "$dir/venv/bin/python" -m pip install --quiet "${OPENVINO_PKGS[@]}"
    "$dir/venv/bin/python" -m pip uninstall --quiet -y torchvision   # see the header
    "$dir/venv/bin/python" -c "import openvino_genai, optimum.intel, transformers"
    write_ready "$dir" "$pins" openvino "$dir/venv/bin/python" \
        "openvino openvino-genai openvino-tokenizers optimum-intel optimum nncf transformers torch" \
        "python=$dir/venv/bin/python" "optimum_cli=$dir/venv/bin/optimum-cli" > /dev/null
    log "openvino: ready"
}

for peer in $PEERS; do
    case $peer in
        llama.cpp) setup_llama_cpp ;;
        openvino) setup_openvino ;;
        *) echo "unknown peer $peer (llama.cpp, openvino)" >&2; exit 2 ;;
    esac
done
