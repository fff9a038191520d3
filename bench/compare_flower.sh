#!/usr/bin/env bash
# greyfed vs Flower 1.41, end to end, side by side.
#
# Runs, one after the other in this order:
#   1. greyfed simulate --aggregation secagg+   (default: SecAgg+)
#   2. greyfed simulate --aggregation plain
#   3. Flower FedAvg + SecAgg+, deployment engine (bench/flower_fedavg.py --secagg:
#      SuperLink + 10 SuperNodes + flwr run, separate processes)
#   4. Flower FedAvg, plain, deployment engine
#   5. Flower FedAvg + SecAgg+, simulation engine (warm worker processes)
#   6. Flower FedAvg, plain, simulation engine
# on the same data (10 participants, 10 rounds, IID shards of 700 images,
# blocknet, SGD lr 0.1 momentum 0.9, batch 32, 5 local epochs), and prints a
# markdown table: wall time of the whole run, per-round times, CPU time summed
# over all processes, final federated test accuracy,
# peak RSS summed over every process of the run (sampled every 100 ms from
# /proc by bench/procmem.py), bytes per masked element, and the ratio of
# Flower's wall time to greyfed's.
#
# Usage: bench/compare_flower.sh            (from the repository root or not)
# Environment:
#   DATA=../shared/data/mnist-10k  PARTICIPANTS=10  ROUNDS=10  SEED=0
#   OUT=out/compare-flower         PYTHON=python3 (needs flwr + torch for Flower)
#   SKIP_BUILD=1   use the existing target/release/greyfed
#   FLOWER_TIMEOUT=7200  seconds allowed for each Flower run
#   FLOWER_ENGINES="deployment simulation"  which Flower engines to run
#   FLOWER_WORKERS=0     simulation engine: worker processes (0: min(N, CPUs))
#   SKIP_FLOWER=1  greyfed only
#   NO_WAIT=1      do not wait for running `greyfed experiment` processes
#                  (EXPERIMENT_PATTERN, a pgrep -f regex, says which)
#   REPORT_ONLY=1  only print the table from the results already in $OUT
#   MAX_LOAD=1.5 LOAD_WAIT_MAX=900  before each run, wait (at most
#                  LOAD_WAIT_MAX s) until the 1-minute load average is below
#                  MAX_LOAD: the machine is shared and the timings are wall time
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA=${DATA:-../shared/data/mnist-10k}
PARTICIPANTS=${PARTICIPANTS:-10}
ROUNDS=${ROUNDS:-10}
SEED=${SEED:-0}
OUT=${OUT:-out/compare-flower}
GREYFED=target/release/greyfed

if [ ! -d "$DATA" ]; then
    echo "compare_flower: data directory $DATA not found (set DATA=...); nothing to compare."
    exit 0
fi

# Experiments also run from copies of the binary (e.g. /work/results/gfx).
EXPERIMENT_PATTERN=${EXPERIMENT_PATTERN:-(greyfed|gfx) experiment}
MAX_LOAD=${MAX_LOAD:-1.5}
LOAD_WAIT_MAX=${LOAD_WAIT_MAX:-900}

wait_experiments() {
    if [ "${NO_WAIT:-0}" != 1 ]; then
        while pgrep -f "$EXPERIMENT_PATTERN" >/dev/null; do
            echo "compare_flower: waiting for running 'greyfed experiment' processes to end..."
            sleep 30
        done
    fi
}

wait_quiet() {
    local waited=0
    while true; do
        wait_experiments
        if awk -v max="$MAX_LOAD" '{ exit !($1 < max) }' /proc/loadavg \
            || [ "$waited" -ge "$LOAD_WAIT_MAX" ]; then
            break
        fi
        sleep 10
        waited=$((waited + 10))
    done
    echo "$1: load before start $(cut -d' ' -f1-3 /proc/loadavg) (waited ${waited} s)" | tee -a "$OUT/loads.txt"
}

FLOWER_STATUS=ok
if [ "${REPORT_ONLY:-0}" != 1 ]; then

# Never rebuild target/release while an experiment may exec it.
wait_experiments

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release
fi
if [ ! -x "$GREYFED" ]; then
    echo "compare_flower: $GREYFED not found; build it with cargo build --release" >&2
    exit 1
fi

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT/loads.txt"

echo "compare_flower: machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for agg in secagg+ plain; do
    name="greyfed-${agg%+}"
    [ "$agg" = "secagg+" ] && name=greyfed-secaggplus
    echo "compare_flower: greyfed, aggregation $agg ..."
    wait_quiet "$name"
    rm -rf "$OUT/$name"
    "$PYTHON" bench/procmem.py --json "$OUT/$name.mem.json" -- \
        "$GREYFED" simulate --data "$DATA" --participants "$PARTICIPANTS" \
        --rounds "$ROUNDS" --aggregation "$agg" --threads 1 --seed "$SEED" \
        --out "$OUT/$name" >"$OUT/$name.log" 2>&1 || {
        echo "compare_flower: greyfed ($agg) failed; see $OUT/$name.log" >&2
        exit 1
    }
done

if [ "${SKIP_FLOWER:-0}" = 1 ]; then
    FLOWER_STATUS="skipped (SKIP_FLOWER=1)"
elif ! "$PYTHON" -c "import flwr, torch" >/dev/null 2>&1; then
    FLOWER_STATUS="skipped: flwr/torch not importable with $PYTHON (set PYTHON=/path/to/venv/bin/python)"
    echo "compare_flower: $FLOWER_STATUS"
else
    for engine in ${FLOWER_ENGINES:-deployment simulation}; do
        for mode in secagg plain; do
            name="flower-$engine-$mode"
            echo "compare_flower: Flower $("$PYTHON" -c 'import flwr; print(flwr.__version__)'), $engine, $mode ..."
            flag=""
            wait_quiet "$name"
            [ "$mode" = secagg ] && flag=--secagg
            rm -rf "$OUT/$name"
            "$PYTHON" bench/flower_fedavg.py --engine "$engine" --data "$DATA" \
                --participants "$PARTICIPANTS" --rounds "$ROUNDS" --seed "$SEED" $flag \
                --workers "${FLOWER_WORKERS:-0}" --out "$OUT/$name" \
                --timeout "${FLOWER_TIMEOUT:-7200}" \
                --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1 || {
                echo "compare_flower: Flower ($engine, $mode) failed; see $OUT/$name.log" >&2
                FLOWER_STATUS="failed ($engine, $mode); see $OUT/$name.log"
            }
        done
    done
fi

fi  # REPORT_ONLY

"$PYTHON" - "$OUT" "$PARTICIPANTS" "$FLOWER_STATUS" "$DATA" <<'EOF'
import gzip, json, math, os, struct, sys

out, n, flower_status, data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


def train_count(data):
    for name in ("train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz"):
        path = os.path.join(data, name)
        if os.path.exists(path):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                return int.from_bytes(f.read(8)[4:8], "big")
    return 7000


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def model_elements(path):
    """Number of parameters in a safetensors file (header only)."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def greyfed_masked_bits(n, max_weight, wanted=16):
    # protocol/src/secagg: fit_bits + EncodingParams::new (ring = bit length
    # of the largest possible sum n * w * (2^b - 1)); packed m bits/element.
    b = next(b for b in range(wanted, 0, -1) if n * max_weight * ((1 << b) - 1) < 1 << 32)
    return (n * max_weight * ((1 << b) - 1)).bit_length(), b


rows = []
for agg, name in (("SecAgg+", "greyfed-secaggplus"), ("plain", "greyfed-plain")):
    mem = load(f"{out}/{name}.mem.json")
    if mem is None:
        continue
    metrics = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl") if l.strip()]
    elems = model_elements(f"{out}/{name}/model.safetensors")
    secs = [m["secs"] for m in metrics]
    up = [m["bytes_up"] / max(m["survivors"], 1) for m in metrics]
    row = dict(
        system="greyfed", agg=agg, wall=mem["wall_s"], acc=metrics[-1]["accuracy"],
        rss=mem["peak_rss_sum_mb"], pss=mem["peak_pss_sum_mb"], procs=mem["processes_at_peak"],
        cpu=mem.get("cpu_s", float("nan")),
        first=secs[0], warm=sum(secs[1:]) / (len(secs) - 1) if len(secs) > 1 else float("nan"), rounds=len(metrics),
        up_per_elem=sum(up) / len(up) / (elems + 1),
    )
    if agg == "SecAgg+":
        # The weight bound is the largest shard: ceil(train images / n) (IID).
        shard = -(-train_count(data) // n)
        m, b = greyfed_masked_bits(n, shard)
        row["masked"] = f"{m / 8:.3f} ({m}-bit packed, {b}-bit quantisation)"
    else:
        row["masked"] = "n/a (f32 update: 4)"
    rows.append(row)

for engine, agg, mode in [(e, a, m) for e in ("deployment", "simulation")
                          for a, m in (("SecAgg+", "secagg"), ("plain", "plain"))]:
    r = load(f"{out}/flower-{engine}-{mode}.json")
    if r is None:
        continue
    secs = r["round_secs"]
    w = r.get("wire", {})
    elems = w.get("masked_elements_per_upload") or 404779
    per_client_round = w.get("reply_bytes_total", 0) / max(r["config"]["participants"], 1) / max(len(secs), 1)
    row = dict(
        system=f"Flower {r['flwr']} {engine}" + (f" ({r['workers']} workers)" if r.get("workers") else ""),
        agg=agg, wall=r["wall_s"], acc=r["accuracy"],
        rss=r["peak_rss_sum_mb"], pss=r["peak_pss_sum_mb"], procs=r["memory"]["processes_at_peak"],
        cpu=r["memory"].get("cpu_s", float("nan")),
        first=secs[0], warm=sum(secs[1:]) / (len(secs) - 1) if len(secs) > 1 else float("nan"), rounds=len(secs),
        up_per_elem=per_client_round / elems,
    )
    if "masked_bytes_per_element_record" in w:
        row["masked"] = (f"{w['masked_bytes_per_element_record']:.3f} "
                         f"({w['masked_dtype']} .npy in a ConfigRecord)")
    else:
        row["masked"] = f"n/a (f32 params: {w.get('plain_fit_bytes_per_element_message', 4):.3f})"
    rows.append(row)

base = {r["agg"]: r for r in rows if r["system"] == "greyfed"}
print()
print(f"| system | aggregation | wall s | round 1 s | warm round s (mean) | CPU s | accuracy | "
      f"summed peak RSS MB | summed peak PSS MB | B / masked element | upload B / model element / round | "
      f"wall / greyfed | CPU / greyfed |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    g = base.get(r["agg"])
    ratio = r["wall"] / g["wall"] if g else float("nan")
    cpu_ratio = r["cpu"] / g["cpu"] if g else float("nan")
    print(f"| {r['system']} | {r['agg']} | {r['wall']:.1f} | {r['first']:.2f} | {r['warm']:.2f} | "
          f"{r['cpu']:.0f} | {100 * r['acc']:.2f}% | {r['rss']:.0f} ({r['procs']} proc.) | {r['pss']:.0f} | "
          f"{r['masked']} | {r['up_per_elem']:.3f} | {ratio:.2f}x | {cpu_ratio:.2f}x |")
for engine in ("deployment", "simulation"):
    for mode in ("secagg", "plain"):
        r = load(f"{out}/flower-{engine}-{mode}.json")
        if r and any(r.get("fit_failures") or []):
            print(f"\nWARNING: Flower {engine} {mode}: failed fits per round {r['fit_failures']}")
if os.path.exists(f"{out}/loads.txt"):
    print("\nLoad average (1, 5, 15 min) when each run started:")
    for line in open(f"{out}/loads.txt"):
        print(f"- {line.strip()}")
if flower_status != "ok":
    print(f"\nFlower: {flower_status}")
EOF
