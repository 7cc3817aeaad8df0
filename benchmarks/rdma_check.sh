#!/usr/bin/env bash
# The rdma feature transport, for real, between two processes on one host.
#
# NEVER RUN AGAINST A DEVICE. This script was written on machines that have no RDMA device
# and whose kernel has no InfiniBand support. There, only its prerequisite checks have run
# (they stop with status 3: no device). The transfer itself, and the pyverbs code path it
# exercises (dvd/transport/rdma/verbs.py), have never executed against a device; the transport's
# logic is tested only against an in-process fake (tests/test_rdma.py), and the Python
# driver's own logic was run once in a single process over that fake. Expect to debug on
# first use, and treat its first numbers with suspicion until they are checked by hand.
#
# Needs: a host with an RDMA device. A NIC (InfiniBand or RoCE) or soft-RoCE qualifies:
#   sudo modprobe rdma_rxe && sudo rdma link add rxe0 type rxe netdev <interface>
# and pyverbs, which comes with rdma-core, not from pip:
#   sudo apt install python3-pyverbs rdma-core ibverbs-providers ibverbs-utils
#
# What it does: checks the prerequisites (pyverbs importable, a device listed), starts the
# vision side (benchmarks/rdma_check.py serve: the transport's Sender behind a real gRPC
# RdmaConnect and a model-free Encode on 127.0.0.1), then the language side (measure: the
# Receiver attaches over RdmaConnect and pulls BF16 features of one image of 1, 4 and 13
# tiles x 256 rows x hidden 4096), checks every bit, and prints GiB/s per shape for rdma and
# for grpc (the bytes inside the stream) measured in the same run.
#
# Environment: PYTHON (default .venv/bin/python, else python3), RDMA_DEVICE (default: the
# first device), RDMA_GID_INDEX (default 0; on RoCE pick the RoCE v2 GID of the interface,
# see `show_gids`), ITERATIONS (default 20), OUT (a JSON report path, optional).
# Exit status: 0 all transfers bit-exact; 1 a mismatch or failure; 2 pyverbs missing;
# 3 no RDMA device.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEBIAN_SITE=/usr/lib/python3/dist-packages
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

die() {
    local status=$1
    shift
    echo "rdma_check: $*" >&2
    exit "$status"
}

"$PYTHON" -c "import dvd.transport.rdma, grpc, torch" ||
    die 1 "$PYTHON cannot import dvd-serve (install it: pip install -e .)"

# pyverbs: in this Python, else Debian's build for the system python3, appended to the path
# (it is only importable by the same minor version of Python).
if ! "$PYTHON" -c "import pyverbs" 2>/dev/null; then
    if [[ -d "$DEBIAN_SITE/pyverbs" ]] &&
        PYTHONPATH="$PYTHONPATH:$DEBIAN_SITE" "$PYTHON" -c "import pyverbs" 2>/dev/null; then
        export PYTHONPATH="$PYTHONPATH:$DEBIAN_SITE"
        echo "rdma_check: using Debian's pyverbs from $DEBIAN_SITE"
    else
        die 2 "pyverbs is not importable by $PYTHON. Install rdma-core's Python binding \
(Debian/Ubuntu: sudo apt install python3-pyverbs; pip cannot build it) with a Python of \
the same minor version, or set PYTHON to one that imports both pyverbs and dvd."
    fi
fi

# A device: what libibverbs lists (ibv_devices, when installed) and what pyverbs opens.
if command -v ibv_devices >/dev/null; then
    ibv_devices || true
fi
devices=$("$PYTHON" -c '
import pyverbs.device as d
try:
    print(" ".join(x.name.decode() for x in d.get_device_list()))
except Exception:
    pass
') || devices=""
if [[ -z "$devices" ]]; then
    die 3 "no RDMA device found (pyverbs lists none). Use a host with an RDMA NIC, or \
soft-RoCE: sudo modprobe rdma_rxe && sudo rdma link add rxe0 type rxe netdev <interface>. \
A kernel without InfiniBand support (no /sys/class/infiniband) cannot do either."
fi
# Registered memory is pinned: the receive buffer (256 MiB) and the staging buffer need it.
memlock=$(ulimit -l)
if [[ "$memlock" != unlimited && "$memlock" -lt $((512 * 1024)) ]]; then
    echo "rdma_check: warning: ulimit -l is $memlock KiB; registering the buffers may fail" \
        "(raise it: ulimit -l unlimited, or --ulimit memlock=-1 in a container)" >&2
fi
device=${RDMA_DEVICE:-${devices%% *}}
echo "rdma_check: devices: $devices; using $device, GID index ${RDMA_GID_INDEX:-0}"

workdir=$(mktemp -d)
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$workdir"
}
trap cleanup EXIT

common=(--port-file "$workdir/port" --device "$device" --gid-index "${RDMA_GID_INDEX:-0}")
"$PYTHON" -m benchmarks.rdma_check serve "${common[@]}" &
server_pid=$!
for _ in $(seq 100); do
    [[ -s "$workdir/port" ]] && break
    kill -0 "$server_pid" 2>/dev/null || die 1 "the vision side exited before listening"
    sleep 0.1
done
[[ -s "$workdir/port" ]] || die 1 "the vision side did not start listening within 10 s"

extra=()
if [[ -n "${OUT:-}" ]]; then extra=(--out "$OUT"); fi
echo "rdma_check: host $(hostname), $(uname -r)"
"$PYTHON" -m benchmarks.rdma_check measure "${common[@]}" \
    --iterations "${ITERATIONS:-20}" "${extra[@]}"
